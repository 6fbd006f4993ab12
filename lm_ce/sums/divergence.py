"""One model against another on the same tokens: the statistics llama.cpp's --kl-divergence reports.

Per scored token: KL(P_base || P_other) over the vocabulary, delta_p = p_other(target) - p_base(target),
whether the two argmaxes agree, and ln p_base(target) - ln p_other(target). Sums are kept per window
(float64), so that means get standard errors clustered by document (by window when there is a single
document or stream), with the formula of lm_ce.stats.uncertainty; percentiles come from
lm_ce.quantiles (exact float32 values up to a cap, then a sketch of stated rank error). Everything
here merges across processes and pickles into the run's state file; nothing depends on the vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from lm_ce.sums.quantiles import Quantiles
from lm_ce.sums.stats import Z95, exp_capped

# Per-window sums, one column each (float64).
COLUMNS = ("tokens", "kl", "kl_sq", "delta_p", "delta_p_sq", "delta_p_4th", "same_top1", "ln_ratio", "ln_ratio_sq",
           "nll", "nll_sq", "other_nll", "other_nll_sq", "nll_cross")
C = {name: i for i, name in enumerate(COLUMNS)}
PERCENTILES = {"max": 100.0, "p99_9": 99.9, "p99": 99.0, "p95": 95.0, "p90": 90.0, "p75": 75.0, "median": 50.0,
               "p25": 25.0, "p10": 10.0, "p5": 5.0, "p1": 1.0, "p0_1": 0.1, "min": 0.0}
KL_PERCENTILES = [k for k in PERCENTILES if k not in ("p75", "p25")]  # llama.cpp's KL table has no quartiles


@dataclass
class TokenPairs:
    """Both models' per-token values for a block of scored tokens, and where each token belongs."""

    nll: torch.Tensor  # base model's -ln p(target)
    other_nll: torch.Tensor
    kl: torch.Tensor | None  # KL(P_base || P_other); None when only the targets' probabilities are known
    same_top1: torch.Tensor  # bool: the argmaxes agree
    doc: torch.Tensor  # int64: the document of each token
    window: torch.Tensor  # int64: any id of the token's window, unique within its document (its first target)


