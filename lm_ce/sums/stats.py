"""What a run accumulates beyond the totals, and the statistics made from it.

- Uncertainty: the standard error of the mean loss over clusters (documents, or windows when there
  is a single stream), because tokens of one document are correlated and a per-token standard
  error would look tighter than the evidence allows.
- Loss by position in the window, and per group. (Model against model, with --compare-to, is in
  lm_ce.sums.divergence.) Paired differences of two runs over the same clusters (lm-ce compare, --compare-to).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

Z95 = 1.959963984540054


@dataclass
class ExactSum:
    """A float64 sum kept exactly, as non-overlapping partials (Shewchuk's algorithm, as math.fsum): adding in any
    order, or merging sums made apart (shards, chunks), gives the same correctly rounded `value`."""

    partials: list[float] = field(default_factory=list)

    def add(self, x: float) -> None:
        partials, i = self.partials, 0
        for y in partials:
            if abs(x) < abs(y):
                x, y = y, x
            hi = x + y
            lo = y - (hi - x)
            if lo:
                partials[i] = lo
                i += 1
            x = hi
        partials[i:] = [x]

    def merge(self, other: "ExactSum") -> None:
        for x in other.partials:
            self.add(x)

    @property
    def value(self) -> float:
        return math.fsum(self.partials)


@dataclass
class Clustered:
    """Running sums over clusters (documents or windows) of n tokens with NLL y: the ratio mean and its
    cluster-robust standard error need only these, so memory does not grow with the number of clusters."""

    count: int = 0  # clusters with tokens
    tokens: int = 0  # sum n
    tokens_sq: int = 0  # sum n^2
    nll: ExactSum = field(default_factory=ExactSum)  # sum y
    nll_sq: ExactSum = field(default_factory=ExactSum)  # sum y^2
    nll_tokens: ExactSum = field(default_factory=ExactSum)  # sum n*y

    def add(self, nll: float, tokens: int) -> None:
        if not tokens:
            return
        self.count += 1
        self.tokens += tokens
        self.tokens_sq += tokens * tokens
        self.nll.add(nll)
        self.nll_sq.add(nll * nll)
        self.nll_tokens.add(nll * tokens)

    def merge(self, other: "Clustered") -> None:
        self.count += other.count
        self.tokens += other.tokens
        self.tokens_sq += other.tokens_sq
        self.nll.merge(other.nll)
        self.nll_sq.merge(other.nll_sq)
        self.nll_tokens.merge(other.nll_tokens)

    @classmethod
    def of(cls, nll: list[float], tokens: list[int]) -> "Clustered":
        """The sums of the clusters given as lists."""
        out = cls()
        for y, n in zip(nll, tokens):
            out.add(y, n)
        return out


def uncertainty(clusters: Clustered, sum_sq: float, unit: str) -> dict:
    """Standard error of the ratio mean sum(nll)/sum(tokens) over clusters, and 95% intervals.

    SE^2 = C/(C-1) * sum_c (nll_c - mean * n_c)^2 / N^2 (the linearized ratio estimator, as for
    clustered samples), the sum expanded into the running sums sum y^2 - 2 mean sum n*y + mean^2 sum n^2.
    `stderr_iid` treats tokens as independent, for comparison only."""
    n_clusters, total = clusters.count, clusters.tokens
    if total == 0:
        return {"unit": unit, "clusters": 0}
    mean = clusters.nll.value / total
    out: dict = {"unit": unit, "clusters": n_clusters}
    if n_clusters >= 2:
        terms = [*clusters.nll_sq.partials, *(-2 * mean * p for p in clusters.nll_tokens.partials),
                 mean * mean * clusters.tokens_sq]
        dev = max(0.0, math.fsum(terms))
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


@dataclass
class GroupSums:
    """Running sums of one group's scored documents."""

    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    nll: ExactSum = field(default_factory=ExactSum)

    def merge(self, other: "GroupSums") -> None:
        self.documents += other.documents
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.nll.merge(other.nll)


def add_to_groups(groups: dict[str, GroupSums], d) -> None:
    """Add one scored document (a records.DocumentResult) to its group's sums; documents without a value
    are counted under NULL_GROUP, so the groups add up to the totals."""
    g = groups.setdefault(NULL_GROUP if d.group is None else d.group, GroupSums())
    g.documents += 1
    g.tokens += d.tokens
    g.bytes += d.bytes
    g.nll.add(d.nll_sum)


def group_table(groups: dict[str, GroupSums], ln2: float = math.log(2)) -> dict:
    """One row per value of the group field: documents, tokens, bytes, mean loss, perplexity, bits per byte."""
    out: dict = {}
    for name, g in groups.items():
        nll = g.nll.value
        mean = nll / g.tokens
        out[name] = {"documents": g.documents, "tokens": g.tokens, "bytes": g.bytes, "nll_sum": nll, "mean_loss": mean,
                     "perplexity": exp_capped(mean), "bits_per_byte": nll / (g.bytes * ln2) if g.bytes else None}
    return out


def groups(documents) -> dict:
    """The group table of a list of documents (records.DocumentResult); skipped ones are not counted."""
    sums: dict[str, GroupSums] = {}
    for d in documents:
        if not d.skipped:
            add_to_groups(sums, d)
    return group_table(sums)


def paired(a: np.ndarray, b: np.ndarray, units: np.ndarray, scale: float = 1.0) -> dict:
    """B minus A per unit over clusters: value, the paired clustered standard error and a 95% interval."""
    d = (np.asarray(b, np.float64) - np.asarray(a, np.float64)) * scale
    units = np.asarray(units, np.float64)
    keep = units > 0
    d, units = d[keep], units[keep]
    total = units.sum()
    value = math.fsum(d) / total
    out = {"value": value, "stderr": None, "ci95": None, "clusters": int(keep.sum())}
    if len(d) >= 2:
        dev = d - value * units
        se = math.sqrt(len(d) / (len(d) - 1) * math.fsum(dev * dev)) / total
        out.update(stderr=se, ci95=[value - Z95 * se, value + Z95 * se])
    return out


def ratio_difference(y_i, n_i, y_j, n_j) -> dict:
    """Σy_j/Σn_j − Σy_i/Σn_i over the same clusters (each state's NLL y over its units n: tokens, words or bytes; a
    cluster a state lacks has y = n = 0 there) and its paired clustered standard error, linearized (delta method):
    z_c = (y_jc − v_j n_jc)/N_j − (y_ic − v_i n_ic)/N_i, SE² = C/(C−1) Σ_c z_c². With n_i = n_j it is `paired`."""
    y_i, n_i, y_j, n_j = (np.asarray(x, np.float64) for x in (y_i, n_i, y_j, n_j))
    big_i, big_j = math.fsum(n_i), math.fsum(n_j)
    v_i, v_j = math.fsum(y_i) / big_i, math.fsum(y_j) / big_j
    keep = (n_i > 0) | (n_j > 0) | (y_i != 0) | (y_j != 0)
    z = ((y_j - v_j * n_j) / big_j - (y_i - v_i * n_i) / big_i)[keep]
    c = len(z)
    se = math.sqrt(c / (c - 1) * math.fsum(z * z)) if c >= 2 else None
    return {"value": v_j - v_i, "stderr": se, "clusters": c}
