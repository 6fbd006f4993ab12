"""The head probe: whether the tiled head (scoring/head.py) reproduces the model's own logits and a float64 head on
the same hidden states; if not, the run takes the model's full logits instead of a wrong number."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lm_ce.scoring.head import Head, token_losses

log = logging.getLogger("lm_ce")


@dataclass
class HeadChoice:
    """Which head scores the tokens, and the probe's evidence for it."""

    head: Head | None  # the chunked head, or None: the model's own full logits
    note: str  # what results.json records as model.head
    error: float | None = None  # largest NLL difference (nats) of the chunked head from a float64 head
    transform_error: float | None = None  # largest difference of the model's own logits from the float64 head / largest logit


PROBE_TOKENS = 16


def float64_slices(head: Head, hidden: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """The reference: the head and its transforms in float64 on the same hidden states, one vocabulary slice
    at a time, (first id, logits of the slice), each slice from about 8 MB of float64 weight, so that neither
    the head nor all the logits are ever held in float64."""
    hidden = hidden.to(head.weight.device).double()
    step = max(256, 2**20 // hidden.shape[-1])
    for v0 in range(0, head.vocab_size, step):
        part = hidden @ head.weight[v0 : v0 + step].double().t()
        if head.bias is not None:
            part += head.bias[v0 : v0 + step].double()
        part *= head.scale
        yield v0, head.softcap * torch.tanh(part / head.softcap) if head.softcap is not None else part


def float64_logits(head: Head, hidden: torch.Tensor) -> torch.Tensor:
    """All the float64 reference logits at once (for tests and small vocabularies)."""
    return torch.cat([part for _, part in float64_slices(head, hidden)], dim=1)


@dataclass
class Float64Figures:
    """What the probe needs of the float64 head on its hidden states, gathered slice by slice: per row the
    log-sum-exp, the largest and smallest logit and their ids, the logits at given targets; over all rows the
    largest |logit| and the model's own logits' largest difference from these."""

    lse: torch.Tensor
    top: torch.Tensor
    top_id: torch.Tensor
    bottom: torch.Tensor
    bottom_id: torch.Tensor
    picked: torch.Tensor  # [rows, targets per row]
    largest: float
    own_error: float
    finite: bool


def float64_figures(head: Head, hidden: torch.Tensor, own: torch.Tensor, targets: torch.Tensor) -> Float64Figures:
    """The float64 head's figures (Float64Figures) in one pass over the vocabulary: memory of one slice, not of
    the probe's rows x vocabulary in float64 (which at a 262k vocabulary raised the run's peak by 200 MB)."""
    n, device = hidden.shape[0], head.weight.device
    f = Float64Figures(lse=torch.full((n,), -torch.inf, dtype=torch.float64, device=device),
                       top=torch.full((n,), -torch.inf, dtype=torch.float64, device=device),
                       top_id=torch.zeros(n, dtype=torch.long, device=device),
                       bottom=torch.full((n,), torch.inf, dtype=torch.float64, device=device),
                       bottom_id=torch.zeros(n, dtype=torch.long, device=device),
                       picked=torch.zeros(targets.shape, dtype=torch.float64, device=device),
                       largest=0.0, own_error=0.0, finite=True)
    targets = targets.to(device)
    for v0, part in float64_slices(head, hidden):
        v1 = v0 + part.shape[1]
        f.finite = f.finite and bool(torch.isfinite(part).all())
        f.own_error = max(f.own_error, (own[:, v0:v1].to(device).double() - part).abs().max().item())
        f.largest = max(f.largest, part.abs().max().item())
        f.lse = torch.logaddexp(f.lse, torch.logsumexp(part, -1))
        value, index = part.max(-1)
        better = value > f.top
        f.top, f.top_id = torch.where(better, value, f.top), torch.where(better, index + v0, f.top_id)
        value, index = part.min(-1)
        lower = value < f.bottom
        f.bottom, f.bottom_id = torch.where(lower, value, f.bottom), torch.where(lower, index + v0, f.bottom_id)
        inside = (targets >= v0) & (targets < v1)
        f.picked = torch.where(inside, part.gather(1, (targets - v0).clamp(0, part.shape[1] - 1)), f.picked)
    return f


def probe_head(model: torch.nn.Module, head: Head | None, device: torch.device) -> HeadChoice:
    """The chunked head when (1) it applies what the model applies, checked against the model's own logits to
    their dtype's precision, and (2) its NLLs match a float64 head on the same hidden states to 1e-3 nats
    (at each row's most and least likely token, the next token and a spread of ids). `device`: where the model's
    input ids go (with a device map, the input embedding's execution device)."""
    if head is None:
        return HeadChoice(None, "full logits (the output layer is not a plain linear layer)")
    ids = (torch.arange(PROBE_TOKENS, device=device) * 7919 % head.vocab_size)[None]
    with torch.inference_mode(), head.loaded() as loaded:
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[0]
        own = model(input_ids=ids, use_cache=False).logits[0]
        spread = torch.arange(PROBE_TOKENS, device=ids.device) * 104729 % head.vocab_size
        known = torch.stack([ids[0].roll(-1), spread], dim=1)
        ref = float64_figures(loaded, hidden, own, known)
        if not ref.finite:  # a broken model: the NaN guard will name where it shows
            return HeadChoice(head, "chunked (probe inconclusive: the float64 head's logits are not finite)")
        targets = torch.cat([ref.top_id, ref.bottom_id, known[:, 0].to(ref.lse.device), known[:, 1].to(ref.lse.device)])
        expected = torch.cat([ref.lse - ref.top, ref.lse - ref.bottom, ref.lse - ref.picked[:, 0], ref.lse - ref.picked[:, 1]])
        ours = token_losses(hidden.repeat(4, 1), targets, loaded).nll.double().to(expected.device)
    error = (ours - expected).abs().max().item()
    transform_error = ref.own_error / max(1.0, ref.largest)
    coarsest = max((own.dtype, hidden.dtype, loaded.weight.dtype), key=lambda d: torch.finfo(d).eps)
    if not transform_error <= max(1e-4, 4 * torch.finfo(coarsest).eps):  # the model's logits carry its dtype's rounding
        log.warning("the chunked head differs from the model's own logits by %.3g of the largest logit (more than "
                    "%s rounding): using full logits instead", transform_error, str(coarsest).replace("torch.", ""))
        return HeadChoice(None, f"full logits (the chunked head differs from the model's logits by {transform_error:.3g})",
                          error, transform_error)
    if not error <= 1e-3:
        log.warning("the chunked head differs from a float64 head by %.3g nats: using full logits instead", error)
        return HeadChoice(None, f"full logits (chunked head probe differed by {error:.3g} nats)", error, transform_error)
    return HeadChoice(head, "chunked", error, transform_error)
