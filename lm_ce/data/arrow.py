"""datasets' Arrow files read directly with pyarrow, a record batch at a time: the rows from any index on, found
from the batches' headers alone, in memory that is freed after each batch.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lm_ce import compat
from lm_ce.files import atomic_write, file_sha256

if TYPE_CHECKING:
    import pyarrow as pa

RECORD = "lm_ce_copy.json"  # beside datasets' Arrow files: what lm_ce found in them when it made the copy


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



def arrow_files(rows, fields: list[str] | None) -> list[str]:
    """The Arrow files a Dataset is, in order, when its rows can be read from them directly: loaded from files,
    no selection or shuffle on top, and the fields read plain values (strings, numbers). Else []."""
    import datasets

    if not fields or not isinstance(rows, datasets.Dataset) or not compat.plain_files(rows) or not rows.cache_files:
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
    schema: pa.Schema  # the stream's


def batch_at(name: str, index: int) -> BatchAt:
    """The record batch of an Arrow stream file that holds row `index` (>= 0; a negative one is row 0), found by
    reading the batches' headers through a memory map that reads no further ahead than it is asked
    (MADV_RANDOM): reading the batches themselves to count their rows reads the whole file from disk."""
    import mmap

    error = None
    with open(name, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
            mapped.madvise(mmap.MADV_RANDOM)
        try:
            found = _batch_at(mapped, index, name)  # holds no view of the map once it returns, so the map can close
        except (ValueError, OSError) as e:  # a cut or damaged file (pyarrow's ArrowInvalid is a ValueError)
            error = f"{name}: not a whole Arrow stream ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        # the error's traceback, which held views of the map, is gone here: the map can close
    if error is not None:
        raise ValueError(error)
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


def count_rows(name: str) -> int:
    """The rows of an Arrow stream file, from its batches' headers alone."""
    return batch_at(name, 2**62).rows_before


def record_copy(directory: str, files: list[str]) -> None:
    """Write down each Arrow file of a copy just made: size, rows and sha256 (checked by `copy_damage`)."""
    entries = [{"name": Path(f).name, "bytes": os.path.getsize(f), "rows": count_rows(f), "sha256": file_sha256(f)}
               for f in files]
    atomic_write(Path(directory) / RECORD, json.dumps({"files": entries}, indent=1) + "\n")


def copy_damage(directory: str, files: list[str], rows: int) -> str | None:
    """Why the Arrow copy in `directory` is not the one lm_ce made (None: it is): no record of it, other files,
    sizes, row counts (also against datasets' own count, `rows`) or sha256 (remembered while a file's inode, size
    and times stay the same, so that only a changed file is read again)."""
    try:
        record = json.loads((Path(directory) / RECORD).read_text(encoding="utf-8"))["files"]
        saved = {e["name"]: e for e in record}
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {RECORD}: not made by this version of lm_ce"
    if sorted(saved) != sorted(Path(f).name for f in files):
        return "its Arrow files are not those lm_ce made"
    try:
        counts = {f: count_rows(f) for f in files}
        for f in files:
            e = saved[Path(f).name]
            if os.path.getsize(f) != e["bytes"] or counts[f] != e["rows"]:
                return f"{Path(f).name} holds {counts[f]:,} rows in {os.path.getsize(f):,} bytes, not {e['rows']:,} " \
                       f"in {e['bytes']:,}"
        if sum(counts.values()) != rows:
            return f"{sum(counts.values()):,} rows, not the {rows:,} datasets counted"
        for f in files:
            if file_sha256(f) != saved[Path(f).name]["sha256"]:
                return f"{Path(f).name} was changed (its sha256 differs)"
    except (OSError, ValueError, KeyError, TypeError) as e:  # a file that is no Arrow stream
        return f"unreadable: {str(e)[:300]}"
    return None
