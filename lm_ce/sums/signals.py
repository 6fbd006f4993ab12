"""Membership signals per document (--min-k): Min-K% Prob, Min-K%++ and the zlib ratio.

With n a document's scored tokens, lp_t = log p(x_t) and m = max(1, floor(K n)):
  min_k            the mean of the m lowest lp_t;
  min_k_plus_plus  the mean of the m lowest z_t = (lp_t - mu_t) / sigma_t, where mu_t = sum_v p_v log p_v and
                   sigma_t^2 = sum_v p_v (log p_v)^2 - mu_t^2 over the whole vocabulary at that position;
  zlib_ratio       (nll_sum / n) / len(zlib.compress(text as UTF-8)).
mu_t and sigma_t come from the tiled head (`TileMoments`, one vocabulary tile at a time with the log-sum-exp's
rescaling, never the full logits). The per-token (lp, z) of the documents of the current chunk are kept
(`TokenSignals`, gathered and saved with the chunk's other sums); a document's fields are made at the chunk's
end, from its m lowest values sorted, so they do not depend on batches, processes or a resume.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch

from lm_ce.errors import InternalError
from lm_ce.sums import stats


def wide_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums across tiles, where the device has it (MPS has not: float32 there)."""
    return torch.float32 if device.type == "mps" else torch.float64


FAR_BELOW = -1e4  # logits this far below a tile's maximum have p = 0 in float32; clamped so that 0 * -inf is not NaN


@dataclass
class TileMoments:
    """Per row, over the vocabulary tiles seen so far: the reference M (the largest tile maximum) and, in float64,
    S0 = sum e^(l-M), S1 = sum e^(l-M) (l-M), S2 = sum e^(l-M) (l-M)^2. Centred on M, every term is small."""

    ref: torch.Tensor | None = None
    s0: torch.Tensor | None = None
    s1: torch.Tensor | None = None
    s2: torch.Tensor | None = None

    def add(self, logits: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
        """Add one float32 tile (overwritten, as `loss._logsumexp_` does) and return its log-sum-exp, computed with
        the same operations in the same order as `loss._logsumexp_` (so the NLL is the same with or without)."""
        shift = row_max.masked_fill(~torch.isfinite(row_max), 0.0)
        d = logits.sub_(shift[:, None])
        e = d.exp()
        s0 = e.sum(dim=-1)
        part = s0.log().add_(shift)
        d.clamp_min_(FAR_BELOW)
        s1 = e.mul_(d).sum(dim=-1)
        s2 = e.mul_(d).sum(dim=-1)
        dt = wide_dtype(logits.device)
        self._combine(shift.to(dt), s0.to(dt), s1.to(dt), s2.to(dt))
        return part

    def _combine(self, ref, s0, s1, s2) -> None:
        if self.ref is None:
            self.ref, self.s0, self.s1, self.s2 = ref, s0, s1, s2
            return
        new = torch.maximum(self.ref, ref)
        self.s0, self.s1, self.s2 = (a + b for a, b in zip(_shifted(self.s0, self.s1, self.s2, self.ref - new),
                                                           _shifted(s0, s1, s2, ref - new)))
        self.ref = new

    def mean_and_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) per row, float64: mu = E_p[log p] = S1/S0 - log S0; sigma^2 = Var_p[l] = S2/S0 - (S1/S0)^2
        (the variance of log p is that of the logits, whatever they are centred on)."""
        mean = self.s1 / self.s0
        variance = (self.s2 / self.s0 - mean.square()).clamp_min_(0.0)
        return mean - self.s0.log(), variance.sqrt()


def _shifted(s0, s1, s2, delta):
    """The sums re-centred from a reference M to M - delta (delta <= 0): l - M' = (l - M) + delta."""
    scale = delta.exp()
    return scale * s0, scale * (s1 + delta * s0), scale * (s2 + 2 * delta * s1 + delta.square() * s0)


