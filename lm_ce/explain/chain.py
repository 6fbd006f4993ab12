"""The chain of states from one protocol to another, one factor at a time.

Every protocol is written in one set of coordinates (`Point`): document or joined stream, window length, stride,
the prefix token, the BOS sink, the detokenizer, and the chunk selection. The chunk protocols are exact subsets
of stream runs: gptq is the stream with stride = max_length restricted to whole chunks; llama-cpp the stream with
stride max_length/2, the prefix token at every window's first input when the tokenizer adds BOS, restricted to
the second half of whole chunks. So a chain of valid configurations joins any two protocols, each step changing
one factor. Then the unit (tokens, words, bytes) and the form (perplexity, nats, bits) change on the last run.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lm_ce.config.protocols import PROTOCOLS, WINDOW_FIELDS, protocol_values
from lm_ce.config.values import coerce
from lm_ce.errors import UsageError

RUN_FACTORS = ("detokenizer", "window_length", "stride", "prefix_token", "join", "bos_sink", "chunk_selection")
FACTORS = (*RUN_FACTORS, "unit", "log_base")
METRICS = {"perplexity": ("tokens", "exp"), "mean_loss": ("tokens", "nats"), "bits_per_token": ("tokens", "bits"),
           "word_perplexity": ("words", "exp"), "byte_perplexity": ("bytes", "exp"), "bits_per_byte": ("bytes", "bits")}
CHUNKED = ("llama-cpp", "gptq")


@dataclass(frozen=True)
class Endpoint:
    """One end of the chain: a protocol by name, and window fields set otherwise (`--from lm-eval,max_length=512`)."""

    protocol: str
    overrides: dict

    @classmethod
    def parse(cls, text: str, flag: str) -> Endpoint:
        name, *items = [part.strip() for part in text.split(",")]
        if name not in PROTOCOLS:
            raise UsageError(f"{flag} {text!r}: '{name}' is no protocol; choose one of {', '.join(PROTOCOLS)}, "
                             "optionally followed by window fields (lm-eval,max_length=512)")
        overrides = {}
        for item in items:
            key, eq, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or key not in WINDOW_FIELDS:
                raise UsageError(f"{flag} {text!r}: '{item}' is not FIELD=VALUE of a window field ({', '.join(WINDOW_FIELDS)})")
            overrides[key] = coerce(key, value, flag)
        return cls(name, overrides)

    def fields(self) -> dict:
        """The window fields of this end's run: its protocol's, then the overrides."""
        return {**{k: protocol_values(self.protocol)[k] for k in WINDOW_FIELDS}, **self.overrides}

    @property
    def label(self) -> str:
        return self.protocol + "".join(f",{k}={v}" for k, v in self.overrides.items())


@dataclass(frozen=True)
class Point:
    """The coordinates of a run state. Joined states of a chunk protocol carry its stream equivalent."""

    joined: bool
    max_length: int
    stride: int
    doc_prefix: str  # document mode's --prefix-token (auto, bos, eos, none)
    stream_prefix: str  # a joined stream's first token (none, bos, eos)
    sink: bool  # the prefix token at every window's first input (--bos-policy every-window)
    detokenizer: str
    separator: str
    chunk: str | None  # "gptq" or "llama-cpp": the chunk protocol's subset of the stream; None: all of it
    chunks: int | None

    def fields(self) -> dict:
        """This state's window fields (a Config's)."""
        out = {"detokenizer": self.detokenizer, "separator": self.separator, "max_length": self.max_length}
        if self.chunk:
            return {**out, "mode": self.chunk, "stride": None, "prefix_token": "auto", "bos_policy": "first",
                    "chunks": self.chunks}
        if not self.joined:
            return {**out, "mode": "document", "stride": self.stride, "prefix_token": self.doc_prefix,
                    "bos_policy": "first", "chunks": None}
        return {**out, "mode": "stream", "stride": self.stride, "prefix_token": self.stream_prefix,
                "bos_policy": "every-window" if self.sink else "first", "chunks": None}


def half(length: int) -> int:
    return max(1, length // 2)


def point_of(end: Endpoint, default_length: int, adds_bos: bool) -> Point:
    """An endpoint's coordinates (the model's default window length and whether its tokenizer adds BOS known)."""
    f = end.fields()
    length = f["max_length"] or default_length
    mode = f["mode"]
    if mode in CHUNKED:
        prefix = "bos" if adds_bos else "none"
        stride = length if mode == "gptq" else half(length)
        return Point(True, length, stride, "none", prefix, mode == "llama-cpp" and adds_bos, f["detokenizer"],
                     f["separator"], mode, f["chunks"])
    stride = f["stride"] or (half(length) if PROTOCOLS[end.protocol].half_stride else length)
    if f["bos_policy"] == "every-window" and mode == "document":
        raise UsageError(f"explain {end.label}: --bos-policy every-window in document mode is not a state explain "
                         "moves through; explain it against lm-eval with that field instead of away from it")
    prefix = "none" if f["bos_policy"] == "none" else f["prefix_token"]
    if mode == "document":
        return Point(False, length, stride, prefix, "none", False, f["detokenizer"], f["separator"], None, None)
    stream_prefix = "none" if prefix == "auto" else prefix
    return Point(True, length, stride, "none", stream_prefix, f["bos_policy"] == "every-window", f["detokenizer"],
                 f["separator"], None, None)


def joined_ends(start: Point, end: Point) -> tuple[Point, Point]:
    """The coordinates an end does not have taken from the other end: a document end gets the other's stream
    prefix and separator (so `join` changes only the join), never a sink."""
    def fill(p: Point, other: Point) -> Point:
        if p.joined or not other.joined:
            return p
        return dataclasses.replace(p, stream_prefix=other.stream_prefix, separator=other.separator)

    if start.joined and end.joined and start.separator != end.separator:
        raise UsageError(f"the two protocols join documents with different separators ({start.separator!r}, "
                         f"{end.separator!r}): explain needs one separator")
    return fill(start, end), fill(end, start)


def scaled_stride(stride: int, old: int, new: int) -> int:
    """The stride kept in proportion to a new window length: max_length stays max_length, half stays half."""
    if stride == old:
        return new
    if stride == half(old):
        return half(new)
    return min(stride, new)


def apply(factor: str, p: Point, end: Point) -> Point:
    """The state after changing one factor of `p` to the end's value."""
    r = dataclasses.replace
    if factor == "detokenizer":
        return r(p, detokenizer=end.detokenizer)
    if factor == "window_length":
        return r(p, max_length=end.max_length, stride=scaled_stride(p.stride, p.max_length, end.max_length))
    if factor == "stride":
        target = p.max_length if end.stride == end.max_length else half(p.max_length) if end.stride == half(
            end.max_length) else min(end.stride, p.max_length)
        return r(p, stride=target)
    if factor == "prefix_token":
        return r(p, doc_prefix=end.doc_prefix, stream_prefix=end.stream_prefix)
    if factor == "join":
        return r(p, joined=end.joined)
    if factor == "bos_sink":
        return r(p, sink=end.sink)
    return r(p, chunk=end.chunk, chunks=end.chunks)


