"""Token-level cross-entropy from final hidden states.

The head (hidden -> vocabulary logits) and the log-sum-exp are computed one tile of (rows x vocabulary
slice) at a time, the log-sum-exp combined across slices, so the logits never take more than one tile
of memory whatever the batch, length or vocabulary, and the head's weight is read once per block of rows
(not once per small chunk, which makes large vocabularies slow). Logits and log-sum-exps are float32 in
every dtype: a half-precision head multiplies half-precision numbers and accumulates in float32, tile by
tile, with no float32 copy of the whole head. A head offloaded by accelerate (weights on the meta device)
is brought in for the batch. The definitions are the ones of the cross-entropy tutorial this project
grew from: nll(token) = -log softmax(logits)[target] = logsumexp(logits) - logits[target].
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lm_ce.sums.signals import TileMoments, logprob_moments, wide_dtype

log = logging.getLogger("lm_ce")


# Bytes of float32 logits one tile may hold, and rows per block: large enough for an efficient
# matrix multiply, small enough to stay near the cache.
# Measured on a quiet 2-core CPU (2,048 rows, float32): 2 to 8 MB tiles cost the same, within 2%, at 49k
# and 262k vocabularies; 32 MB tiles took 1.15x (262k) to 1.27x (49k) as long (a matmul into a new 32 MB
# tensor alone took 1.19x one into a reused buffer; at 8 MB the two are equal).
CHUNK_BYTES = 8 * 2**20


ROW_BLOCK = 2048


# Tile widths are a multiple of this: on Gemma-3's real hidden states (2,041 rows), tiles 1,027 logits wide
# took 1.3x the time of tiles 1,024 wide (and 4,108 wide 1.2x those 4,096 wide).
COLUMN_ALIGN = 256


# Devices whose matmul can take half-precision inputs and write float32 (torch.mm(..., out_dtype=)); any
# other device, or one that refuses, takes the portable path.
OUT_DTYPE_DEVICES = {"cuda"}


_refused: set[str] = set()


def float32_product(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden @ weight.T in float32. Half-precision inputs are multiplied as they are and accumulated in float32:
    natively where the matmul can write float32, else by widening this tile (the products of two bfloat16 or
    float16 numbers are exact in float32, so the result is the same up to summation order)."""
    if hidden.dtype == weight.dtype == torch.float32:
        return hidden @ weight.t()
    kind = hidden.device.type
    if hidden.dtype == weight.dtype and kind in OUT_DTYPE_DEVICES and kind not in _refused:
        try:
            return torch.mm(hidden, weight.t(), out_dtype=torch.float32)
        except (RuntimeError, TypeError) as e:  # an older torch, or a device without the kernel
            _refused.add(kind)
            log.info("half-precision matmul with float32 output unavailable on %s (%s): widening tiles instead", kind,
                     str(e).splitlines()[0][:120])
    return hidden.float() @ weight.float().t()


@dataclass
class Head:
    """What a causal LM applies between its final hidden states and its logits."""

    weight: torch.Tensor  # [vocab, hidden]; on the meta device while accelerate keeps it offloaded
    bias: torch.Tensor | None = None
    scale: float = 1.0  # logits *= scale (Cohere's logit_scale, Granite's 1 / logits_scaling)
    softcap: float | None = None  # logits = softcap * tanh(logits / softcap) (Gemma 2 and 3)
    module: torch.nn.Module | None = None  # the output layer, whose weights accelerate may offload

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def offloaded(self) -> bool:
        return self.weight.device.type == "meta"

    @contextlib.contextmanager
    def loaded(self) -> Iterator["Head"]:
        """This head with its weights on its execution device while inside (accelerate brings in offloaded ones);
        hidden states go to the device its weights are then on."""
        if not self.offloaded or self.module is None:
            yield self
            return
        from accelerate.utils import align_module_device

        rows = self.vocab_size  # the first rows only, when the model's logits stop short of its output layer's
        with align_module_device(self.module):
            bias = self.module.bias
            yield dataclasses.replace(self, weight=self.module.weight[:rows], bias=None if bias is None else bias[:rows],
                                      module=None)

    def logits(self, hidden: torch.Tensor, vocab: slice = slice(None)) -> torch.Tensor:
        """Float32 logits of a block of hidden states over a slice of the vocabulary, with every
        transform the model applies (all of them act on each logit alone, so slices are exact)."""
        if self.offloaded:  # one call on its own; token_losses brings the weights in once per batch instead
            with self.loaded() as head:
                return head.logits(hidden, vocab)
        out = float32_product(hidden.to(self.weight.device), self.weight[vocab])
        if self.bias is not None:
            out += self.bias[vocab].float()
        if self.scale != 1.0:
            out *= self.scale
        if self.softcap is not None:
            out.div_(self.softcap).tanh_().mul_(self.softcap)
        return out


