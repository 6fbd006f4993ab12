"""What a run writes as it goes: documents.jsonl rows and tokens.parquet parts, a finished chunk at a time and in
document order, so that neither is held in memory. Without an output directory both are kept in memory instead
(the Python API's results, where there is nowhere to write them).

A resumed run continues the files where its saved state says: documents.jsonl is cut back to the rows of the
chunks it had finished, and token parts of later chunks are deleted.

The token parts are what a resume reads; tokens.parquet is written beside them as they go (each part appended
to one open file), so finishing only renames it, whatever the number of tokens. A resumed run writes that file
again from the parts it keeps.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lm_ce.errors import UsageError
from lm_ce.files import atomic_path
from lm_ce.sums.extremes import SHOWN_TOKENS
from lm_ce.sums.records import DocumentResult, KeyTokens, Run
from lm_ce.sums.signals import Signals
from lm_ce.sums.tasks import row_of as task_row

if TYPE_CHECKING:
    import pyarrow.parquet as pq
    from transformers import PreTrainedTokenizerBase

DOCUMENTS = "documents.jsonl"
TOKENS = "tokens.parquet"
PART_PREFIX = f".{TOKENS}.tmp-part"  # hidden parts, one per chunk: --overwrite clears them with the temporaries
JOINED = f".{TOKENS}.tmp-joined"  # the parts so far as one file, appended as they finish (renamed at the end)
FIELDS = tuple(f.name for f in dataclasses.fields(DocumentResult) if f.name not in ("signals", "longppl", "task"))
SIGNALS = tuple(f.name for f in dataclasses.fields(Signals))


def row_line(d: DocumentResult) -> str:
    """One line of documents.jsonl: the row, with its perplexity and bits per byte (and its signals: --min-k; its
    LongPPL: --longppl-evaluator)."""
    row = dataclasses.asdict(d)
    row.pop("task")
    row.update(d.task.fields() if d.task is not None else {})
    row.update(row.pop("signals") or {})
    if row.pop("longppl") is not None:
        keys = d.longppl
        row.update(longppl=keys.perplexity, longppl_key_tokens=keys.key_tokens, longppl_nll_sum=keys.nll_sum)
    row["perplexity"] = math.exp(d.nll_sum / d.tokens) if d.tokens else None
    row["bits_per_byte"] = d.nll_sum / (d.bytes * math.log(2)) if d.tokens and d.bytes else None
    return json.dumps(row, ensure_ascii=False)


def row_of(line: str) -> DocumentResult:
    """A documents.jsonl line read back (the float64 sums survive JSON exactly)."""
    row = json.loads(line)
    signals = Signals(**{k: row[k] for k in SIGNALS}) if SIGNALS[0] in row else None
    keys = KeyTokens(row["longppl_nll_sum"], row["longppl_key_tokens"]) if "longppl_key_tokens" in row else None
    return DocumentResult(**{k: row[k] for k in FIELDS}, signals=signals, longppl=keys, task=task_row(row))


class DocumentRows(Sequence):
    """documents.jsonl read back on first use: the run never holds its rows, the Python API still gets them."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._rows: list[DocumentResult] | None = None

    def _all(self) -> list[DocumentResult]:
        if self._rows is None:
            if self.path.is_file():
                with open(self.path, encoding="utf-8") as f:
                    self._rows = [row_of(line) for line in f if line.strip()]
            else:
                self._rows = []
        return self._rows

    def __len__(self) -> int:
        return len(self._all())

    def __getitem__(self, i):
        return self._all()[i]

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"DocumentRows({str(self.path)!r})"


def rows_digest(path: Path, run: Run):
    """The running sha256 of documents.jsonl's first `run.rows_offset` bytes (the saved run's finished rows), checked
    against the one the state records; a UsageError when the file does not hold those rows (cut, changed)."""
    digest = hashlib.sha256()
    if not run.rows_offset:
        return digest
    size = path.stat().st_size if path.is_file() else None
    if size is not None and size >= run.rows_offset:
        with open(path, "rb") as f:
            left = run.rows_offset
            while left and (block := f.read(min(left, 2**24))):
                digest.update(block)
                left -= len(block)
        if digest.hexdigest() == run.rows_sha256:
            return digest
    why = "missing" if size is None else f"{size:,} bytes, fewer than the {run.rows_offset:,} saved" \
        if size < run.rows_offset else "its rows differ from those saved (sha256)"
    raise UsageError(f"--resume: {path} does not hold the {run.rows.rows:,} rows the saved state records ({why}); "
                     "rerun with --overwrite (deletes the run), or use another --output-dir")


