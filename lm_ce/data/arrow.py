"""datasets' Arrow files read directly with pyarrow, a record batch at a time: the rows from any index on, found
from the batches' headers alone, in memory that is freed after each batch.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


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
