"""The documents of highest and lowest mean loss, kept with their scored tokens as the run goes (results.html).

At each chunk's end the candidates are the documents kept so far and the chunk's own; the tokens of those that
do not make either list are dropped. Memory and the saved state hold at most 2 x count documents, each with at
most SHOWN_TOKENS tokens, whatever the size of the corpus.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

SHOWN_TOKENS = 2000  # tokens kept (and shown) per document: its first scored ones


@dataclass
class ShownDocument:
    """One kept document: its figures (those of its documents.jsonl row) and its first scored tokens."""

    index: int
    id: str | None
    group: str | None
    tokens: int  # all its scored tokens
    nll_sum: float
    text: list[str] = field(default_factory=list)  # each token's share of the text ("": bytes of a split character)
    nll: list[float] = field(default_factory=list)  # each shown token's loss (nats)
    top1: list[str] = field(default_factory=list)  # the model's most likely token there (decoded)

    @property
    def mean_loss(self) -> float:
        return self.nll_sum / self.tokens


@dataclass
class Extremes:
    """The `count` documents of highest and of lowest mean loss so far (ties: the earlier document)."""

    count: int
    kept: dict[int, ShownDocument] = field(default_factory=dict)
    lost: str | None = None  # why no document can be shown (a run resumed from a state saved without them)

    def highest(self) -> list[ShownDocument]:
        return sorted(self.kept.values(), key=lambda d: (-d.mean_loss, d.index))[: self.count]

    def lowest(self) -> list[ShownDocument]:
        return sorted(self.kept.values(), key=lambda d: (d.mean_loss, d.index))[: self.count]

    def keep(self, rows: Iterable, tokens_of: Callable[[set[int]], dict | None]) -> None:
        """Add a finished chunk: `rows` its documents.jsonl rows (DocumentResult), `tokens_of(indices)` the token
        columns (outputs.token_table) of those documents, asked for only those that enter a list."""
        if self.lost is not None or self.count < 1:
            return
        new = {r.index: ShownDocument(r.index, r.id, r.group, r.tokens, r.nll_sum) for r in rows if r.tokens > 0}
        if not new:
            return
        self.kept.update(new)
        chosen = {d.index for d in self.highest() + self.lowest()}
        self.kept = {i: d for i, d in self.kept.items() if i in chosen}
        entering = {i for i in new if i in chosen}
        columns = tokens_of(entering) if entering else None
        if columns:
            for doc, text, nll, top1 in zip(columns["doc"], columns["token"], columns["nll"], columns["top1"]):
                d = self.kept[doc]
                if len(d.text) < SHOWN_TOKENS:
                    d.text.append(text)
                    d.nll.append(float(nll))
                    d.top1.append(top1)

    def resumed(self, count: int) -> Extremes:
        """These saved extremes for a resumed run that asks for `count` of each (fewer: the first ones)."""
        if self.lost is not None or count <= self.count:
            chosen = {d.index for d in self.highest()[:count] + self.lowest()[:count]}
            return Extremes(count, {i: d for i, d in self.kept.items() if i in chosen}, self.lost)
        return Extremes(count, lost=f"the saved run kept {self.count} documents of each kind, fewer than the "
                                    f"{count} asked for now; rerun without --resume to see them")

    @classmethod
    def merged(cls, parts: list[Extremes | None]) -> Extremes | None:
        """The extremes of shards' runs together (None when no shard kept any)."""
        if all(p is None for p in parts):
            return None
        if any(p is None or p.lost for p in parts):
            return cls(0, lost="a shard was run without results.html's documents (or lost them on --resume)")
        out = cls(min(p.count for p in parts))
        for p in parts:
            out.kept.update(p.kept)
        chosen = {d.index for d in out.highest() + out.lowest()}
        out.kept = {i: d for i, d in out.kept.items() if i in chosen}
        return out


def for_resumed_run(saved: Extremes | None, count: int, started: bool) -> Extremes:
    """What a resumed run keeps: the saved extremes, or (`started`: the saved run scored tokens without keeping
    any) a note that its documents cannot be shown; never documents that would miss tokens."""
    if saved is not None:
        return saved.resumed(count)
    if started:
        return Extremes(count, lost="the run was resumed from a state saved without results.html's documents "
                                    "(an older version, or --no-page); rerun without --resume to see them")
    return Extremes(count)