# What causal LMs apply to their logits after the output layer, as each family's *ForCausalLM.forward in
# transformers does it, read from its config: a final softcap, logits = cap * tanh(logits / cap) (Gemma 2 to 4,
# VaultGemma, NanoChat, Inkling 2: final_logit_softcapping; RecurrentGemma: logits_soft_cap; xLSTM:
# output_logit_soft_cap), and a scale (Cohere: logit_scale; Falcon-H1: lm_head_multiplier; Granite and MiniCPM3
# divide by logits_scaling, HyperCLOVA X multiplies by it). Whatever else a model does is caught by the head
# probe (scoring/probe.py), which then takes the model's own logits.
SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
MULTIPLY_LOGITS_SCALING = ("hyperclovax",)  # model types whose logits_scaling multiplies (Granite's divides)


def head_of(model: torch.nn.Module) -> Head | None:
    """The model's head as a Head, or None when its output layer is not a plain linear layer (a subclass with its
    own forward, such as a quantized layer or one with a learned per-token scale, cannot be split)."""
    out = model.get_output_embeddings()
    if not isinstance(out, torch.nn.Linear) or type(out).forward is not torch.nn.Linear.forward:
        return None
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = next((_number(config, name) for name in SOFTCAPS if _number(config, name)), None)
    return Head(out.weight, out.bias, logit_scale(config), softcap, module=out)


def logit_scale(config) -> float:
    """The factor a family's forward multiplies its logits by (1.0 for none). MPT's config also has a
    logit_scale, which transformers' MPT does not apply: only Cohere's counts."""
    kind = str(getattr(config, "model_type", ""))
    scale = (_number(config, "logit_scale") or 1.0) if kind.startswith("cohere") else 1.0
    scale *= _number(config, "lm_head_multiplier") or 1.0
    by = _number(config, "logits_scaling") or 1.0
    return scale * by if kind in MULTIPLY_LOGITS_SCALING else scale / by


def _number(config, name: str) -> float | None:
    """A config attribute as a float, or None when absent, null, zero or not a number."""
    try:
        return float(getattr(config, name, None) or 0.0) or None
    except (TypeError, ValueError):
        return None


