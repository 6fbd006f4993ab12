"""What a run accumulates beyond the totals, and the statistics made from it.

- Uncertainty: the standard error of the mean loss over clusters (documents, or windows when there
  is a single stream), because tokens of one document are correlated and a per-token standard
  error would look tighter than the evidence allows.
- Loss by position in the window, and per group. (Model against model, with --compare-to, is in
  lm_ce.divergence.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

Z95 = 1.959963984540054


@dataclass
class Clustered:
    """Exact sums per cluster: enough for the mean and its cluster-robust standard error."""

    nll: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def uncertainty(clusters: Clustered, sum_sq: float, unit: str) -> dict:
    """Standard error of the ratio mean sum(nll)/sum(tokens) over clusters, and 95% intervals.

    SE^2 = C/(C-1) * sum_c (nll_c - mean * n_c)^2 / N^2 (the linearized ratio estimator, as for
    clustered samples). `stderr_iid` treats tokens as independent, for comparison only."""
    n_clusters = sum(1 for t in clusters.tokens if t)
    total = sum(clusters.tokens)
    if total == 0:
        return {"unit": unit, "clusters": 0}
    mean = math.fsum(clusters.nll) / total
    out: dict = {"unit": unit, "clusters": n_clusters}
    if n_clusters >= 2:
        dev = math.fsum((s - mean * n) ** 2 for s, n in zip(clusters.nll, clusters.tokens) if n)
        se = math.sqrt(n_clusters / (n_clusters - 1) * dev) / total
        out.update(
            mean_loss_stderr=se,
            mean_loss_ci95=[mean - Z95 * se, mean + Z95 * se],
            perplexity_ci95=[math.exp(mean - Z95 * se), exp_capped(mean + Z95 * se)],
        )
    if total >= 2:
        var = max(0.0, (sum_sq - total * mean * mean) / (total - 1))
        out["mean_loss_stderr_iid"] = math.sqrt(var / total)
    return out


def exp_capped(x: float) -> float:
    """exp(x), or inf where float64 would overflow (a perplexity beyond any meaning, not an error)."""
    return math.exp(x) if x < 700 else math.inf


@dataclass
class PositionLoss:
    """Sums and counts of the loss by the position in the window that made the prediction."""

    nll: torch.Tensor  # float64 [max_length]
    count: torch.Tensor  # int64 [max_length]

    @classmethod
    def zeros(cls, max_length: int) -> "PositionLoss":
        return cls(torch.zeros(max_length, dtype=torch.float64), torch.zeros(max_length, dtype=torch.long))

    def add(self, positions: torch.Tensor, nll: torch.Tensor) -> None:
        self.nll.index_add_(0, positions, nll.double())
        self.count.index_add_(0, positions, torch.ones_like(positions))

    def buckets(self) -> list[dict]:
        """Mean loss over positions [lo, hi) in powers of two: 0, 1, 2-3, 4-7, ..."""
        rows, lo = [], 0
        while lo < len(self.count):
            hi = min(len(self.count), max(1, 2 * lo))
            n = int(self.count[lo:hi].sum())
            if n:
                mean = float(self.nll[lo:hi].sum()) / n
                rows.append({"positions": [lo, hi - 1], "tokens": n, "mean_loss": mean, "perplexity": exp_capped(mean)})
            lo = hi
        return rows


NULL_GROUP = "(null)"  # the group of documents whose group field is null or missing


def groups(documents, ln2: float = math.log(2)) -> dict:
    """One row per value of the group field: documents, tokens, bytes, mean loss, perplexity, bits per byte.

    Documents without a value are counted under NULL_GROUP, so the groups add up to the totals.
    """
    out: dict = {}
    for d in documents:
        if d.skipped:
            continue
        g = out.setdefault(NULL_GROUP if d.group is None else d.group, {"documents": 0, "tokens": 0, "bytes": 0, "nll_sum": 0.0})
        g["documents"] += 1
        g["tokens"] += d.tokens
        g["bytes"] += d.bytes
        g["nll_sum"] += d.nll_sum
    for g in out.values():
        g["mean_loss"] = g["nll_sum"] / g["tokens"]
        g["perplexity"] = exp_capped(g["mean_loss"])
        g["bits_per_byte"] = g["nll_sum"] / (g["bytes"] * ln2) if g["bytes"] else None
    return out
