"""Documents from a Hub dataset or local files, through `datasets`, in a fixed order.

Rows become `Document`s: the text to score, and optionally a prompt (context only), a group
and an id. Rows whose text is missing or not a string are yielded with `text=None` so the
runner counts them as skipped instead of dropping them silently.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import Config, UsageError, first_line, resolve_path

BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Document:
    index: int  # position in the run's order
    text: str | None  # None: the text field was missing or not a string in this row
    id: str | None = None
    prompt: str | None = None
    group: str | None = None


def local_files(cfg: Config) -> tuple[str, list[str]]:
    """(datasets builder, file paths) for --data-files, checked to exist and share one format."""
    paths = [resolve_path(p) for p in cfg.data_files or []]
    for p in paths:
        if not Path(p).is_file():
            raise UsageError(f"data file {p} does not exist; check --data-files")
    builders = {BUILDERS.get(Path(p).suffix.lower()) for p in paths}
    if cfg.dataset in set(BUILDERS.values()):
        return cfg.dataset, paths
    if None in builders or len(builders) != 1:
        raise UsageError(
            f"cannot tell the format of --data-files {', '.join(paths)}: use one of the extensions "
            f"{', '.join(BUILDERS)} for all files, or name the builder with --dataset json|csv|text|parquet"
        )
    return builders.pop(), paths


def first_bad_json_line(path: str) -> str | None:
    """'file:line: reason' for the first line of a JSON Lines file that is not a JSON object."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path}:{number}: not valid JSON ({e.msg})"
            if not isinstance(row, dict):
                return f"{path}:{number}: a JSON value that is not an object"
    return None


def load_rows(cfg: Config):
    """The `datasets` Dataset (or IterableDataset when streaming) the config names."""
    import datasets

    if cfg.data_files:
        builder, paths = local_files(cfg)
        try:
            return datasets.load_dataset(builder, data_files=paths, split="train", streaming=cfg.streaming)
        except Exception as e:  # datasets raises many kinds; turn them into one clear line
            if builder == "json":
                for p in paths:
                    bad = first_bad_json_line(p)
                    if bad:
                        raise UsageError(f"{bad}; fix or remove that line") from None
            raise UsageError(f"cannot read {', '.join(paths)} as {builder}: {first_line(e)}") from None
    try:
        return datasets.load_dataset(
            cfg.dataset, cfg.dataset_config, split=cfg.split, streaming=cfg.streaming, revision=None
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


def iter_documents(cfg: Config) -> Iterator[Document]:
    """The documents of the run, in order: rows joined by --join-by, at most --limit of them."""
    rows = load_rows(cfg)
    source = ", ".join(cfg.data_files) if cfg.data_files else f"dataset '{cfg.dataset}'"
    columns = getattr(rows, "column_names", None)
    if columns is not None:
        for name in [cfg.text_field, cfg.prompt_field, cfg.group_field, cfg.id_field, *(cfg.join_by or [])]:
            if name and name not in columns:
                raise UsageError(
                    f"{source} has no field '{name}'; its fields are: {', '.join(columns)} (set --text-field etc.)"
                )
    documents = _join(rows, cfg) if cfg.join_by else _plain(rows, cfg)
    count = 0
    for doc in documents:
        if cfg.limit is not None and count >= cfg.limit:
            return
        yield doc
        count += 1
    if count == 0:
        raise UsageError(f"{source} has no rows; point at a dataset with text in field '{cfg.text_field}'")


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def _field(row: dict, name: str | None) -> str | None:
    if not name or row.get(name) is None:
        return None
    return str(row[name])


def _plain(rows, cfg: Config) -> Iterator[Document]:
    for index, row in enumerate(rows):
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
