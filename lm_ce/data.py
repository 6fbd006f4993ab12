"""Documents from a Hub dataset or local files, through `datasets`, in a fixed order.

Rows become `Document`s: the text to score, and optionally a prompt (context only), a group
and an id. Rows whose text is missing or not a string are yielded with `text=None` so the
runner counts them as skipped instead of dropping them silently.
"""
from __future__ import annotations

import codecs
import contextlib
import hashlib
import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import Config, resolve_path
from .errors import UsageError, first_line
from .model import file_sha256

MEMORY = "<memory>"  # Config.dataset when the rows were given in memory (lm_ce.evaluate, PerplexityCallback)
BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Document:
    index: int  # position in the run's order
    text: str | None  # None: the text field was missing or not a string in this row
    id: str | None = None
    prompt: str | None = None
    group: str | None = None


def row_fields(cfg: Config) -> list[str]:
    """The fields of a row that the run reads: text, prompt, group, id, --join-by's keys."""
    return [f for f in (cfg.text_field, cfg.prompt_field, cfg.group_field, cfg.id_field, *(cfg.join_by or [])) if f]


def has_text(doc: Document) -> bool:
    """Whether a document has text to score. Whitespace alone is an empty document, as "" is: a tokenizer that
    turns "   " into tokens would otherwise have them scored as if they were text."""
    return doc.text is not None and doc.text.strip() != ""


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
            blank = False
    return f"{path}: no rows, only blank lines; point --data-files at a file with one JSON object per line" if blank else None


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """datasets logs its read errors before raising them; we turn those into one line of our own."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_error(cfg: Config, e: Exception) -> UsageError:
    """One line for an exception from `datasets` while loading or reading: the file and line when we can tell."""
    if not cfg.data_files:
        return UsageError(f"reading dataset '{cfg.dataset}' failed ({type(e).__name__}: {first_line(e)})")
    builder, paths = local_files(cfg)
    for p in paths if builder in ("text", "json", "csv") else []:  # scanned on failure only: 14 s for 300 MB here
        bad = first_bad_utf8(p)
        if bad:
            return UsageError(bad)
    if builder == "json":
        for p in paths:
            bad = first_bad_json_line(p)
            if bad:
                return UsageError(bad)
    cause = e.__cause__ or e  # DatasetGenerationError says only that something failed; its cause says what
    return UsageError(f"cannot read {', '.join(paths)} as {builder}: {first_line(cause).rstrip('.')}; fix the file or check --dataset")


def cache_options(cfg: Config) -> dict:
    """load_dataset's arguments for --data-cache: datasets' own cache (default), a cache inside --output-dir,
    or none (off: the data is read as a stream, so no Arrow copy is written)."""
    if cfg.data_cache == "off":
        return {"streaming": True}
    if cfg.data_cache == "output":
        return {"streaming": cfg.streaming, "cache_dir": str(Path(cfg.output_dir) / "datasets_cache")}
    return {"streaming": cfg.streaming}


def cache_name(paths: list[str]) -> str:
    """The config name that keys datasets' Arrow cache of local files by their content. datasets keys it by path
    and mtime alone, so a file replaced by another with its mtime kept (cp -p, rsync -t, tar) was read from the
    old copy, while results.json recorded the new file's sha256."""
    content = hashlib.sha256(" ".join(file_sha256(p) for p in paths).encode()).hexdigest()
    return f"lm_ce-{content[:32]}"


def whole_text(path: str) -> str:
    """A text file read whole as one text, as llama.cpp's `-f` reads it: bytes as they are (no newline
    translation), one trailing newline dropped."""
    text = Path(path).read_bytes().decode("utf-8")
    return text[:-1] if text.endswith("\n") else text


def load_rows(cfg: Config):
    """The `datasets` Dataset (or IterableDataset when streaming) the config names."""
    import datasets

    if cfg.dataset == MEMORY and not cfg.data_files:
        raise UsageError(
            f"dataset '{MEMORY}': the rows of this run were given in memory to lm_ce.evaluate; to run it from a "
            "config, give --data-files FILE or --dataset NAME"
        )
    if cfg.data_files:
        builder, paths = local_files(cfg)
        if builder == "text" and cfg.mode == "llama-cpp":  # read whole: a bad byte named before decoding
            for p in paths:
                if bad := first_bad_utf8(p):
                    raise UsageError(bad)
            return datasets.Dataset.from_dict({"text": [whole_text(p) for p in paths]})
        # A byte order mark starts many files saved on Windows; json strips it, text would score it (3 bytes)
        options = {"encoding": "utf-8-sig"} if builder == "text" else {}
        cache = cache_options(cfg)
        try:
            with quiet_datasets():
                if cache.pop("streaming"):
                    return datasets.load_dataset(builder, data_files=paths, split="train", streaming=True, **cache,
                                                 **options)
                return arrow_copy(cfg, builder, paths, cache_dir=cache.get("cache_dir"), options=options)
        except Exception as e:  # datasets raises many kinds; turn them into one clear line
            raise read_error(cfg, e) from None
    try:
        return datasets.load_dataset(
            cfg.dataset, cfg.dataset_config, split=cfg.split, revision=None, **cache_options(cfg)
        )
    except ValueError as e:
        if "split" in str(e).lower():
            raise UsageError(f"dataset '{cfg.dataset}' has no split '{cfg.split}': {first_line(e)}") from None
        raise UsageError(f"cannot load dataset '{cfg.dataset}' ({cfg.dataset_config}): {first_line(e)}") from None
    except Exception as e:
        raise UsageError(
            f"cannot load dataset '{cfg.dataset}' ({cfg.dataset_config}, split {cfg.split}) from the Hub or the "
            f"local cache ({type(e).__name__}: {first_line(e)}). Offline? Point at local files instead: "
            "--data-files FILE.jsonl|.txt|.csv|.parquet --text-field FIELD"
        ) from None


