"""The records a run fills: per-document results, exact sums per document and per window, and the run itself.

Sums are float64 (per-token losses are float32), counts are integers. A `Tally` is what one process
accumulates over one chunk; tallies merge, in rank order, into the chunk's. A finished chunk is folded
into the run's running sums (`RowSums`, `TokenSums`) and its rows are written out, so a run's memory
and its saved state do not grow with the number of documents.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from lm_ce.sums import stats
from lm_ce.sums.extremes import Extremes
from lm_ce.sums.signals import Signals, SignalSums, TokenSignals
from lm_ce.sums.tasks import ChoiceRow, ChoiceSums, SurprisalRow, SurprisalSums


@dataclass
class KeyTokens:
    """One document's LongPPL sums: the evaluated model's NLL over its key tokens, and how many there are."""

    nll_sum: float = 0.0
    key_tokens: int = 0

    @property
    def perplexity(self) -> float | None:
        return math.exp(self.nll_sum / self.key_tokens) if self.key_tokens else None


@dataclass
class KeySums:
    """Running sums over finished documents, for results.json's `longppl` (and each group's)."""

    documents: int = 0
    tokens: int = 0  # the run's scored tokens of those documents: key_fraction's denominator
    key_tokens: int = 0
    nll: stats.ExactSum = field(default_factory=stats.ExactSum)

    def add(self, keys: KeyTokens, tokens: int) -> None:
        self.documents += 1
        self.tokens += tokens
        self.key_tokens += keys.key_tokens
        self.nll.add(keys.nll_sum)

    def merge(self, other: KeySums) -> None:
        self.documents += other.documents
        self.tokens += other.tokens
        self.key_tokens += other.key_tokens
        self.nll.merge(other.nll)

    def figures(self) -> dict:
        """{perplexity (None without key tokens), key_tokens, key_fraction, nll_sum, tokens, documents}."""
        nll = self.nll.value
        return {"perplexity": math.exp(nll / self.key_tokens) if self.key_tokens else None,
                "key_tokens": self.key_tokens, "key_fraction": self.key_tokens / self.tokens if self.tokens else None,
                "nll_sum": nll, "tokens": self.tokens, "documents": self.documents}


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
    signals: Signals | None = None  # with --min-k: written as the row's min_k, min_k_plus_plus, zlib_ratio
    longppl: KeyTokens | None = None  # with --longppl-evaluator: written as longppl, longppl_key_tokens, longppl_nll_sum
    task: ChoiceRow | SurprisalRow | None = None  # --task multiple-choice or surprisal: the item's or document's fields


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
    signals: TokenSignals | None = None  # per-token (lp, z) of the chunk's documents (with --min-k)

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
        if other.signals is not None:
            self.signals = self.signals or TokenSignals()
            self.signals.merge(other.signals)


@dataclass
class TokenSums:
    """Running sums of the scored tokens of finished chunks: totals, and the windows as clusters."""

    tokens: int = 0
    nll: stats.ExactSum = field(default_factory=stats.ExactSum)
    sum_sq: stats.ExactSum = field(default_factory=stats.ExactSum)
    by_window: stats.Clustered = field(default_factory=stats.Clustered)

    def add(self, tally: Tally) -> None:
        """Add a chunk's per-document sums and its windows."""
        for sums in tally.docs.values():
            self.tokens += sums.tokens
            self.nll.add(sums.nll)
            self.sum_sq.add(sums.sum_sq)
        for w in tally.windows:
            self.by_window.add(w.nll, w.tokens)

    def merge(self, other: TokenSums) -> None:
        self.tokens += other.tokens
        self.nll.merge(other.nll)
        self.sum_sq.merge(other.sum_sq)
        self.by_window.merge(other.by_window)


@dataclass
class RowSums:
    """Running sums of finished documents.jsonl rows: counts, documents as clusters, and groups."""

    rows: int = 0
    documents: int = 0  # scored
    not_text: int = 0
    bytes: int = 0
    words: int = 0
    by_document: stats.Clustered = field(default_factory=stats.Clustered)
    groups: dict[str, stats.GroupSums] = field(default_factory=dict)
    signals: dict[str | None, SignalSums] | None = None  # --min-k: None -> the run's, group -> the group's
    longppl: dict[str | None, KeySums] | None = None  # --longppl-evaluator: None -> the run's, group -> the group's

    @property
    def skipped(self) -> int:
        return self.rows - self.documents

    def add(self, d: DocumentResult) -> None:
        self.rows += 1
        if d.skipped:
            self.not_text += d.skipped == "not_text"
            return
        self.documents += 1
        self.bytes += d.bytes
        self.words += d.words
        self.by_document.add(d.nll_sum, d.tokens)
        stats.add_to_groups(self.groups, d)
        if d.signals is not None:
            self.signals = self.signals or {}
            self.signals.setdefault(None, SignalSums()).add(d.signals)
            self.signals.setdefault(stats.NULL_GROUP if d.group is None else d.group, SignalSums()).add(d.signals)
        if d.longppl is not None:
            self.longppl = self.longppl or {}
            for name in (None, stats.NULL_GROUP if d.group is None else d.group):
                self.longppl.setdefault(name, KeySums()).add(d.longppl, d.tokens)

    def merge(self, other: RowSums) -> None:
        self.rows += other.rows
        self.documents += other.documents
        self.not_text += other.not_text
        self.bytes += other.bytes
        self.words += other.words
        self.by_document.merge(other.by_document)
        for name, g in other.groups.items():
            self.groups.setdefault(name, stats.GroupSums()).merge(g)
        for name, sums in (other.signals or {}).items():
            self.signals = self.signals or {}
            self.signals.setdefault(name, SignalSums()).merge(sums)
        for name, sums in (other.longppl or {}).items():
            self.longppl = self.longppl or {}
            self.longppl.setdefault(name, KeySums()).merge(sums)


