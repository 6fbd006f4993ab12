"""Local data files: their format from the extension, checked to exist, and the first bad UTF-8 byte or bad JSON
line named with its file and line.
"""
from __future__ import annotations

import codecs
import json
import re
from pathlib import Path

from lm_ce.config.fields import Config, resolve_path
from lm_ce.errors import UsageError

LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # half of a UTF-16 pair alone: no character, no UTF-8

BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def local_files(cfg: Config) -> tuple[str, list[str]]:
    """(datasets builder, file paths) for --data-files, checked to exist and share one format."""
    paths = [resolve_path(p) for p in cfg.data_files or []]
    for p in paths:
        if Path(p).is_dir():
            raise UsageError(f"data file {p} is a directory; list the files in it: --data-files a.jsonl,b.jsonl")
        if not Path(p).is_file():
            raise UsageError(f"data file {p} does not exist; check --data-files")
        if Path(p).stat().st_size == 0:
            raise UsageError(f"data file {p} is empty (0 bytes); check --data-files")
    builders = {BUILDERS.get(Path(p).suffix.lower()) for p in paths}
    if cfg.dataset in set(BUILDERS.values()):
        return cfg.dataset, paths
    if None in builders or len(builders) != 1:
        raise UsageError(
            f"cannot tell the format of --data-files {', '.join(paths)}: use one of the extensions "
            f"{', '.join(BUILDERS)} for all files, or name the builder with --dataset json|csv|text|parquet"
        )
    return builders.pop(), paths


def first_bad_utf8(path: str, block: int = 2**24) -> str | None:
    """'file:line: ...' for the first bytes of a text file that are not UTF-8, read block by block.

    Such files are refused, not read with replacement characters: U+FFFD stands for bytes that are
    not in the researcher's text, so tokens, bytes and loss would describe a different text, and a
    silently different number is worse than one command to re-encode the file.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    newlines, line_bytes = 0, 0  # lines before this block; bytes of the current line before it
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block)
            pending = decoder.getstate()[0]  # the start of a character split across blocks (already counted)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                seen = (pending + chunk)[: e.start]
                line = newlines + seen.count(b"\n") + 1
                column = len(seen) - seen.rfind(b"\n") if b"\n" in seen else line_bytes - len(pending) + len(seen) + 1
                byte = (pending + chunk)[e.start : e.start + 1].hex()
                return (
                    f"{path}:{line}: not valid UTF-8 (byte 0x{byte}, byte {column} of the line); re-encode the file "
                    f"as UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > fixed{Path(path).suffix} "
                    "(iconv -c -f utf-8 -t utf-8 drops the bad bytes instead)"
                )
            if not chunk:
                return None
            newlines += chunk.count(b"\n")
            line_bytes = len(chunk) - chunk.rfind(b"\n") - 1 if b"\n" in chunk else line_bytes + len(chunk)


def first_bad_json_line(path: str) -> str | None:
    """'file:line: what is wrong; what to do' for the first line of a JSON Lines file that is not a JSON object."""
    lines_expected = Path(path).suffix.lower() == ".jsonl"
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        blank = True
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if blank and not lines_expected:  # a .json file holding one multi-line document
                    f.seek(0)
                    try:
                        json.load(f)
                    except json.JSONDecodeError as e:
                        return f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); fix the file"
                    return None
                return f"{path}:{number}: not valid JSON ({e.msg}); fix or remove that line"
            if not isinstance(row, dict) and (lines_expected or not blank):
                kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(row), "number")
                return f'{path}:{number}: a JSON {kind}, not an object; each line must be {{"field": value, ...}}'
            found = LONE_SURROGATE.search(json.dumps(row, ensure_ascii=False))
            if found:  # json reads "\\ud800" without a pair; the reader refuses it, as lm_ce.evaluate refuses the text
                return (f"{path}:{number}: a string holds a lone surrogate {found.group()!r} (half of a UTF-16 pair, "
                        "not a character: no tokenizer takes it); fix or remove that line")
            blank = False
    return f"{path}: no rows, only blank lines; point --data-files at a file with one JSON object per line" if blank else None


def lone_surrogate(value: str | None) -> str | None:
    """Where `value` holds a lone surrogate, in words ("a lone surrogate '\\ud800' at character 4 (...)"), else None."""
    found = LONE_SURROGATE.search(value) if value is not None else None
    if found is None:
        return None
    return (f"a lone surrogate {found.group()!r} at character {found.start()} (half of a UTF-16 pair, not a "
            "character: no tokenizer or UTF-8 file takes it)")


def whole_text(path: str) -> str:
    """A text file read whole as one text, as llama.cpp's `-f` reads it: bytes as they are (no newline
    translation), one trailing newline dropped."""
    text = Path(path).read_bytes().decode("utf-8")
    return text[:-1] if text.endswith("\n") else text
