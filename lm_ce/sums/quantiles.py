"""Percentiles of a stream of values in bounded memory, mergeable across processes and resumable.

Up to `exact_cap` values are kept as float32 and the percentiles are numpy.percentile's own (linear
interpolation). Beyond that, a deterministic compactor sketch: level h holds values of weight 2**h;
when a level outgrows `k` values it is sorted and every other value moves up with twice the weight.
One such step at level h moves any rank by at most 2**h, so the sketch adds up these weights and
states its own worst-case rank error (`rank_error`, in values; per level it stays below count / k).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

EXACT_CAP = 2**24  # values kept exactly: 64 MiB of float32
SKETCH_K = 2**15  # values per level once sketching: rank error below (levels) / SKETCH_K of the count


@dataclass
class Quantiles:
    """Float32 values for percentiles: exact up to `exact_cap`, then a compactor sketch."""

    exact_cap: int = EXACT_CAP
    k: int = SKETCH_K
    levels: list = field(default_factory=lambda: [[]])  # level h: float32 arrays whose values weigh 2**h
    count: int = 0
    rank_error: int = 0  # worst-case error, in values, of any rank answered (0: exact)
    low: float = math.inf
    high: float = -math.inf
    turns: list = field(default_factory=list)  # per level: compactions so far (alternates which half moves up)

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float32).ravel()
        if not values.size:
            return
        self.levels[0].append(values.copy())
        self.count += values.size
        self.low, self.high = min(self.low, float(values.min())), max(self.high, float(values.max()))
        self._tidy()

    def merge(self, other: "Quantiles") -> None:
        if (other.exact_cap, other.k) != (self.exact_cap, self.k):
            raise ValueError("cannot merge quantile sketches of different sizes")
        for h, arrays in enumerate(other.levels):
            if h == len(self.levels):
                self.levels.append([])
            self.levels[h] += [a.copy() for a in arrays]
        self.count += other.count
        self.rank_error += other.rank_error
        self.low, self.high = min(self.low, other.low), max(self.high, other.high)
        self._tidy()

    @property
    def exact(self) -> bool:
        return self.rank_error == 0 and self.count <= self.exact_cap

    def _tidy(self) -> None:
        """Join small arrays; beyond the exact cap, compact every level that outgrew k values."""
        if len(self.levels[0]) > 64:
            self.levels[0] = [np.concatenate(self.levels[0])]
        if self.count <= self.exact_cap:
            return
        h = 0
        while h < len(self.levels):
            values = np.concatenate(self.levels[h]) if self.levels[h] else np.zeros(0, np.float32)
            if values.size <= self.k:
                self.levels[h] = [values]
                h += 1
                continue
            values.sort()
            keep = values[-1:] if values.size % 2 else values[:0]  # an odd value out stays at this level
            pairs = values[: values.size - keep.size]
            while len(self.turns) <= h:
                self.turns.append(0)
            up = pairs[self.turns[h] % 2 :: 2]
            self.turns[h] += 1
            self.rank_error += 2**h
            self.levels[h] = [keep.copy()]
            if h + 1 == len(self.levels):
                self.levels.append([])
            self.levels[h + 1].append(up.copy())
            h += 1

    def percentiles(self, qs: list[float]) -> list[float]:
        """numpy.percentile(values, q) for each q (linear interpolation); within `rank_error` ranks once sketched."""
        if not self.count:
            return [math.nan for _ in qs]
        if self.exact:
            values = np.concatenate(self.levels[0]).astype(np.float64)
            return [float(v) for v in np.percentile(values, qs)]
        values = np.concatenate([a for arrays in self.levels for a in arrays]).astype(np.float64)
        weights = np.concatenate([np.full(a.size, 2**h, np.int64) for h, arrays in enumerate(self.levels) for a in arrays])
        order = np.argsort(values, kind="stable")
        values, ends = values[order], np.cumsum(weights[order])

        def at(rank: int) -> float:  # the value of 0-based rank `rank`
            return float(values[min(np.searchsorted(ends, rank, side="right"), values.size - 1)])

        out = []
        for q in qs:
            if q <= 0 or q >= 100:
                out.append(self.low if q <= 0 else self.high)
                continue
            position = q / 100 * (self.count - 1)
            i = math.floor(position)
            lo, hi = at(i), at(min(i + 1, self.count - 1))
            out.append(lo + (position - i) * (hi - lo))
        return out
