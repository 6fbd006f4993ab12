"""The records of a run as data: JSON for numbers and text, arrays of numbers for tensors; never code.

`encode(run)` gives a JSON-able tree and the arrays it refers to; `decode(tree, arrays)` builds the records back.
Each record type is listed in SCHEMA with the kind of each of its fields, and nothing else is built: a record is a
JSON object tagged with its type ("@": "Run"), checked to be the type its place expects, with exactly its fields,
each of its kind (integers, floats, text, lists, maps as [key, value] pairs, tensors and numpy arrays of a given
dtype and shape). Tensors are packed into one flat array per dtype (a tensor is {"tensor": dtype, "at": offset,
"shape": [...]}), so that many small ones cost no more than one large; a chunk's per-window and per-document sums
are written as columns of such arrays (`Columns`). Anything else is refused with a
`StateError` naming the place. float64 values survive Python's JSON exactly (repr is the shortest round-trip
form; inf and nan are written as Infinity and NaN).
"""
from __future__ import annotations

import dataclasses

import torch

from lm_ce.errors import InternalError
from lm_ce.sums import divergence, extremes, quantiles, records, signals, stats, tasks
from lm_ce.sums.kinds import (
    BOOL,
    DTYPES,
    FLOAT,
    FLOATS,
    INT,
    NUMBERS,
    STR,
    Kind,
    List,
    Map,
    Opt,
    Packed,
    Scalar,
    StateError,
    Tensor,
    Tuple,
    where,
)

FORMAT = 1  # the version of the records' layout; a state of another version is refused, not guessed at


class Rec(Kind):
    """A record of one type of SCHEMA."""

    def __init__(self, cls: type):
        self.cls = cls

    def encode(self, value, arrays, path):
        if type(value) is not self.cls:
            raise StateError(f"{where(path)}: expected {self.cls.__name__}, found {type(value).__name__}")
        out = {"@": self.cls.__name__}
        for name, kind, plain in _fields(self.cls):
            v = getattr(value, name)
            out[name] = v if type(v) is plain else kind.encode(v, arrays, (path, name))  # a plain value as it is
        return out

    def decode(self, data, arrays, path):
        if not isinstance(data, dict) or "@" not in data:
            raise StateError(f"{where(path)}: expected a record {self.cls.__name__}")
        if data["@"] != self.cls.__name__:
            known = data["@"] in {c.__name__ for c in SCHEMA}
            what = "a record type lm_ce does not save" if not known else f"a {data['@']} where {self.cls.__name__} belongs"
            raise StateError(f"{where(path)}: {what} ({str(data['@'])[:40]!r})")
        fields = SCHEMA[self.cls]
        if len(data) != len(fields) + 1 or any(name not in data for name in fields):
            odd = sorted((set(data) - {"@"}) ^ set(fields))
            raise StateError(f"{where(path)}: {self.cls.__name__} with other fields than lm_ce saves "
                             f"({', '.join(map(str, odd))})")
        value = self.cls(**{name: kind.decode(data[name], arrays, (path, name)) for name, kind in fields.items()})
        for check in CHECKS.get(self.cls, ()):
            if (why := check(value)) is not None:
                raise StateError(f"{where(path)}: {why}")
        return value


class OneOf(Kind):
    """A record of one of several types of SCHEMA, told apart by its tag."""

    def __init__(self, *classes: type):
        self.recs = {cls.__name__: Rec(cls) for cls in classes}

    def encode(self, value, arrays, path):
        rec = self.recs.get(type(value).__name__)
        if rec is None or rec.cls is not type(value):
            raise StateError(f"{where(path)}: expected one of {', '.join(self.recs)}, found {type(value).__name__}")
        return rec.encode(value, arrays, path)

    def decode(self, data, arrays, path):
        tag = data.get("@") if isinstance(data, dict) else None
        if tag not in self.recs:
            raise StateError(f"{where(path)}: expected a record of one of {', '.join(self.recs)} ({str(tag)[:40]!r})")
        return self.recs[tag].decode(data, arrays, path)


