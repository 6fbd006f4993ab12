"""The records a run fills: per-document results, exact sums per document and per window, and the run itself.

Sums are float64 (per-token losses are float32), counts are integers. A `Tally` is what one process
accumulates over one chunk; tallies merge, in rank order, into the run's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import stats


@dataclass
class DocumentResult:
    """One row of documents.jsonl."""

    index: int
    id: str | None = None
    group: str | None = None
    tokens: int = 0
    nll_sum: float = 0.0
    bytes: int = 0
    words: int = 0
    windows: int = 0
    skipped: str | None = None  # why nothing was scored: "empty" (no targets) or "not_text"


@dataclass
class DocSums:
    """Exact sums of one document's scored tokens."""

    nll: float = 0.0  # float64 sum of per-token NLL
    tokens: int = 0
    sum_sq: float = 0.0  # float64 sum of squared per-token NLL (the per-token stderr)

    def add(self, other: DocSums) -> None:
        self.nll += other.nll
        self.tokens += other.tokens
        self.sum_sq += other.sum_sq


@dataclass(frozen=True)
class WindowSums:
    """One window's NLL: the clusters of a single stream's stderr, and the canonical order of the sums."""

    doc: int
    first_target: int  # the document's target index of the window's first scored token
    nll: float
    tokens: int


@dataclass
class Tally:
    """What scoring accumulates; one per process per chunk, merged into the run's."""

    docs: dict[int, DocSums] = field(default_factory=dict)
    windows: list[WindowSums] = field(default_factory=list)
    positions: stats.PositionLoss | None = None
    compares: list = field(default_factory=list)  # divergence.Divergence per --compare-to model
    token_blocks: list[dict] = field(default_factory=list)  # per batch: column -> tensor (with --save-tokens)
    padding: int = 0
    inputs: int = 0
    batches_done: list[int] = field(default_factory=list)  # global batch ids of the current chunk

    def doc(self, index: int) -> DocSums:
        """The sums of document `index`, created empty on first use."""
        return self.docs.setdefault(index, DocSums())

    @property
    def tokens(self) -> int:
        return sum(d.tokens for d in self.docs.values())

    def merge(self, other: Tally) -> None:
        for index, sums in other.docs.items():
            self.doc(index).add(sums)
        self.windows += other.windows
        if other.positions is not None:
            if self.positions is None:
                self.positions = stats.PositionLoss.zeros(len(other.positions.nll))
            self.positions.nll += other.positions.nll
            self.positions.count += other.positions.count
        for mine, theirs in zip(self.compares, other.compares):
            mine.merge(theirs)
        self.token_blocks += other.token_blocks
        self.padding += other.padding
        self.inputs += other.inputs
        self.batches_done += other.batches_done


@dataclass
class Run:
    """Everything a run has computed so far: what the state file holds and the reports are made from."""

    documents: list[DocumentResult] = field(default_factory=list)  # of finished chunks
    tally: Tally = field(default_factory=Tally)  # merged sums of finished chunks
    chunks_done: int = 0
    partial: Tally | None = None  # the current chunk's merged sums, when stopped inside it
    windows: int = 0
    stream_bytes: int = 0
    stream_words: int = 0  # llama-cpp and gptq modes: words of the scored spans
    doubled_prefix: int = 0  # texts whose own leading BOS/EOS duplicated the prefix token (removed)
    tokens_per_process: list[int] = field(default_factory=list)


@dataclass
class Results:
    """What `evaluate` returns: the summary (results.json) and the breakdowns the reports write."""

    summary: dict  # summary.Summary: what results.json holds
    documents: list[DocumentResult] = field(default_factory=list)
    positions: stats.PositionLoss | None = None
    token_table: dict[str, list] | None = None  # column -> values, document order (with --save-tokens)
    parts: dict[str, Results] = field(default_factory=dict)  # a suite: each dataset's own results, by name