@dataclass
class ArrowCopy:
    """datasets' Arrow copy of local files, read from its files directly. Opening it as a Dataset walks every
    record batch through a memory map, which reads the whole copy from disk at every start (14.7 s for 10^6 short
    documents from a cold disk on the benchmark's machine)."""

    files: list[str]
    column_names: list[str]
    num_rows: int

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self) -> Iterator[dict]:
        return arrow_rows(self.files, 0, self.column_names)


def arrow_copy(cfg: Config, builder: str, paths: list[str], *, cache_dir: str | None, options: dict):
    """datasets' Arrow copy of local files, keyed by their content (`cache_name`): written on the first run,
    found on later ones. An `ArrowCopy` when the run's fields hold plain values, else the Dataset."""
    import datasets
    from datasets.arrow_reader import ArrowReader

    prepared = datasets.load_dataset_builder(builder, data_files=paths, cache_dir=cache_dir, name=cache_name(paths),
                                             **options)
    prepared.download_and_prepare()
    features = prepared.info.features
    if features is not None and plain_values(features, row_fields(cfg)):
        parts = ArrowReader(prepared.cache_dir, prepared.info).get_file_instructions(
            prepared.dataset_name, "train", prepared.info.splits.values())
        split = prepared.info.splits["train"]
        if parts and all(p["skip"] == 0 for p in parts) and sum(p["take"] for p in parts) == split.num_examples:
            return ArrowCopy(files=[p["filename"] for p in parts], column_names=list(features),
                             num_rows=split.num_examples)
    return prepared.as_dataset(split="train")


def iter_documents(cfg: Config, rows=None, *, start: int = 0) -> Iterator[Document]:
    """The documents of the run, in order, from index `start` on: rows joined by --join-by, at most --limit of
    them. `rows` (dicts, a Dataset or an IterableDataset) are read instead of what the config names (the Python
    API's data in memory). A resumed run starts after its finished documents: the rows before them are skipped
    unread where the data allows it (a Dataset, an IterableDataset, a list), not turned into documents."""
    if rows is None:
        rows = load_rows(cfg)
        source = ", ".join(cfg.data_files) if cfg.data_files else f"dataset '{cfg.dataset}'"
    else:
        source = "the data given in memory"
    fields = row_fields(cfg)
    columns = getattr(rows, "column_names", None)
    if columns is not None:
        for name in fields:
            if name not in columns:
                raise UsageError(
                    f"{source} has no field '{name}'; its fields are: {', '.join(columns)} (set --text-field etc.)"
                )
    if cfg.join_by:  # documents span rows: the rows before `start` are read to find where it begins
        documents = (d for d in _join(_guarded(rows_from(rows, 0, fields), cfg), cfg) if d.index >= start)
    else:
        documents = _plain(_guarded(rows_from(rows, start, fields), cfg), cfg, first=start)
    count = start
    for doc in documents:
        if cfg.limit is not None and count >= cfg.limit:
            return
        yield doc
        count += 1
    if count == 0:
        raise UsageError(f"{source} has no rows; point at a dataset with text in field '{cfg.text_field}'")


def rows_from(rows, start: int, fields: list[str] | None = None):
    """The rows from index `start` on: an ArrowCopy's or a Dataset's Arrow files read a record batch at a time
    (`arrow_rows`), or a Dataset's contiguous selection, an IterableDataset's skip, a list's slice; anything else
    is read past the first `start`."""
    if isinstance(rows, ArrowCopy):
        return arrow_rows(rows.files, start, fields or rows.column_names)
    files = arrow_files(rows, fields)
    if files:
        return arrow_rows(files, start, fields)
    if not start:
        return rows
    if hasattr(rows, "select") and hasattr(rows, "__len__"):  # datasets.Dataset
        return rows.select(range(start, len(rows))) if start < len(rows) else []
    if hasattr(rows, "skip"):  # datasets.IterableDataset (streaming)
        return rows.skip(start)
    if isinstance(rows, (list, tuple)):
        return rows[start:]
    return itertools.islice(rows, start, None)


