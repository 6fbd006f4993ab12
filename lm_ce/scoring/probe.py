"""The start-up probes. The head probe: whether the tiled head (scoring/head.py) reproduces what the model does
after its body (its output layer and whatever its forward applies to the logits, in any dtype) and a float64 head
on the same hidden states; if not, the run takes the model's full logits instead of a wrong number. And two
refusals: a model that is not causal, and left padding for a model whose figures it changes."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lm_ce.errors import UsageError, first_line
from lm_ce.scoring.head import Head, tile_columns, token_losses
from lm_ce.scoring.scorer import Scorer, body
from lm_ce.scoring.windows import Window

log = logging.getLogger("lm_ce")


@dataclass
class HeadChoice:
    """Which head scores the tokens, and the probe's evidence for it."""

    head: Head | None  # the chunked head, or None: the model's own full logits
    note: str  # what results.json records as model.head
    error: float | None = None  # largest NLL difference (nats) of the chunked head from a float64 head
    transform_error: float | None = None  # largest difference of what the model applies after its output layer from
    # what the head applies, over the largest logit (both on the same raw logits)


PROBE_TOKENS = 16
TRANSFORM_TOLERANCE = 1e-6  # the model's float32 transforms against the head's float64 ones, over the largest logit


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
        yield v0, transformed(head, part)


def transformed(head: Head, raw: torch.Tensor) -> torch.Tensor:
    """What the head applies to raw logits (scale, then softcap), in raw's dtype."""
    raw = raw * head.scale
    return head.softcap * torch.tanh(raw / head.softcap) if head.softcap is not None else raw


def float64_logits(head: Head, hidden: torch.Tensor) -> torch.Tensor:
    """All the float64 reference logits at once (for tests and small vocabularies)."""
    return torch.cat([part for _, part in float64_slices(head, hidden)], dim=1)


@dataclass
class Float64Figures:
    """What the probe needs of the float64 head on its hidden states, gathered slice by slice: per row the
    log-sum-exp, the largest and smallest logit and their ids, the logits at given targets."""

    lse: torch.Tensor
    top: torch.Tensor
    top_id: torch.Tensor
    bottom: torch.Tensor
    bottom_id: torch.Tensor
    picked: torch.Tensor  # [rows, targets per row]
    finite: bool


def float64_figures(head: Head, hidden: torch.Tensor, targets: torch.Tensor) -> Float64Figures:
    """The float64 head's figures (Float64Figures) in one pass over the vocabulary: memory of one slice, not of
    the probe's rows x vocabulary in float64 (which at a 262k vocabulary raised the run's peak by 200 MB)."""
    n, device = hidden.shape[0], head.weight.device
    f = Float64Figures(lse=torch.full((n,), -torch.inf, dtype=torch.float64, device=device),
                       top=torch.full((n,), -torch.inf, dtype=torch.float64, device=device),
                       top_id=torch.zeros(n, dtype=torch.long, device=device),
                       bottom=torch.full((n,), torch.inf, dtype=torch.float64, device=device),
                       bottom_id=torch.zeros(n, dtype=torch.long, device=device),
                       picked=torch.zeros(targets.shape, dtype=torch.float64, device=device), finite=True)
    targets = targets.to(device)
    for v0, part in float64_slices(head, hidden):
        v1 = v0 + part.shape[1]
        f.finite = f.finite and bool(torch.isfinite(part).all())
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


def raw_logits(head: Head, hidden: torch.Tensor) -> torch.Tensor:
    """hidden @ weight.T + bias in float32, a vocabulary slice at a time (no float32 copy of a half-precision
    head): the output layer's logits without the rounding to the model's dtype."""
    plain = Head(head.weight, head.bias)
    step = tile_columns(len(hidden))
    return torch.cat([plain.logits(hidden, slice(v0, v0 + step)) for v0 in range(0, head.vocab_size, step)], dim=1)


