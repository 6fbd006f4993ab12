"""A task's tables (words.parquet, sentences.parquet): written a finished chunk at a time as hidden parts of the
output directory, joined into the table when the reports are written; kept in memory without an output directory.

A resumed run deletes the parts of the chunks after the ones its saved state has finished, as documents.jsonl is
cut back to them.
"""
from __future__ import annotations

import os
from pathlib import Path


TABLES = {"perplexity": (), "multiple-choice": (), "surprisal": ("words", "sentences")}  # each task's NAME.parquet


def part_path(directory: Path, name: str, chunk: int) -> Path:
    return directory / f".{name}.parquet.tmp-part{chunk:07d}.parquet"


def parts_of(directory: Path, name: str) -> list[Path]:
    """The parts of table `name` (NAME.parquet) in the directory, in chunk (so document) order."""
    return sorted(directory.glob(f".{name}.parquet.tmp-part*.parquet"))


class TableParts:
    """Tables by name (NAME.parquet), a chunk's columns at a time: parts on disk (the main process writes them), or
    in memory."""

    def __init__(self, directory: Path | None, main: bool, names: tuple[str, ...]):
        self.directory = directory
        self.main = main
        self.names = names
        self.memory: dict[str, dict[str, list]] = {}

    def start(self, chunks_done: int) -> None:
        """Continue the tables of a saved run: parts of chunks it had not finished are deleted."""
        if self.directory is None or not self.main:
            return
        for name in self.names:
            for part in parts_of(self.directory, name):
                if int(part.name.rsplit("part", 1)[1][: -len(".parquet")]) >= chunks_done:
                    part.unlink()

    def add(self, chunk: int, tables: dict[str, dict[str, list]]) -> None:
        """A finished chunk's columns of each table (a table without rows adds no part)."""
        for name, columns in tables.items():
            if not columns or not next(iter(columns.values())):
                continue
            if self.directory is None:
                kept = self.memory.setdefault(name, {k: [] for k in columns})
                for k, values in columns.items():
                    kept[k].extend(values)
            elif self.main:
                import pyarrow as pa
                import pyarrow.parquet as pq

                path = part_path(self.directory, name, chunk)
                tmp = path.with_name(path.name + f".{os.getpid()}")
                pq.write_table(pa.table(columns), tmp)
                os.replace(tmp, path)

    def results(self) -> tuple[dict[str, dict[str, list]], dict[str, list[str]]]:
        """(tables in memory, the parts of each table on disk; a finished run reported again: the joined table)."""
        if self.directory is None:
            return self.memory, {}
        files = {}
        for name in self.names:
            found = [str(p) for p in parts_of(self.directory, name)]
            if not found and (self.directory / f"{name}.parquet").is_file():
                found = [str(self.directory / f"{name}.parquet")]
            if found:
                files[name] = found
        return {}, files