class Columns(Kind):
    """A list of records whose fields are all int or float (with `keyed`: a dict of int keys to them), written
    column by column: one int64 or float64 array per field (float64 bits kept exactly), and the keys' column. A
    chunk's thousands of per-window and per-document sums then cost a few arrays, not thousands of JSON objects."""

    def __init__(self, cls: type, keyed: bool = False):
        self.cls, self.keyed = cls, keyed

    def encode(self, value, arrays, path):
        items = list(value.items()) if self.keyed else list(enumerate(value))
        if any(type(v) is not self.cls for _, v in items):
            raise StateError(f"{where(path)}: expected {self.cls.__name__} records")
        out = {"columns": self.cls.__name__}
        if self.keyed:
            out["keys"] = _column(INT, [k for k, _ in items], arrays, (path, "keys"))
        for name, kind, _plain in _fields(self.cls):
            out[name] = _column(kind, [getattr(v, name) for _, v in items], arrays, (path, name))
        return out

    def decode(self, data, arrays, path):
        names = [name for name, _, _ in _fields(self.cls)]
        if not isinstance(data, dict) or data.get("columns") != self.cls.__name__ or \
                set(data) != {"columns", *names, *(["keys"] if self.keyed else [])}:
            raise StateError(f"{where(path)}: expected the columns of {self.cls.__name__} records")
        columns = {name: COLUMN[kind.first].decode(data[name], arrays, (path, name)).tolist()
                   for name, kind, _ in _fields(self.cls)}
        keys = COLUMN[int].decode(data["keys"], arrays, (path, "keys")).tolist() if self.keyed else None
        if len({len(c) for c in [*columns.values(), *([keys] if keys is not None else [])]}) > 1:
            raise StateError(f"{where(path)}: columns of different lengths")
        rows = [self.cls(**dict(zip(names, row))) for row in zip(*(columns[name] for name in names))]
        if keys is None:
            return rows
        if len(set(keys)) != len(keys):
            raise StateError(f"{where(path)}: a key given twice")
        return dict(zip(keys, rows))


def _column(kind: Scalar, values: list, arrays, path) -> dict:
    if not all(type(v) is kind.first for v in values):  # numpy scalars made plain; anything else refused
        values = [kind.encode(v, arrays, (path, i)) for i, v in enumerate(values)]
    dtype = torch.int64 if kind.first is int else torch.float64
    return COLUMN[kind.first].encode(torch.tensor(values, dtype=dtype), arrays, path)


def _fields(cls: type) -> list[tuple[str, Kind, type | None]]:
    """(name, kind, the Python type written as it is: int, float, str or bool; else None) of each field of a record."""
    if cls not in _FIELDS:
        _FIELDS[cls] = [(name, kind, kind.first if isinstance(kind, Scalar) else None)
                        for name, kind in SCHEMA[cls].items()]
    return _FIELDS[cls]


_FIELDS: dict[type, list] = {}
SUM = Rec(stats.ExactSum)
COLUMN = {int: Tensor(torch.int64, (None,)), float: Tensor(torch.float64, (None,))}
F1, I1 = Tensor(FLOATS, (None,)), Tensor(torch.int64, (None,))
SCHEMA: dict[type, dict[str, Kind]] = {
    stats.ExactSum: {"partials": List(FLOAT)},
    stats.Clustered: {"count": INT, "tokens": INT, "tokens_sq": INT, "nll": SUM, "nll_sq": SUM, "nll_tokens": SUM},
    stats.PositionLoss: {"nll": Tensor(torch.float64, (None,)), "count": I1},
    stats.GroupSums: {"documents": INT, "tokens": INT, "bytes": INT, "nll": SUM},
    quantiles.Quantiles: {"exact_cap": INT, "k": INT, "levels": List(List(Tensor(torch.float32, (None,), numpy=True))),
                          "count": INT, "rank_error": INT, "low": FLOAT, "high": FLOAT, "turns": List(INT)},
    divergence.Divergence: {"keys": List(Tensor(torch.int64, (None, 2), numpy=True)),
                            "sums": List(Tensor(torch.float64, (None, len(divergence.COLUMNS)), numpy=True)),
                            "kl": Rec(quantiles.Quantiles), "delta_p": Rec(quantiles.Quantiles), "with_kl": BOOL},
    signals.TokenSignals: {"docs": Map(INT, List(Tuple(INT, F1, F1)))},
    signals.SignalSums: {"documents": INT, "sums": Map(STR, SUM)},
    extremes.ShownDocument: {"index": INT, "id": Opt(STR), "group": Opt(STR), "tokens": INT, "nll_sum": FLOAT,
                             "text": List(STR), "nll": List(FLOAT), "top1": List(STR)},
    extremes.Extremes: {"count": INT, "kept": Map(INT, Rec(extremes.ShownDocument)), "lost": Opt(STR)},
    records.KeySums: {"documents": INT, "tokens": INT, "key_tokens": INT, "nll": SUM},
    records.DocSums: {"nll": FLOAT, "tokens": INT, "sum_sq": FLOAT},
    records.WindowSums: {"doc": INT, "first_target": INT, "nll": FLOAT, "tokens": INT},
    records.Tally: {"docs": Columns(records.DocSums, keyed=True), "windows": Columns(records.WindowSums),
                    "positions": Opt(Rec(stats.PositionLoss)), "compares": List(Rec(divergence.Divergence)),
                    "token_blocks": List(Map(STR, Tensor(NUMBERS, (None,)))), "padding": INT, "inputs": INT,
                    "batches_done": List(INT), "signals": Opt(Rec(signals.TokenSignals))},
    records.TokenSums: {"tokens": INT, "nll": SUM, "sum_sq": SUM, "by_window": Rec(stats.Clustered)},
    records.RowSums: {"rows": INT, "documents": INT, "not_text": INT, "bytes": INT, "words": INT,
                      "by_document": Rec(stats.Clustered), "groups": Map(STR, Rec(stats.GroupSums)),
                      "signals": Opt(Map(Opt(STR), Rec(signals.SignalSums))),
                      "longppl": Opt(Map(Opt(STR), Rec(records.KeySums)))},
    records.CurveSums: {"lengths": List(INT), "strides": List(INT), "nll": List(SUM), "tokens": List(INT),
                        "documents": INT, "chunks_done": INT, "seconds": FLOAT, "done": BOOL},
    tasks.ChoiceSums: {"items": INT, "choices": INT, "acc": INT, "acc_norm": INT, "acc_bytes": INT, "scoring": STR},
    tasks.SurprisalSums: {"documents": INT, "words": INT, "sentences": INT, "tokens": INT, "surprisal": SUM,
                          "sum_sq": SUM, "by_document": Rec(stats.Clustered)},
    records.Run: {"rows": Rec(records.RowSums), "sums": Rec(records.TokenSums), "tally": Rec(records.Tally),
                  "chunks_done": INT, "partial": Opt(Rec(records.Tally)), "windows": INT, "stream_bytes": INT,
                  "stream_words": INT, "doubled_prefix": INT, "tokens_per_process": List(INT), "rows_offset": INT,
                  "rows_sha256": Opt(STR), "shard": Opt(STR), "extremes": Opt(Rec(extremes.Extremes)),
                  "passes_done": BOOL, "curve": Opt(Rec(records.CurveSums)),
                  "task": Opt(OneOf(tasks.ChoiceSums, tasks.SurprisalSums))},
}