def own_logits(model: torch.nn.Module, head: Head, ids: torch.Tensor) -> tuple[list, torch.Tensor]:
    """The model's own logits with its output layer computing in float32 (so that what its forward does after the
    output layer acts on float32 logits and shows at float32 precision, whatever the model's dtype), and each
    call of the output layer as (its input, its float32 raw logits)."""
    calls = []

    def in_float32(module, args, kwargs, output):
        x = args[0] if args else kwargs["input"]
        raw = raw_logits(head, x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
        calls.append((x, raw))
        return raw

    handle = model.get_output_embeddings().register_forward_hook(in_float32, with_kwargs=True)
    try:
        own = model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()
    return calls, own


def transform_error(head: Head, raw: torch.Tensor, own: torch.Tensor) -> tuple[float, float]:
    """(largest difference of the model's logits from the head's transforms of the same raw logits, computed in
    float64 a slice at a time; largest |logit|). Infinite where either is not finite (no NaN passes)."""
    error, largest = 0.0, 0.0
    step = max(256, 2**20 // max(1, raw.shape[0]))
    for v0 in range(0, raw.shape[1], step):
        ours = transformed(head, raw[:, v0 : v0 + step].double())
        diff = (own[:, v0 : v0 + step].to(ours.device).double() - ours).abs()
        error = max(error, diff.nan_to_num(nan=torch.inf).max().item())
        largest = max(largest, ours.abs().max().item())
    return error, largest


def rows(head: Head, count: int) -> Head:
    """The head restricted to its first `count` output rows (a model whose logits stop short of its output layer's
    rows, as a vocabulary padded past the tokenizer's can)."""
    if count == head.vocab_size:
        return head
    return dataclasses.replace(head, weight=head.weight[:count], bias=None if head.bias is None else head.bias[:count])


def probe_head(model: torch.nn.Module, head: Head | None, device: torch.device) -> HeadChoice:
    """The chunked head when (1) the model's body gives the output layer's input, (2) the head applies what the
    model applies to the output layer's logits (checked on the same float32 logits to float32 precision, whatever
    the model's dtype), and (3) its NLLs match a float64 head on the same hidden states to 1e-3 nats (at each row's
    most and least likely token, the next token and a spread of ids). `device`: where the model's input ids go
    (with a device map, the input embedding's execution device)."""
    if head is None:
        return HeadChoice(None, "full logits (the output layer is not a plain linear layer)")
    if body(model) is None:
        return HeadChoice(None, "full logits (no base model gives the hidden states the output layer reads)")
    ids = (torch.arange(PROBE_TOKENS, device=device) * 7919 % head.vocab_size)[None]
    with torch.inference_mode(), head.loaded() as loaded:
        hidden = body(model)(input_ids=ids, use_cache=False).last_hidden_state[0]
        calls, own = own_logits(model, loaded, ids)
        if len(calls) != 1:
            return HeadChoice(None, f"full logits (the model's forward calls its output layer {len(calls)} times)")
        if calls[0][0].shape != (1, *hidden.shape) or own.shape[:-1] != ids.shape:
            return HeadChoice(None, f"full logits (the output layer reads {tuple(calls[0][0].shape)}, not the body's "
                                    f"hidden states {tuple(hidden.shape)} once per position)")
        if own.shape[-1] > head.vocab_size:
            return HeadChoice(None, f"full logits (the model gives {own.shape[-1]} logits, its output layer "
                                    f"{head.vocab_size})")
        head, loaded = rows(head, own.shape[-1]), rows(loaded, own.shape[-1])
        seen, raw = calls[0][0][0], calls[0][1][0, :, : own.shape[-1]]
        changed, largest = transform_error(loaded, raw, own[0])
        transform = changed / max(1.0, largest)
        coarsest = max((hidden.dtype, seen.dtype), key=lambda d: torch.finfo(d).eps)
        shift = (hidden - seen.to(hidden.device)).abs().max().item() / max(1.0, seen.abs().max().item())
        spread = torch.arange(PROBE_TOKENS, device=ids.device) * 104729 % head.vocab_size
        known = torch.stack([ids[0].roll(-1), spread], dim=1)
        ref = float64_figures(loaded, hidden, known)
        if not ref.finite:  # a broken model: the NaN guard will name where it shows
            return HeadChoice(head, "chunked (probe inconclusive: the float64 head's logits are not finite)")
        targets = torch.cat([ref.top_id, ref.bottom_id, known[:, 0].to(ref.lse.device), known[:, 1].to(ref.lse.device)])
        expected = torch.cat([ref.lse - ref.top, ref.lse - ref.bottom, ref.lse - ref.picked[:, 0], ref.lse - ref.picked[:, 1]])
        ours = token_losses(hidden.repeat(4, 1), targets, loaded).nll.double().to(expected.device)
    error = (ours - expected).abs().max().item()
    if not shift <= 4 * torch.finfo(coarsest).eps:
        log.warning("the model changes its hidden states between its body and its output layer (by %.3g of the "
                    "largest): using full logits instead", shift)
        return HeadChoice(None, f"full logits (the output layer's input differs from the body's output by {shift:.3g})",
                          error, transform)
    if not transform <= TRANSFORM_TOLERANCE:
        log.warning("the chunked head differs from what the model applies after its output layer by %.3g of the "
                    "largest logit: using full logits instead", transform)
        return HeadChoice(None, f"full logits (the chunked head differs from the model's logits by {transform:.3g})",
                          error, transform)
    if not error <= 1e-3:
        log.warning("the chunked head differs from a float64 head by %.3g nats: using full logits instead", error)
        return HeadChoice(None, f"full logits (chunked head probe differed by {error:.3g} nats)", error, transform)
    return HeadChoice(head, "chunked", error, transform)


def probe_ids(model: torch.nn.Module, device: torch.device, count: int, seed: int) -> torch.Tensor:
    """`count` token ids spread over the model's vocabulary (the same for a seed)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    return (torch.arange(count, device=device) * 7919 + seed * 104729) % vocab


def tolerance(model: torch.nn.Module) -> float:
    """What the start-up checks allow for rounding, relative to the largest value: 8 ulps of the model's dtype."""
    return 8 * torch.finfo(next(model.parameters()).dtype).eps


def check_causal(model: torch.nn.Module, device: torch.device, name: str) -> None:
    """Refuse a model that is not causal (an encoder, or a decoder built without its causal mask): its outputs
    at a position change with a later token, so a next-token loss from it means nothing."""
    ids = probe_ids(model, device, PROBE_TOKENS, 0)[None]
    later = ids.clone()
    later[0, -1] = (later[0, -1] + 1) % model.get_input_embeddings().weight.shape[0]
    inner = body(model)
    with torch.inference_mode():
        outs = [inner(input_ids=x, use_cache=False).last_hidden_state if inner is not None
                else model(input_ids=x, use_cache=False).logits for x in (ids, later)]
    a, b = (out[0, :-1].double() for out in outs)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):  # a broken model: the NaN guard names where
        return
    change = (a - b.to(a.device)).abs().max().item() / max(1.0, a.abs().max().item())
    if not change <= tolerance(model):
        raise UsageError(
            f"model '{name}' is not causal: its output at a position changes with a later token (by {change:.2g} of "
            "the largest); an encoder, or a decoder whose config.json leaves out its causal setting (is_decoder, "
            "causal, attn_type uni); lm_ce scores causal language models only"
        )


def check_left_padding(model: torch.nn.Module, head: Head | None, device: torch.device, name: str) -> None:
    """Refuse --padding-side left for a model whose figures it changes: a short window's losses beside a longer
    one, left-padded against right-padded (exact for a causal model). Recurrent and state-space layers that read
    the pad tokens, or positions counted from the input rather than the mask, show here."""
    long, short = probe_ids(model, device, PROBE_TOKENS + 1, 1).cpu(), probe_ids(model, device, 9, 2).cpu()
    batch = [Window(0, long, 0, 0, len(long) - 1, 0), Window(1, short, 0, 0, len(short) - 1, 0)]
    right = Scorer(model, head, device, False).nll(batch)
    try:
        left = Scorer(model, head, device, True).nll(batch)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:  # the model's forward fails on the mask
        raise UsageError(f"--padding-side left fails for model '{name}' (transformers: {first_line(e)}); use "
                         "--padding-side right (the default)") from None
    n = batch[0].n_scored
    if not (torch.isfinite(left).all() and torch.isfinite(right).all()):  # a broken model: the NaN guard names where
        return
    change = (left[n:] - right[n:]).abs().max().item() / max(1.0, right[n:].abs().max().item())
    if not change <= max(1e-4, tolerance(model)):
        raise UsageError(
            f"--padding-side left changes the figures of model '{name}' (a padded window's losses by {change:.2g} "
            "of the largest): its layers read the pad tokens or count positions from the input; use --padding-side "
            "right (the default), which gives the figures of unpadded windows"
        )
