"""Rows become `Document`s, in a fixed order: the text to score, and optionally a prompt (context only), a group and
an id; consecutive rows joined by --join-by, at most --limit of them.

Rows whose text is missing or not a string are yielded with `text=None` so the runner counts them as skipped
instead of dropping them silently.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from lm_ce.config.fields import Config
from lm_ce.data.arrow import ArrowCopy, arrow_files, arrow_rows
from lm_ce.data.identity import DataIdentity
from lm_ce.data.local import lone_surrogate
from lm_ce.data.reading import load_rows, read_error, row_fields
from lm_ce.errors import UsageError


@dataclass
class Document:
    index: int  # position in the run's order
    text: str | None  # None: the text field was missing or not a string in this row
    id: str | None = None
    prompt: str | None = None
    group: str | None = None



def has_text(doc: Document) -> bool:
    """Whether a document has text to score. Whitespace alone is an empty document, as "" is: a tokenizer that
    turns "   " into tokens would otherwise have them scored as if they were text."""
    return doc.text is not None and doc.text.strip() != ""


def iter_documents(cfg: Config, rows=None, *, start: int = 0, read: DataIdentity | None = None) -> Iterator[Document]:
    """The documents of the run, in order, from index `start` on: rows joined by --join-by, at most --limit of
    them. `rows` (dicts, a Dataset or an IterableDataset) are read instead of what the config names (the Python
    API's data in memory). A resumed run starts after its finished documents: the rows before them are skipped
    unread where the data allows it (a Dataset, an IterableDataset, a list), not turned into documents. `read`: the
    data as the run recorded it (reading.load_rows checks what it reads against it)."""
    rows, source, fields = opened(cfg, rows, read)
    if cfg.join_by:  # documents span rows: the rows before `start` are read to find where it begins
        documents = (d for d in _join(_guarded(rows_from(rows, 0, fields), cfg), cfg) if d.index >= start)
    else:
        documents = _plain(_guarded(rows_from(rows, start, fields), cfg), cfg, first=start)
    count = start
    for doc in documents:
        if cfg.limit is not None and count >= cfg.limit:
            return
        refuse_surrogates(doc, source)
        yield doc
        count += 1
    if count == 0:
        raise UsageError(f"{source} has no rows; point at a dataset with text in field '{cfg.text_field}'")


def opened(cfg: Config, rows=None, read: DataIdentity | None = None) -> tuple[object, str, list[str]]:
    """(rows, how to name their source, the fields read): the rows the config names (or those given), checked to
    have those fields where their columns are known."""
    if rows is None:
        rows = load_rows(cfg, read)
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
    return rows, source, fields


def iter_rows(cfg: Config, rows=None, *, start: int = 0,
              read: DataIdentity | None = None) -> Iterator[tuple[int, dict, str]]:
    """(index, row, source) of the run's rows as they are, from index `start` on, at most --limit of them: the items
    or documents of a task other than perplexity, which reads its own fields (a lone surrogate in one refused)."""
    rows, source, fields = opened(cfg, rows, read)
    count = start
    for index, row in enumerate(_guarded(rows_from(rows, start, fields), cfg), start=start):
        if cfg.limit is not None and count >= cfg.limit:
            return
        for name in fields:  # a text, or a list of them (the choices)
            value = row.get(name) if isinstance(row, dict) else None
            found = next(filter(None, (lone_surrogate(v) for v in (value if isinstance(value, list) else [value])
                                       if isinstance(v, str))), None)
            if found:
                raise UsageError(f"{source}, row {index}: its field '{name}' holds {found}; fix or drop that row")
        yield index, row, source
        count += 1
    if count == 0:
        raise UsageError(f"{source} has no rows; point at a dataset with the fields {', '.join(fields)}")


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


def refuse_surrogates(doc: Document, source: str) -> None:
    """One line naming the document whose text (or prompt, id, group) holds a lone surrogate: half of a UTF-16 pair
    (Python's json reads "\\ud800" as one), no character, with no UTF-8, so no tokenizer takes it and no report can
    hold it. The command line meets it first as a file it cannot read (its reader refuses the line), also in one
    line: either way the run refuses, where a skipped document would change what is scored."""
    for name in ("text", "prompt", "id", "group"):
        found = lone_surrogate(getattr(doc, name))
        if found:
            which = f"document {doc.index}" + (f" (id {doc.id!r})" if doc.id is not None and name != "id" else "")
            raise UsageError(f"{source}, {which}: its {name} holds {found}; fix or drop that document")


def _guarded(rows, cfg: Config) -> Iterator[dict]:
    """The rows, with an error while reading them (streaming reads lazily) turned into a UsageError. datasets' own
    log line before it is silenced by the runner (reading.quiet_datasets around its passes): a generator holds no
    logger setting across a yield, where a caller's kept traceback could leave it set."""
    rows = iter(rows)
    bad_input = read_errors()
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except UsageError:  # already one line (a lone surrogate, a changed file)
            raise
        except bad_input as e:  # what a bad file makes datasets, pyarrow or the JSON and CSV readers raise
            raise read_error(cfg, e) from None
        yield row


def read_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that a file lm_ce cannot read raises while its rows are read (turned into one line naming the
    file); any other (an lm_ce bug: InternalError, AttributeError, ...) is raised as it is, not blamed on the file."""
    import datasets.exceptions
    import pyarrow as pa

    return (OSError, ValueError, KeyError, pa.ArrowException, datasets.exceptions.DatasetsError)


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