def differing(start: Point, end: Point) -> list[str]:
    """The run factors whose value differs between the two ends, in RUN_FACTORS order."""
    out = []
    for factor in RUN_FACTORS:
        moved = apply(factor, start, end)
        if factor == "stride":
            changed = scaled_stride(start.stride, start.max_length, end.max_length) != end.stride
        else:
            changed = moved != start
        if changed:
            out.append(factor)
    return out


@dataclass(frozen=True)
class State:
    """One state of the chain: a run (its coordinates) measured in a metric; a transformation re-measures the
    previous run in another unit or form."""

    factor: str | None  # the factor this step changed (None: the start)
    kind: str  # "run" or "transformation"
    point: Point
    metric: str
    endpoint: Endpoint | None = None  # the protocol by name this run is (the start, the end), else None


def metric_of(unit: str, form: str) -> str | None:
    return next((m for m, uf in METRICS.items() if uf == (unit, form)), None)


def rank(p: Point) -> int:
    """How far a state is from a document run: 0 document, 1 stream, 2 chunks."""
    return 2 if p.chunk else 1 if p.joined else 0


def default_order(start: Point, end: Point, metrics: tuple[str, str]) -> list[str]:
    """The run factors that differ, from the document side to the chunk side (reversed when the start is the more
    chunked), then the unit and the form, in the order that keeps every intermediate metric one that exists."""
    runs = differing(start, end)
    if rank(start) > rank(end):
        runs.reverse()
    (u0, f0), (u1, f1) = METRICS[metrics[0]], METRICS[metrics[1]]
    if u0 == u1:
        return runs + (["log_base"] if f0 != f1 else [])
    if f0 == f1:
        return [*runs, "unit"]
    return [*runs, "unit", "log_base"] if metric_of(u1, f0) else [*runs, "log_base", "unit"]