@dataclass
class Divergence:
    """Everything needed for compare.<name> of one compared model: per-window sums and two percentile sketches."""

    keys: list = field(default_factory=list)  # int64 arrays [m, 2]: (document, window) of each row of `sums`
    sums: list = field(default_factory=list)  # float64 arrays [m, len(COLUMNS)]
    kl: Quantiles = field(default_factory=Quantiles)
    delta_p: Quantiles = field(default_factory=Quantiles)
    with_kl: bool = True  # False: built from saved tokens (no distributions), no KL statistics

    def add(self, t: TokenPairs) -> None:
        nll, other = t.nll.detach().double().cpu(), t.other_nll.detach().double().cpu()
        if t.kl is None:
            self.with_kl = False
        kl = t.kl.detach().double().cpu() if t.kl is not None else torch.zeros_like(nll)
        delta_p = torch.exp(-other) - torch.exp(-nll)
        ln_ratio = other - nll  # ln p_base - ln p_other
        same = t.same_top1.detach().cpu().double()
        values = torch.stack([torch.ones_like(kl), kl, kl * kl, delta_p, delta_p**2, delta_p**4, same, ln_ratio,
                              ln_ratio**2, nll, nll * nll, other, other * other, nll * other], dim=1)
        keys, inverse = torch.unique(torch.stack([t.doc.cpu(), t.window.cpu()], dim=1), dim=0, return_inverse=True)
        sums = torch.zeros(len(keys), len(COLUMNS), dtype=torch.float64).index_add_(0, inverse, values)
        self.keys.append(keys.numpy())
        self.sums.append(sums.numpy())
        if len(self.keys) > 256:  # one array per batch adds up: join them (same rows, same order)
            self.keys, self.sums = [np.concatenate(self.keys)], [np.concatenate(self.sums)]
        if t.kl is not None:
            self.kl.add(t.kl.detach().float().cpu().numpy())
        self.delta_p.add(delta_p.float().numpy())

    def merge(self, other: "Divergence") -> None:
        self.keys += other.keys
        self.sums += other.sums
        self.kl.merge(other.kl)
        self.delta_p.merge(other.delta_p)
        self.with_kl = self.with_kl and other.with_kl

    def table(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, sums) with one row per window, in (document, window) order: the same float64 figures
        whichever process scored what, and in whatever order."""
        if not self.keys:
            return np.zeros((0, 2), np.int64), np.zeros((0, len(COLUMNS)))
        keys, sums = np.concatenate(self.keys), np.concatenate(self.sums)
        order = np.lexsort((keys[:, 1], keys[:, 0]))
        keys, sums = keys[order], sums[order]
        starts = np.flatnonzero(np.r_[True, (np.diff(keys, axis=0) != 0).any(axis=1)])
        return keys[starts], np.add.reduceat(sums, starts, axis=0) if len(sums) else sums

    def clusters(self) -> tuple[np.ndarray, str]:
        """Per-cluster sums: by document when there are several, else by window."""
        keys, sums = self.table()
        docs = keys[:, 0]
        if len(np.unique(docs)) >= 2:
            starts = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
            return np.add.reduceat(sums, starts, axis=0), "documents"
        return sums, "windows"

    def summary(self, n_bytes: int | None = None) -> dict:
        """compare.<name> of results.json (key paths in the README's table)."""
        clusters, unit = self.clusters()
        totals = np.array([math.fsum(clusters[:, i]) for i in range(len(COLUMNS))]) if len(clusters) else np.zeros(len(COLUMNS))
        n = int(round(totals[C["tokens"]]))
        if n == 0:
            return {"tokens": 0}
        mean = {name: totals[C[name]] / n for name in COLUMNS}
        counts = clusters[:, C["tokens"]]

        def stderr(column: str) -> float | None:
            return clustered_stderr(clusters[:, C[column]] - mean[column] * counts, n)

        def stderr_iid(column: str, square: str) -> float | None:
            if n < 2:
                return None
            return math.sqrt(max(0.0, (totals[C[square]] - n * mean[column] ** 2) / (n - 1)) / n)

        base_loss, other_loss = mean["nll"], mean["other_nll"]
        base_ppl, other_ppl = exp_capped(base_loss), exp_capped(other_loss)
        # delta PPL's linearization: its influence per cluster is e^m_o (s_o - m_o n) - e^m_b (s_b - m_b n)
        dppl_se = clustered_stderr(other_ppl * (clusters[:, C["other_nll"]] - other_loss * counts)
                                   - base_ppl * (clusters[:, C["nll"]] - base_loss * counts), n)
        ratio, ratio_se = mean["ln_ratio"], stderr("ln_ratio")
        rms = math.sqrt(mean["delta_p_sq"])
        rms_se = stderr("delta_p_sq")
        kl_q = dict(zip(KL_PERCENTILES, self.kl.percentiles([PERCENTILES[k] for k in KL_PERCENTILES])))
        dp_q = dict(zip(PERCENTILES, self.delta_p.percentiles(list(PERCENTILES.values()))))
        out = {
            "tokens": n,
            "nll_sum": totals[C["other_nll"]],
            "mean_loss": other_loss,
            "mean_loss_stderr": stderr("other_nll"),
            "perplexity": other_ppl,
            "bits_per_byte": totals[C["other_nll"]] / (n_bytes * math.log(2)) if n_bytes else None,
            "base_perplexity": base_ppl,
            "clusters": len(clusters),
            "unit": unit,
            "kl_divergence": {"mean": mean["kl"], "stderr": stderr("kl"), "stderr_iid": stderr_iid("kl", "kl_sq"), **kl_q},
            "delta_p": {"mean": mean["delta_p"], "stderr": stderr("delta_p"),
                        "stderr_iid": stderr_iid("delta_p", "delta_p_sq"), **dp_q,
                        "rms": rms, "rms_stderr": rms_se / (2 * rms) if rms_se is not None and rms > 0 else rms_se},
            "same_top1": {"mean": mean["same_top1"], "stderr": stderr("same_top1"),
                          "stderr_iid": stderr_iid("same_top1", "same_top1")},
            "ln_ppl_ratio": {"mean": ratio, "stderr": ratio_se, "stderr_iid": stderr_iid("ln_ratio", "ln_ratio_sq")},
            "perplexity_ratio": exp_capped(ratio),
            "perplexity_ratio_ci95": interval(ratio, ratio_se, exp_capped),
            "delta_perplexity": other_ppl - base_ppl,
            "delta_perplexity_stderr": dppl_se,
            "delta_perplexity_ci95": interval(other_ppl - base_ppl, dppl_se),
            "corr_ln_p": correlation(totals, n),
            "quantile_rank_error": max(self.kl.rank_error, self.delta_p.rank_error) / n,
        }
        # names of the first version of compare.<name>, kept for readers of older results
        out.update(kl_mean=mean["kl"], kl_p99=kl_q["p99"], kl_max=kl_q["max"], top1_agreement=mean["same_top1"])
        if not self.with_kl:
            for key in ("kl_divergence", "kl_mean", "kl_p99", "kl_max"):
                del out[key]
        return out


def clustered_stderr(deviations: np.ndarray, n: int) -> float | None:
    """sqrt(C/(C-1) * sum_c dev_c^2) / N, with dev_c = s_c - mean * n_c per cluster (None below two clusters)."""
    c = len(deviations)
    if c < 2 or n == 0:
        return None
    return math.sqrt(c / (c - 1) * math.fsum(deviations * deviations)) / n


def interval(value: float, se: float | None, transform=None) -> list[float] | None:
    """value +- 1.96 se, through `transform` when given (None without a standard error)."""
    if se is None:
        return None
    lo, hi = value - Z95 * se, value + Z95 * se
    return [transform(lo), transform(hi)] if transform else [lo, hi]


def correlation(totals: np.ndarray, n: int) -> float | None:
    """Pearson correlation of the two models' ln p(target) over tokens (the sign of ln p does not matter)."""
    sx, sy = totals[C["nll"]], totals[C["other_nll"]]
    sxx = totals[C["nll_sq"]] - sx * sx / n
    syy = totals[C["other_nll_sq"]] - sy * sy / n
    sxy = totals[C["nll_cross"]] - sx * sy / n
    if sxx <= 0 or syy <= 0:
        return None
    return float(sxy / math.sqrt(sxx * syy))