def part_path(directory: Path, chunk: int) -> Path:
    return directory / f"{PART_PREFIX}{chunk:07d}.parquet"


def token_parts(directory: Path) -> list[Path]:
    """The token parts in the directory, in chunk (so document) order."""
    return sorted(directory.glob(f"{PART_PREFIX}*.parquet"))


@dataclass
class Outputs:
    """The rows and token tables of finished chunks: appended to files by the main process, or kept in memory."""

    directory: Path | None  # None: keep in memory
    main: bool
    document_mode: bool
    tokenizer: PreTrainedTokenizerBase | None = None
    save_tokens: bool = False  # write the token tables (--save-tokens); else they only feed results.html's documents
    documents: list[DocumentResult] = field(default_factory=list)  # in memory (no directory)
    tables: list[dict] = field(default_factory=list)  # token tables in memory (no directory)
    vocab: dict[int, str] = field(default_factory=dict)  # token id -> text, decoded once
    _file: object = None
    _digest: object = None  # the running sha256 of documents.jsonl's rows (run.rows_sha256)
    _joined: pq.ParquetWriter | None = None  # of JOINED, open while the run writes tokens

    @property
    def writes(self) -> bool:
        return self.directory is not None and self.main

    def start(self, run: Run) -> None:
        """Continue the files of the saved run (a fresh run: empty ones)."""
        if not self.writes:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.document_mode:
            self._digest = rows_digest(self.directory / DOCUMENTS, run)
            self._file = open(self.directory / DOCUMENTS, "ab")
            self._file.truncate(run.rows_offset)  # rows written after the last save are written again
        for part in token_parts(self.directory):
            if int(part.name[len(PART_PREFIX):-len(".parquet")]) >= run.chunks_done:
                part.unlink()
        if self.save_tokens:
            import pyarrow.parquet as pq

            (self.directory / JOINED).unlink(missing_ok=True)
            for part in token_parts(self.directory):  # a resumed run's finished chunks, joined again
                self._join(pq.read_table(part))

    def add_chunk(self, run: Run, rows: list[DocumentResult]) -> None:
        """A finished chunk's rows and token table (taken from the run's tally), in document order."""
        blocks, run.tally.token_blocks = run.tally.token_blocks, []
        if blocks and self.save_tokens:
            self._add_tokens(blocks, rows, run.chunks_done)
        if blocks and run.extremes is not None and self.document_mode:
            run.extremes.keep(rows, lambda wanted: shown_tokens(blocks, wanted, rows, self.tokenizer, self.vocab))
        if not self.document_mode:
            return
        if self.directory is None:
            self.documents.extend(rows)
        elif self._file is not None:
            data = "".join(row_line(d) + "\n" for d in rows).encode("utf-8")
            self._file.write(data)
            self._file.flush()
            self._digest.update(data)
            run.rows_offset, run.rows_sha256 = self._file.tell(), self._digest.hexdigest()

    def _add_tokens(self, blocks: list[dict], rows: list[DocumentResult], chunk: int) -> None:
        table = token_table(blocks, rows, self.tokenizer, self.vocab)
        if self.directory is None:
            self.tables.append(table)
        elif self.main:
            import pyarrow as pa
            import pyarrow.parquet as pq

            arrow = pa.table(table)
            with atomic_path(part_path(self.directory, chunk)) as tmp:
                pq.write_table(arrow, tmp)
            self._join(arrow)

    def _join(self, table) -> None:
        """Append a part's table to the joined file (opened with the first part's columns)."""
        import pyarrow.parquet as pq

        if self._joined is None:
            self._joined = pq.ParquetWriter(self.directory / JOINED, table.schema)
        self._joined.write_table(table)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._joined is not None:
            self._joined.close()
            self._joined = None

    def results(self) -> tuple[Sequence[DocumentResult], dict | None, list[str], str | None]:
        """(documents, token table in memory, token files on disk, the closed joined file of those parts) for the
        Results."""
        if self.directory is None:
            table = None
            if self.tables:
                table = {k: [v for t in self.tables for v in t[k]] for k in self.tables[0]}
            return (self.documents if self.document_mode else []), table, [], None
        documents = DocumentRows(self.directory / DOCUMENTS) if self.document_mode else []
        files = [str(p) for p in token_parts(self.directory)]
        if not files and (self.directory / TOKENS).is_file():  # a finished run reported again: already joined
            files = [str(self.directory / TOKENS)]
        joined = self.directory / JOINED
        return documents, None, files, str(joined) if joined.is_file() and self._joined is None else None