def plan(start: Endpoint, end: Endpoint, *, default_length: int, adds_bos: bool, metrics: tuple[str, str],
         order: list[str] | None = None) -> tuple[list[State], list[str]]:
    """(the states from start to end, the order used); an order that cannot be followed is refused naming why."""
    a, b = joined_ends(point_of(start, default_length, adds_bos), point_of(end, default_length, adds_bos))
    if a.chunk and b.chunk and (a.chunk, a.max_length, a.chunks) != (b.chunk, b.max_length, b.chunks):
        raise UsageError(f"explain {start.label} -> {end.label}: both ends cut chunks; explain each against a stream "
                         "protocol (hf-docs) instead, one chain each")
    wanted = default_order(a, b, metrics)
    if order is not None:
        unknown = [f for f in order if f not in FACTORS]
        if unknown or len(set(order)) != len(order):
            raise UsageError(f"--order {','.join(order)}: give each factor once, from {', '.join(FACTORS)}")
        missing = [f for f in wanted if f not in order]
        if missing:
            raise UsageError(f"--order {','.join(order)} leaves out {', '.join(missing)}, which differ between "
                             f"{start.label} and {end.label}; name every factor that differs: {','.join(wanted)}")
        wanted = [f for f in order if f in wanted]
    states = [State(None, "run", a, metrics[0], start)]
    unit, form = METRICS[metrics[0]]
    for factor in wanted:
        prev = states[-1]
        if factor in ("unit", "log_base"):
            unit, form = (METRICS[metrics[1]][0], form) if factor == "unit" else (unit, METRICS[metrics[1]][1])
            metric = metric_of(unit, form)
            if metric is None:
                raise UsageError(f"--order: {factor} here would measure in {unit} as {form}, which no metric is; put "
                                 f"{'log_base' if factor == 'unit' else 'unit'} before it")
            states.append(State(factor, "transformation", prev.point, metric))
            continue
        point = apply(factor, prev.point, b)
        check_state(factor, prev.point, point, a if a.chunk else b)
        states.append(State(factor, "run", point, metric_of(unit, form)))
    last_run = max(i for i, s in enumerate(states) if s.kind == "run")
    if states[last_run].point != b:  # never, by construction: every differing factor was applied
        raise AssertionError("explain's chain does not reach its end")
    if last_run:
        states[last_run] = dataclasses.replace(states[last_run], endpoint=end)
    return states, wanted


def check_state(factor: str, before: Point, after: Point, chunked: Point) -> None:
    """Refuse a step that changes nothing in its state, or reaches a state no configuration is."""
    if before.fields() == after.fields():
        where = "a joined stream" if before.joined else "document mode"
        raise UsageError(f"--order: {factor} changes nothing in {where} at this point; move it "
                         f"{'before' if before.joined else 'after'} join")
    if after.sink and (not after.joined or after.stream_prefix == "none"):
        raise UsageError(f"--order: bos_sink puts the prefix token at every window of a joined stream; put it after "
                         f"join and prefix_token (the state is {'not joined' if not after.joined else 'without prefix'})")
    if after.chunk:
        keys = ("joined", "max_length", "stride", "stream_prefix", "sink", "detokenizer")
        differ = [k for k in keys if getattr(after, k) != getattr(chunked, k)]
        if differ:
            raise UsageError(f"--order: chunk_selection needs the stream that {after.chunk}'s chunks are a subset of; "
                             f"this state differs in {', '.join(differ)}: put chunk_selection after the factors that "
                             "set them")