@dataclass
class CurveSums:
    """--context-curve's running sums over the chunks it has finished: per context length, the NLL and count of
    the same targets (exact sums: shards' curves add up to one run's)."""

    lengths: list[int]
    strides: list[int]
    nll: list[stats.ExactSum]
    tokens: list[int]
    documents: int = 0  # documents with at least one target
    chunks_done: int = 0  # chunks of this run's documents (a shard's own) whose targets are in the sums
    seconds: float = 0.0
    done: bool = False  # every chunk scored

    @classmethod
    def empty(cls, lengths: list[int], strides: list[int]) -> CurveSums:
        return cls(list(lengths), list(strides), [stats.ExactSum() for _ in lengths], [0] * len(lengths))

    def merge(self, other: CurveSums) -> None:
        for mine, theirs in zip(self.nll, other.nll):
            mine.merge(theirs)
        self.tokens = [a + b for a, b in zip(self.tokens, other.tokens)]
        self.documents += other.documents
        self.chunks_done += other.chunks_done
        self.seconds += other.seconds
        self.done = self.done and other.done


@dataclass
class Run:
    """Everything a run has computed so far, as running sums: what the state file holds and the reports are made
    from. The rows themselves are in documents.jsonl (`rows_offset` bytes of it are this run's finished chunks)."""

    rows: RowSums = field(default_factory=RowSums)  # of finished chunks (a joined pass: of all its documents)
    sums: TokenSums = field(default_factory=TokenSums)  # of finished chunks
    tally: Tally = field(default_factory=Tally)  # run-wide accumulators of finished chunks (positions, compares, ...)
    chunks_done: int = 0
    partial: Tally | None = None  # the current chunk's merged sums, when stopped inside it
    windows: int = 0
    stream_bytes: int = 0
    stream_words: int = 0  # llama-cpp and gptq modes: words of the scored spans
    doubled_prefix: int = 0  # texts whose own leading BOS/EOS duplicated the prefix token (removed)
    tokens_per_process: list[int] = field(default_factory=list)
    rows_offset: int = 0  # bytes of documents.jsonl holding the rows of the finished chunks
    rows_sha256: str | None = None  # the sha256 of those bytes (checked by a resume and by lm-ce merge)
    shard: str | None = None  # "K/N" when this run scores one shard of the documents
    extremes: Extremes | None = None  # results.html's documents of highest and lowest loss, with their tokens
    passes_done: bool = False  # the pass over the data is finished (a stop after it was in --context-curve)
    curve: CurveSums | None = None  # --context-curve's sums so far
    task: ChoiceSums | SurprisalSums | None = None  # --task multiple-choice or surprisal: of the finished chunks

    @property
    def tokens(self) -> int:
        """Tokens scored so far, the stopped chunk's included."""
        return self.sums.tokens + (self.partial.tokens if self.partial is not None else 0)


@dataclass
class Results:
    """What `evaluate` returns: the summary (results.json) and the breakdowns the reports write.

    Attributes:
        summary: exactly the keys of results.json (`reports.summary.Summary`).
        documents: one `DocumentResult` per document in document mode (documents.jsonl's rows): a list, or the
            written documents.jsonl read on use.
        positions: the loss by position in the window (sums and counts), as plotted in position_loss.png.
        token_table: with `save_tokens`, column -> values of every scored token in memory (tokens.parquet's columns).
        parts: a suite: each dataset's own `Results`, by its name.
        token_files: tokens.parquet's parts on disk, in document order (`save_tokens` with an output directory).
        joined_tokens: those parts already joined into one file, renamed to tokens.parquet when written.
        extremes: the documents of highest and lowest loss that results.html shows.
        byte_heatmaps: a compared model of another tokenizer -> the documents of largest gap byte by byte.
        tables: a task's tables in memory (`"words"`, `"sentences"` -> columns).
        table_files: those tables' parts on disk, in order.
    """

    summary: dict  # summary.Summary: what results.json holds
    documents: Sequence[DocumentResult] = field(default_factory=list)  # a list, or documents.jsonl read on use
    positions: stats.PositionLoss | None = None
    token_table: dict[str, list] | None = None  # column -> values, document order (with --save-tokens, in memory)
    parts: dict[str, Results] = field(default_factory=dict)  # a suite: each dataset's own results, by name
    token_files: list[str] = field(default_factory=list)  # tokens.parquet's parts, in document order (--save-tokens)
    joined_tokens: str | None = None  # those parts already joined into one file, renamed to tokens.parquet
    extremes: Extremes | None = None  # results.html's documents of highest and lowest loss
    byte_heatmaps: dict[str, list] = field(default_factory=dict)  # --compare-to model -> bytegap.Shown (results.html)
    tables: dict[str, dict[str, list]] = field(default_factory=dict)  # a task's tables in memory: "words" -> columns
    table_files: dict[str, list[str]] = field(default_factory=dict)  # their parts on disk (NAME.parquet's), in order