def token_table(blocks: list[dict], documents: list[DocumentResult], tokenizer,
                vocab: dict[int, str] | None = None) -> dict[str, list] | None:
    """Token columns in document order, with the token texts and document ids added."""
    if not blocks:
        return None
    columns = {k: torch.cat([b[k] for b in blocks]) for k in blocks[0]}
    order = torch.argsort(columns["doc"] * (1 << 32) + columns["position"])
    columns = {k: v[order] for k, v in columns.items()}
    ids = {d.index: d.id for d in documents}
    vocab = {} if vocab is None else vocab

    def text(i: int) -> str:
        if i not in vocab:
            vocab[i] = tokenizer.decode([i])
        return vocab[i]

    out = {k: v.tolist() for k, v in columns.items()}
    out["doc_id"] = [ids.get(d) for d in out["doc"]]
    out["token"] = [text(i) for i in out["token_id"]]
    out["top1"] = [text(i) for i in out["top1_id"]]
    return out


def shown_tokens(blocks: list[dict], docs: set[int], rows: list[DocumentResult], tokenizer,
                 vocab: dict[int, str]) -> dict[str, list] | None:
    """The token table of these documents' first SHOWN_TOKENS tokens, each token's text as it reads in its
    document (`readable_texts`)."""
    table = token_table(only(blocks, docs), rows, tokenizer, vocab)
    if table is None:
        return None
    keep, start = [], 0
    for end in range(1, len(table["doc"]) + 1):
        if end == len(table["doc"]) or table["doc"][end] != table["doc"][start]:
            keep.append(slice(start, min(end, start + SHOWN_TOKENS)))
            start = end
    texts = [t for part in keep for t in readable_texts(table["token_id"][part], tokenizer.decode)]
    return {**{k: [x for part in keep for x in v[part]] for k, v in table.items()}, "token": texts}


def readable_texts(ids: list[int], decode) -> list[str]:
    """Each token's share of the decoded text: a character split across tokens (byte-level BPE) goes whole to the
    token that completes it, the tokens before it get "" (decoded alone, each would read as U+FFFD)."""
    out: list[str] = []
    prefix = read = 0  # decode(ids[prefix:read]) is text already given out; ids[prefix:] give later tokens context
    for i in range(len(ids)):
        whole, before = decode(ids[prefix : i + 1]), decode(ids[prefix:read])
        if whole.endswith("\ufffd") and i + 1 - read < 4:  # an unfinished character: wait for the next token
            out.append("")
            continue
        out.append(whole[len(before):] if whole.startswith(before) else decode(ids[read : i + 1]))
        prefix, read = read, i + 1
    return out


def only(blocks: list[dict], docs: set[int]) -> list[dict]:
    """The token columns of these documents alone."""
    wanted = torch.tensor(sorted(docs))
    out = []
    for b in blocks:
        mask = torch.isin(b["doc"], wanted)
        if mask.any():
            out.append({k: v[mask] for k, v in b.items()})
    return out


def join_parquet(files: list[str], path: Path) -> None:
    """The parts, one after another, as one parquet file (written then renamed; one part in memory at a time)."""
    import pyarrow.parquet as pq

    if not files:
        return
    with atomic_path(path) as tmp:
        writer = None
        try:
            for name in files:
                table = pq.read_table(name)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()
