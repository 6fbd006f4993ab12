"""Token-level cross-entropy from final hidden states.

The head (hidden -> vocabulary logits) and the log-sum-exp are computed in float32 one tile of
(rows x vocabulary slice) at a time, the log-sum-exp combined across slices, so the logits never
take more than one tile of memory whatever the batch, length or vocabulary, and the head's weight
is read once per block of rows (not once per small chunk, which makes large vocabularies slow).
The definitions are the ones of the cross-entropy tutorial this project grew from:
nll(token) = -log softmax(logits)[target] = logsumexp(logits) - logits[target].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Bytes of float32 logits one tile may hold, and rows per block: large enough for an efficient
# matrix multiply, small enough to stay near the cache.
CHUNK_BYTES = 8 * 2**20  # measured on a 2-core CPU: at the matmul's own time for 49k and 262k vocabularies
ROW_BLOCK = 2048


@dataclass
class Head:
    """What a causal LM applies between its final hidden states and its logits."""

    weight: torch.Tensor  # [vocab, hidden]
    bias: torch.Tensor | None = None
    scale: float = 1.0  # logits *= scale (Cohere's logit_scale, Granite's 1 / logits_scaling)
    softcap: float | None = None  # logits = softcap * tanh(logits / softcap) (Gemma 2 and 3)

    def logits(self, hidden: torch.Tensor, vocab: slice = slice(None)) -> torch.Tensor:
        """Float32 logits of a block of hidden states over a slice of the vocabulary, with every
        transform the model applies (all of them act on each logit alone, so slices are exact)."""
        weight = self.weight[vocab]
        if hidden.dtype != torch.float32:
            if hidden.is_cuda:  # float32 accumulation and output, no bf16 rounding of logits
                out = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
            else:
                out = hidden.float() @ self.float_weight()[vocab].t()
        else:
            out = hidden @ weight.t()
        if self.bias is not None:
            out += self.bias[vocab].float()
        if self.scale != 1.0:
            out *= self.scale
        if self.softcap is not None:
            out.div_(self.softcap).tanh_().mul_(self.softcap)
        return out

    def float_weight(self) -> torch.Tensor:
        """The weight in float32, converted once (CPU path for half-precision models)."""
        if getattr(self, "_float_weight", None) is None:
            self._float_weight = self.weight.float()
        return self._float_weight


def head_of(model: torch.nn.Module) -> Head | None:
    """The model's head as a Head, or None when it is not a plain linear layer we can split."""
    out = model.get_output_embeddings()
    if not isinstance(out, torch.nn.Linear):
        return None
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = 1.0
    if getattr(config, "logit_scale", None):  # Cohere
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None):  # Granite divides
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return Head(out.weight, out.bias, scale, float(softcap) if softcap else None)


def chunk_rows(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk of float32 logits over the whole vocabulary takes about chunk_bytes."""
    return max(16, chunk_bytes // (4 * vocab_size))


@dataclass
class TokenLosses:
    """Per-token negative log-likelihood (nats, float32) and the model's top-1 prediction."""

    nll: torch.Tensor
    top1: torch.Tensor | None = None


def token_losses(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: Head,
    rows: int | None = None,
    want_top1: bool = False,
    vocab_block: int | None = None,
) -> TokenLosses:
    """nll[i] = logsumexp(head(hidden[i])) - head(hidden[i])[targets[i]], one tile at a time.

    Blocks of `rows` rows; within a block, slices of `vocab_block` logits whose log-sum-exps are
    combined with logaddexp (and whose maxima give the top-1)."""
    n, vocab = hidden.shape[0], head.weight.shape[0]
    rows = rows or min(max(n, 1), ROW_BLOCK)
    cols = min(vocab, vocab_block or max(1024, CHUNK_BYTES // (4 * rows)))
    nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
    top1 = torch.empty(n, dtype=torch.long, device=hidden.device) if want_top1 else None
    for start in range(0, n, rows):
        block = slice(start, min(start + rows, n))
        h, t = hidden[block], targets[block]
        lse = target = best = None
        for v0 in range(0, vocab, cols):
            logits = head.logits(h, slice(v0, v0 + cols))
            inside = (t >= v0) & (t < v0 + logits.shape[1])
            picked = logits.gather(1, (t - v0).clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)
            target = torch.where(inside, picked, target if target is not None else picked)
            if top1 is not None:
                value, index = logits.max(dim=-1)
                if best is None or v0 == 0:
                    best, top1[block] = value, index
                else:
                    better = value > best
                    best = torch.where(better, value, best)
                    top1[block] = torch.where(better, index + v0, top1[block])
            part = torch.logsumexp(logits, dim=-1)
            lse = part if lse is None else torch.logaddexp(lse, part)
        nll[block] = lse - target
    return TokenLosses(nll, top1)


def logits_losses(logits: torch.Tensor, targets: torch.Tensor, want_top1: bool = False) -> TokenLosses:
    """The same quantities from logits the model already computed (the fallback path)."""
    logits = logits.float()
    nll = torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[:, None]).squeeze(1)
    return TokenLosses(nll, logits.argmax(dim=-1) if want_top1 else None)


@dataclass
class PairLosses:
    """Two models on the same tokens: each one's NLL and top-1, and KL(first || second) per token."""

    nll: torch.Tensor
    top1: torch.Tensor
    other_nll: torch.Tensor
    other_top1: torch.Tensor
    kl: torch.Tensor


def pair_losses(
    hidden: torch.Tensor, head: Head, other_hidden: torch.Tensor, other_head: Head, targets: torch.Tensor, rows: int | None = None
) -> PairLosses:
    """Per-token NLL of both models and KL(P_first || P_second) = sum_v p(v) (log p(v) - log q(v)), chunked."""
    n = hidden.shape[0]
    rows = rows or max(8, chunk_rows(head.weight.shape[0]) // 3)  # three vocab-wide blocks live at once
    out = PairLosses(*(torch.empty(n, dtype=dt, device=hidden.device) for dt in (torch.float32, torch.long, torch.float32, torch.long, torch.float32)))
    for start in range(0, n, rows):
        s = slice(start, min(start + rows, n))
        t = targets[s, None]
        logp = torch.log_softmax(head.logits(hidden[s]), dim=-1)
        logq = torch.log_softmax(other_head.logits(other_hidden[s]), dim=-1)
        out.nll[s] = -logp.gather(1, t).squeeze(1)
        out.other_nll[s] = -logq.gather(1, t).squeeze(1)
        out.top1[s] = logp.argmax(dim=-1)
        out.other_top1[s] = logq.argmax(dim=-1)
        logq.sub_(logp).neg_()  # log p - log q, in place
        out.kl[s] = (logp.exp_() * logq).sum(dim=-1).clamp_min_(0.0)
    return out