def _same_lengths(*names: str):
    def check(value) -> str | None:
        lengths = {n: len(getattr(value, n)) for n in names}
        return None if len(set(lengths.values())) <= 1 else f"{', '.join(names)} differ in length {lengths}"
    return check


def _blocks(tally) -> str | None:
    for i, block in enumerate(tally.token_blocks):
        if len({len(t) for t in block.values()}) > 1:
            return f"token_blocks[{i}]: columns of different lengths"
    return None


def _divergence(d) -> str | None:
    if len(d.keys) != len(d.sums) or any(len(k) != len(s) for k, s in zip(d.keys, d.sums)):
        return "keys and sums do not pair up"
    return None


def _quantiles(q) -> str | None:
    return None if q.levels and q.k >= 1 and q.exact_cap >= 0 else "no level, or k below 1"


def _signals(t) -> str | None:
    bad = any(len(lp) != len(z) for parts in t.docs.values() for _, lp, z in parts)
    return "lp and z of a window differ in length" if bad else None


CHECKS = {
    stats.PositionLoss: [_same_lengths("nll", "count")],
    records.Tally: [_blocks],
    divergence.Divergence: [_divergence],
    quantiles.Quantiles: [_quantiles],
    signals.TokenSignals: [_signals],
    signals.SignalSums: [lambda s: None if set(s.sums) == set(signals.NAMES) else "not the three signals' sums"],
    extremes.ShownDocument: [_same_lengths("text", "nll", "top1"),
                             lambda d: None if d.tokens >= 1 else "a shown document without tokens"],
    records.CurveSums: [_same_lengths("lengths", "strides", "nll", "tokens")],
}


def check_schema() -> None:
    """Every field of every record is in SCHEMA (a field added to a record and not here would not be saved)."""
    for cls, fields in SCHEMA.items():
        names = [f.name for f in dataclasses.fields(cls)]
        if set(names) != set(fields):
            raise InternalError(f"{cls.__name__}: fields {sorted(set(names) ^ set(fields))} are not in SCHEMA")


def encode(run: records.Run) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able tree, packed arrays by dtype name) of a run's records."""
    packed = Packed()
    tree = {"format": FORMAT, "run": Rec(records.Run).encode(run, packed, "run")}
    return tree, packed.arrays()


def decode(tree, arrays: dict[str, torch.Tensor]) -> records.Run:
    """The run's records from `encode`'s tree and arrays, or a StateError naming what is not as lm_ce writes it."""
    if not isinstance(tree, dict) or tree.get("format") != FORMAT or set(tree) != {"format", "run"}:
        found = tree.get("format") if isinstance(tree, dict) else None
        raise StateError(f"records of format {found!r}, not {FORMAT}")
    if any(name not in DTYPES or a.dim() != 1 or str(a.dtype).replace("torch.", "") != name for name, a in arrays.items()):
        raise StateError("arrays other than lm_ce's packed ones")
    return Rec(records.Run).decode(tree["run"], arrays, "run")