def arrow_files(rows, fields: list[str] | None) -> list[str]:
    """The Arrow files a Dataset is, in order, when its rows can be read from them directly: loaded from files,
    no selection or shuffle on top, and the fields read plain values (strings, numbers). Else []."""
    import datasets

    if not fields or not isinstance(rows, datasets.Dataset) or rows._indices is not None or not rows.cache_files:
        return []
    if not plain_values(rows.features, fields):
        return []
    files = [f["filename"] for f in rows.cache_files]
    return files if len(files) == len(set(files)) else []


def plain_values(features, fields: list[str]) -> bool:
    """Whether each field is in `features` and holds plain values (strings, numbers): what arrow_rows can read."""
    import datasets

    return all(isinstance(features.get(f), datasets.Value) for f in fields)


def arrow_rows(files: list[str], start: int, fields: list[str]) -> Iterator[dict]:
    """The rows from index `start` on, as dicts of `fields`, read from datasets' Arrow files one record batch at a
    time into memory that is freed after it. Iterating the Dataset itself reads its memory-mapped files, whose
    pages then stay in the process's resident memory: about 270 MB at 10^6 short documents. A start inside the
    files is found from the batches' headers alone (`batch_at`), so a resume does not read what it skips."""
    import pyarrow as pa

    columns = list(dict.fromkeys(fields))
    seen = 0
    for name in files:
        at = batch_at(name, start - seen)
        seen += at.rows_before
        if at.offset is None:
            continue
        with pa.OSFile(name) as f:
            f.seek(at.offset)
            for message in pa.ipc.MessageReader.open_stream(f):
                batch = pa.ipc.read_record_batch(message, at.schema)
                part = batch.select(columns).slice(max(0, start - seen))
                seen += batch.num_rows
                yield from part.to_pylist()


@dataclass
class BatchAt:
    """Where the record batch holding a row starts in an Arrow stream file."""

    offset: int | None  # byte offset of the batch's message; None: the file ends before the row
    rows_before: int  # rows in the batches before it (all the file's rows when offset is None)
    schema: object  # the stream's pyarrow schema


def batch_at(name: str, index: int) -> BatchAt:
    """The record batch of an Arrow stream file that holds row `index` (>= 0; a negative one is row 0), found by
    reading the batches' headers through a memory map that reads no further ahead than it is asked
    (MADV_RANDOM): reading the batches themselves to count their rows reads the whole file from disk."""
    import mmap

    with open(name, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
            mapped.madvise(mmap.MADV_RANDOM)
        found = _batch_at(mapped, index, name)  # holds no view of the map once it returns, so the map can close
    return found


def _batch_at(mapped, index: int, name: str) -> BatchAt:
    import pyarrow as pa

    source = pa.BufferReader(pa.py_buffer(mapped))
    messages = pa.ipc.MessageReader.open_stream(source)
    schema = pa.ipc.read_schema(messages.read_next_message())
    rows = 0
    while True:
        offset = source.tell()
        try:
            message = messages.read_next_message()
        except StopIteration:
            return BatchAt(offset=None, rows_before=rows, schema=schema)
        if message.type != "record batch":
            raise ValueError(f"{name}: an Arrow stream with {message.type} messages, not only record batches")
        count = pa.ipc.read_record_batch(message, schema).num_rows
        if rows + count > index:
            return BatchAt(offset=offset, rows_before=rows, schema=schema)
        rows += count


def _guarded(rows, cfg: Config) -> Iterator[dict]:
    """The rows, with an error while reading them (streaming reads lazily) turned into a UsageError."""
    rows = iter(rows)
    with quiet_datasets():
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as e:  # datasets raises many kinds; turn them into one clear line
                raise read_error(cfg, e) from None
            yield row


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def _field(row: dict, name: str | None) -> str | None:
    """A group or id as text; a whole number read as a float (pandas reads a CSV column of whole numbers
    with empty cells as float64) is written as the whole number, `1`, not `1.0`."""
    value = row.get(name) if name else None
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _plain(rows, cfg: Config, *, first: int = 0) -> Iterator[Document]:
    for index, row in enumerate(rows, start=first):
        yield Document(
            index=index,
            text=_text(row.get(cfg.text_field)),
            id=_field(row, cfg.id_field),
            prompt=_text(row.get(cfg.prompt_field)) if cfg.prompt_field else None,
            group=_field(row, cfg.group_field),
        )


def _join(rows, cfg: Config) -> Iterator[Document]:
    """Consecutive rows with equal --join-by values become one document, texts joined by a space."""
    key, texts, first = None, [], None
    index = 0
    for row in rows:
        row_key = tuple(row.get(f) for f in cfg.join_by)
        if texts and row_key != key:
            yield _joined(index, key, texts, first, cfg)
            index, texts = index + 1, []
        if not texts:
            key, first = row_key, row
        texts.append(_text(row.get(cfg.text_field)))
    if texts:
        yield _joined(index, key, texts, first, cfg)


def _joined(index: int, key: tuple, texts: list, first: dict, cfg: Config) -> Document:
    valid = [t for t in texts if t is not None]
    return Document(
        index=index,
        text=" ".join(valid) if valid else None,
        id=_field(first, cfg.id_field) or " ".join(str(k) for k in key),
        group=_field(first, cfg.group_field),
    )