def chunk_rows(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk of float32 logits over the whole vocabulary takes about chunk_bytes."""
    return max(16, chunk_bytes // (4 * vocab_size))


def tile_columns(rows: int, tile_bytes: int = CHUNK_BYTES) -> int:
    """Vocabulary columns of a tile of `rows` rows: about tile_bytes of float32 logits, at least 1,024, and a
    multiple of COLUMN_ALIGN (a tile of another width makes the matmul markedly slower)."""
    return max(1024, tile_bytes // (4 * rows) // COLUMN_ALIGN * COLUMN_ALIGN)


@dataclass
class TokenLosses:
    """Per-token negative log-likelihood (nats, float32) and the model's top-1 prediction."""

    nll: torch.Tensor
    top1: torch.Tensor | None = None
    mean: torch.Tensor | None = None  # mu_t = sum_v p_v log p_v, float64 (with want_moments: --min-k)
    std: torch.Tensor | None = None  # sigma_t, the standard deviation of log p_v under p


def token_losses(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: Head,
    rows: int | None = None,
    want_top1: bool = False,
    vocab_block: int | None = None,
    want_moments: bool = False,
) -> TokenLosses:
    """nll[i] = logsumexp(head(hidden[i])) - head(hidden[i])[targets[i]], one tile at a time.

    Blocks of `rows` rows; within a block, slices of `vocab_block` logits whose log-sum-exps are
    combined with logaddexp (and whose maxima give the top-1). With want_moments, also the mean and standard
    deviation of log p over the vocabulary, accumulated over the same tiles (signals.TileMoments)."""
    with head.loaded() as head:  # an offloaded head is brought in once for the whole batch
        return _token_losses(hidden.to(head.weight.device), targets.to(head.weight.device), head, rows, want_top1,
                             vocab_block, want_moments)


def _token_losses(hidden, targets, head: Head, rows, want_top1, vocab_block, want_moments=False) -> TokenLosses:
    n, vocab = hidden.shape[0], head.vocab_size
    rows = rows or min(max(n, 1), ROW_BLOCK)
    cols = min(vocab, vocab_block or tile_columns(rows))
    nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
    top1 = torch.empty(n, dtype=torch.long, device=hidden.device) if want_top1 else None
    mean = torch.empty(n, dtype=wide_dtype(hidden.device), device=hidden.device) if want_moments else None
    std = torch.empty_like(mean) if want_moments else None
    for start in range(0, n, rows):
        block = slice(start, min(start + rows, n))
        h, t = hidden[block], targets[block]
        lse = target = best = None
        moments = TileMoments() if want_moments else None
        for v0 in range(0, vocab, cols):
            logits = head.logits(h, slice(v0, v0 + cols))
            inside = (t >= v0) & (t < v0 + logits.shape[1])
            picked = logits.gather(1, (t - v0).clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)
            target = torch.where(inside, picked, target if target is not None else picked)
            value = logits.amax(dim=-1)
            if top1 is not None:
                best = _top1_(logits, value, best, top1[block], v0)
            part = _logsumexp_(logits, value) if moments is None else moments.add(logits, value)
            lse = part if lse is None else torch.logaddexp(lse, part)
        nll[block] = lse - target
        if moments is not None:
            mean[block], std[block] = moments.mean_and_std()
    return TokenLosses(nll, top1, mean, std)


def _top1_(logits: torch.Tensor, value: torch.Tensor, best: torch.Tensor | None, top1: torch.Tensor,
           v0: int) -> torch.Tensor:
    """Update `top1` (in place) with this vocabulary slice's argmax where the slice beats `best` (ties: the earlier
    id); returns the new best. On CPU the argmax is taken on those rows only (a tile-wide max-with-index costs ~6x
    amax there, and a row's best moves to a later slice only a few times); elsewhere in one kernel, no host sync."""
    better = None if best is None else value > best
    if logits.device.type == "cpu":
        rows = torch.arange(len(value)) if better is None else better.nonzero().squeeze(1)
        if len(rows):
            top1[rows] = logits.index_select(0, rows).argmax(dim=-1) + v0
    else:
        index = logits.argmax(dim=-1) + v0
        top1.copy_(index if better is None else torch.where(better, index, top1))
    return value if best is None else torch.maximum(value, best)


def _logsumexp_(logits: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(logits), -1)) given each row's maximum, overwriting `logits`: no second tile is allocated
    (torch.logsumexp allocates a temporary tile the size of the logits)."""
    shift = row_max.masked_fill(~torch.isfinite(row_max), 0.0)  # a row all -inf: lse -inf, not NaN
    return logits.sub_(shift[:, None]).exp_().sum(dim=-1).log_().add_(shift)


def logits_losses(logits: torch.Tensor, targets: torch.Tensor, want_top1: bool = False,
                  want_moments: bool = False) -> TokenLosses:
    """The same quantities from logits the model already computed (the fallback path)."""
    logits = logits.float()
    nll = torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[:, None]).squeeze(1)
    mean, std = logprob_moments(torch.log_softmax(logits, dim=-1)) if want_moments else (None, None)
    return TokenLosses(nll, logits.argmax(dim=-1) if want_top1 else None, mean, std)


@dataclass
class PairLosses:
    """Two models on the same tokens: each one's NLL and top-1, and KL(first || second) per token."""

    nll: torch.Tensor
    top1: torch.Tensor
    other_nll: torch.Tensor
    other_top1: torch.Tensor
    kl: torch.Tensor


def pair_losses(
    hidden: torch.Tensor, head: Head, other_hidden: torch.Tensor, other_head: Head, targets: torch.Tensor, rows: int | None = None,
) -> PairLosses:
    """Per-token NLL of both models and KL(P_first || P_second) = sum_v p(v) (log p(v) - log q(v)), chunked by rows
    (log_softmax over whole rows: the first model's NLL rounds otherwise than token_losses', whose values the scorer
    keeps for that model)."""
    with head.loaded() as head, other_head.loaded() as other_head:
        device = head.weight.device
        return _pair_losses(hidden.to(device), head, other_hidden.to(other_head.weight.device), other_head,
                            targets.to(device), rows)


def _pair_losses(hidden, head: Head, other_hidden, other_head: Head, targets, rows) -> PairLosses:
    n = hidden.shape[0]
    rows = rows or max(8, chunk_rows(head.vocab_size) // 3)  # three vocab-wide blocks live at once
    out = PairLosses(*(torch.empty(n, dtype=dt, device=hidden.device) for dt in (torch.float32, torch.long, torch.float32, torch.long, torch.float32)))
    for start in range(0, n, rows):
        s = slice(start, min(start + rows, n))
        t = targets[s, None]
        logp = torch.log_softmax(head.logits(hidden[s]), dim=-1)
        logq = torch.log_softmax(other_head.logits(other_hidden[s]), dim=-1).to(logp.device)
        out.nll[s] = -logp.gather(1, t).squeeze(1)
        out.other_nll[s] = -logq.gather(1, t).squeeze(1)
        out.top1[s] = logp.argmax(dim=-1)
        out.other_top1[s] = logq.argmax(dim=-1)
        logq.sub_(logp).neg_()  # log p - log q, in place
        out.kl[s] = (logp.exp_() * logq).sum(dim=-1).clamp_min_(0.0)
    return out