def logprob_moments(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, sigma) per row of full log-probabilities (the fallback paths that already hold them), float64."""
    logp = logp.to(wide_dtype(logp.device))
    p = logp.exp()
    finite = logp.clamp_min(FAR_BELOW * 100)  # p = 0 there: 0 * finite, not 0 * -inf
    mean = (p * finite).sum(dim=-1)
    variance = ((p * finite.square()).sum(dim=-1) - mean.square()).clamp_min_(0.0)
    return mean, variance.sqrt()


def z_scores(nll: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """z_t = (lp_t - mu_t) / sigma_t, float32 (sigma 0, a one-hot distribution: z 0)."""
    lp = -nll.to(mean.device, mean.dtype)
    z = (lp - mean) / std
    return torch.where(std > 0, z, torch.zeros_like(z)).float()


@dataclass
class TokenSignals:
    """Per document of the chunk in flight: (first target, lp, z) of each scored window, as it was scored."""

    docs: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def add_batch(self, batch, nll: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
        """A scored batch (windows.Window list): each window's lp = -nll and z, float32 on the CPU."""
        z = z_scores(nll, mean, std).cpu()
        sizes = [w.n_scored for w in batch]
        for w, lp_part, z_part in zip(batch, (-nll).split(sizes), z.split(sizes)):
            self.docs.setdefault(w.doc, []).append((w.target_offset, lp_part.clone(), z_part.clone()))

    def merge(self, other: TokenSignals) -> None:
        for doc, parts in other.docs.items():
            self.docs.setdefault(doc, []).extend(parts)


@dataclass
class Signals:
    """A document's three signals (None for a document with no scored token)."""

    min_k: float | None = None
    min_k_plus_plus: float | None = None
    zlib_ratio: float | None = None


NAMES = ("min_k", "min_k_plus_plus", "zlib_ratio")


def lowest_mean(values: torch.Tensor, m: int) -> float:
    """The mean of the m lowest values, summed exactly in sorted order (independent of the values' order)."""
    lowest = torch.sort(values.double()).values[:m]
    return math.fsum(lowest.tolist()) / m


def document_signals(parts: list[tuple[int, torch.Tensor, torch.Tensor]], *, k: float, nll_sum: float, tokens: int,
                     text: str) -> Signals:
    """The signals of one document from its windows' (first target, lp, z); its NLL sum and tokens; its text."""
    if not tokens:
        return Signals()
    parts = sorted(parts, key=lambda p: p[0])
    lp = torch.cat([p[1] for p in parts])
    z = torch.cat([p[2] for p in parts])
    if lp.numel() != tokens:
        raise InternalError(f"membership signals: {lp.numel()} log-probabilities for {tokens} scored tokens")
    m = max(1, math.floor(k * tokens))
    return Signals(lowest_mean(lp, m), lowest_mean(z, m), zlib_ratio(nll_sum, tokens, text))


def zlib_ratio(nll_sum: float, tokens: int, text: str) -> float:
    """(mean NLL per token) / (bytes of the text compressed by zlib, default level)."""
    return (nll_sum / tokens) / len(zlib.compress(text.encode("utf-8")))


def add_to_rows(rows, docs, tally, k: float) -> None:
    """Each finished row (records.DocumentResult) gets its Signals, from the chunk's per-token values, which are
    then let go (`tally`: the run's records.Tally, holding them; `docs`: the chunk's data.Document, for the text)."""
    values, tally.signals = tally.signals or TokenSignals(), None
    texts = {d.index: d.text for d in docs}
    for r in rows:
        r.signals = Signals() if r.skipped else document_signals(
            values.docs.get(r.index, []), k=k, nll_sum=r.nll_sum, tokens=r.tokens, text=texts[r.index])


@dataclass
class SignalSums:
    """Running sums of the signals of finished documents: for their means in results.json."""

    documents: int = 0
    sums: dict[str, stats.ExactSum] = field(default_factory=lambda: {name: stats.ExactSum() for name in NAMES})

    def add(self, s: Signals) -> None:
        if s.min_k is None:
            return
        self.documents += 1
        for name in NAMES:
            self.sums[name].add(getattr(s, name))

    def merge(self, other: SignalSums) -> None:
        self.documents += other.documents
        for name in NAMES:
            self.sums[name].merge(other.sums[name])

    def means(self) -> dict:
        """{min_k, min_k_plus_plus, zlib_ratio: mean over the documents with signals (None without), documents}."""
        out = {name: self.sums[name].value / self.documents if self.documents else None for name in NAMES}
        return {**out, "documents": self.documents}
