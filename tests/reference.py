"""The plain reference lm_ce is checked against: deliberately simple, slow and independent.

Float64 copy of the model, full logits, torch.log_softmax in float64, one window per forward
pass, batch size 1, no padding, no attention mask. Nothing here imports lm_ce.

Notation: S is the token sequence; a window (start, a, b) feeds S[start:b] to the model and
scores the targets S[a+1], ..., S[b], each S[j] predicted from S[start:j] (so start <= a < b).
"""
from __future__ import annotations

import copy
import math
import weakref

import torch

_FLOAT64: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, torch.nn.Module]]" = weakref.WeakKeyDictionary()


def _params_key(model: torch.nn.Module) -> tuple:
    """Identity and in-place version of every parameter: a cached float64 copy is stale when this changes."""
    return tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters())


def as_float64(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself when already float64 (or loaded in float64 by transformers, which keeps a few modules of
    some architectures in float32, as it runs them), else a float64 deep copy in eval mode (cached per model).
    A model marked `reference_as_loaded = True` is used as it is: the few architectures transformers cannot run in
    float64 (tests/zoo.py says which and why)."""
    if (all(p.dtype == torch.float64 for p in model.parameters()) or getattr(model, "dtype", None) == torch.float64
            or getattr(model, "reference_as_loaded", False)):
        return model.eval()
    key = _params_key(model)
    cached = _FLOAT64.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    model64 = copy.deepcopy(model).double().eval()
    _FLOAT64[model] = (key, model64)
    return model64


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def document_windows(n_seq: int, first_target: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (start, a, b) scoring S[first_target:] of a sequence of n_seq tokens once each (document mode)."""
    if max_length < 1 or not 1 <= stride <= max_length:
        raise ValueError(f"need 1 <= stride <= max_length, got stride={stride}, max_length={max_length}")
    if first_target < 1:
        raise ValueError("S[0] has no context and can never be a target")
    last = n_seq - 1
    a0 = first_target - 1
    # Unclipped right end of window k is base + k * stride; each target goes to the first window reaching it.
    base = max_length if a0 < max_length else a0 + stride
    groups: dict[int, list[int]] = {}
    for t in range(first_target, n_seq):
        k = max(0, -(-(t - base) // stride))
        groups.setdefault(min(last, base + k * stride), []).append(t)
    return [(max(0, b - max_length), min(targets) - 1, b) for b, targets in sorted(groups.items())]


def stream_windows(n_seq: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (start, a, b) of the transformers "Perplexity of fixed-length models" recipe; S[0] is never scored."""
    if max_length < 1 or stride < 1:
        raise ValueError(f"need max_length >= 1 and stride >= 1, got {max_length}, {stride}")
    windows = []
    prev_b = 0
    for begin in range(0, n_seq, stride):
        end = min(begin + max_length, n_seq)
        b = end - 1
        # S[begin] has no context inside its window (the model's label shift drops it): a >= begin.
        a = max(prev_b, begin)
        if b > a:
            windows.append((begin, a, b))
        prev_b = b
        if end == n_seq:
            break
    return windows


def llama_cpp_windows(n_seq: int, n_ctx: int, n_chunks: int | None = None) -> list[tuple[int, int, int]]:
    """llama-perplexity's chunks as windows: chunk i is S[i*n_ctx:(i+1)*n_ctx]; the logits at chunk positions
    n_ctx/2 .. n_ctx-2 are scored against the next token; whole chunks only."""
    count = n_seq // n_ctx if n_chunks is None else min(n_seq // n_ctx, n_chunks)
    return [(i * n_ctx, i * n_ctx + n_ctx // 2, i * n_ctx + n_ctx - 1) for i in range(count)]


def gptq_windows(n_seq: int, seqlen: int) -> list[tuple[int, int, int]]:
    """The GPTQ script's chunks S[i*seqlen:(i+1)*seqlen], each with labels = input_ids (seqlen - 1 targets)."""
    return [(i * seqlen, i * seqlen, (i + 1) * seqlen - 1) for i in range(n_seq // seqlen)]


@torch.no_grad()
def reference_nll(model: torch.nn.Module, seq: list[int], windows: list[tuple[int, int, int]],
                  first_id: int | None = None) -> tuple[float, int]:
    """Sum of -log p(S[j] | S[start:j]) over every window's targets, float64, one forward per window.
    With first_id, every window's first input token is first_id instead of S[start]."""
    model64 = as_float64(model)
    device = _device(model64)
    nll_sum = 0.0
    n_tokens = 0
    for start, a, b in windows:
        if not 0 <= start <= a < b < len(seq):
            raise ValueError(f"bad window {(start, a, b)} for a sequence of {len(seq)} tokens")
        inputs = list(seq[start:b])
        if first_id is not None:
            inputs[0] = first_id
        input_ids = torch.tensor([inputs], dtype=torch.long, device=device)
        logits = model64(input_ids=input_ids, use_cache=False).logits[0]
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        for j in range(a + 1, b + 1):
            nll_sum -= logprobs[j - 1 - start, seq[j]].item()
        n_tokens += b - a
    return nll_sum, n_tokens


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of text, without special tokens."""
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def document_sequence(tokenizer, text: str, prefix_id: int | None, prompt: str | None = None) -> tuple[list[int], int]:
    """(S, first_target) of one document: S = [prefix_id] + ids; with a prompt, lm-eval's _encode_pair split."""
    prefix = [] if prefix_id is None else [prefix_id]
    if prompt is None:
        return prefix + encode(tokenizer, text), 1
    n_spaces = len(prompt) - len(prompt.rstrip())
    if n_spaces:  # lm-eval moves the prompt's trailing whitespace to the start of the continuation
        text = prompt[-n_spaces:] + text
        prompt = prompt[:-n_spaces]
    whole = encode(tokenizer, prompt + text)
    ctx = encode(tokenizer, prompt)
    # S[0] can never be scored; that bound only bites with no prefix and an empty encoded prompt.
    return prefix + whole, max(1, len(prefix) + len(ctx))


def reference_document(
    model: torch.nn.Module,
    tokenizer,
    text: str,
    prefix_id: int | None,
    max_length: int,
    stride: int,
    prompt: str | None = None,
) -> tuple[float, int]:
    """(nll_sum, n_tokens) of one document in document mode (lm-eval loglikelihood_rolling generalized)."""
    seq, first_target = document_sequence(tokenizer, text, prefix_id, prompt)
    return reference_nll(model, seq, document_windows(len(seq), first_target, max_length, stride))


def reference_stream(
    model: torch.nn.Module, tokenizer, texts: list[str], max_length: int, stride: int, separator: str = "\n\n"
) -> tuple[float, int]:
    """(nll_sum, n_tokens) of the texts joined by separator, encoded once, in stream windows."""
    seq = encode(tokenizer, separator.join(texts))
    return reference_nll(model, seq, stream_windows(len(seq), max_length, stride))


@torch.no_grad()
def transformers_recipe_steps(
    model: torch.nn.Module, tokenizer, texts: list[str], max_length: int, stride: int, separator: str = "\n\n"
) -> list[tuple[float, int, int]]:
    """Per window of the docs recipe: (outputs.loss, num_loss_tokens as the docs count it, tokens the loss averaged)."""
    model64 = as_float64(model)
    device = _device(model64)
    encodings = tokenizer(separator.join(texts), return_tensors="pt")  # as the docs call it
    seq_len = encodings.input_ids.size(1)
    steps = []
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = encodings.input_ids[:, begin_loc:end_loc].to(device)
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        num_valid_tokens = (target_ids != -100).sum().item()
        batch_size = target_ids.size(0)
        num_loss_tokens = num_valid_tokens - batch_size  # the docs subtract batch_size for the label shift
        averaged = (target_ids[:, 1:] != -100).sum().item()  # what the shifted loss really averages over
        if averaged > 0:  # a one-token last window gives loss NaN with num_loss_tokens 0: NaN * 0 skipped
            outputs = model64(input_ids, labels=target_ids, use_cache=False)
            steps.append((outputs.loss.item(), num_loss_tokens, averaged))
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return steps


def reference_transformers_recipe(
    model: torch.nn.Module, tokenizer, texts: list[str], max_length: int, stride: int, separator: str = "\n\n"
) -> float:
    """Perplexity as the transformers docs recipe computes it: exp(sum(loss * num_loss_tokens) / sum(num_loss_tokens)).

    Literal, including its two quirks: num_loss_tokens = valid labels - 1 also for overlapping windows,
    whose first label is masked, so each such window is weighted one token short; and outputs.loss
    is computed by transformers in float32 (ForCausalLMLoss upcasts logits with .float()) even for
    this float64 model. The text is encoded with the tokenizer's default special tokens, as in the docs.
    """
    steps = transformers_recipe_steps(model, tokenizer, texts, max_length, stride, separator)
    nll_sum = sum(loss * num_loss_tokens for loss, num_loss_tokens, _ in steps)
    n_tokens = sum(num_loss_tokens for _, num_loss_tokens, _ in steps)
    return math.exp(nll_sum / n_tokens) if n_tokens > 0 else float("nan")


@torch.no_grad()
def reference_tokens(model: torch.nn.Module, seq: list[int], windows: list[tuple[int, int, int]],
                     first_id: int | None = None) -> list[dict]:
    """Every scored target: its index j in S, NLL, the model's top-1 and log-probabilities (float64).
    With first_id, every window's first input token is first_id instead of S[start]."""
    model64 = as_float64(model)
    rows = []
    for start, a, b in windows:
        inputs = list(seq[start:b])
        if first_id is not None:
            inputs[0] = first_id
        input_ids = torch.tensor([inputs], dtype=torch.long, device=_device(model64))
        logprobs = torch.log_softmax(model64(input_ids=input_ids, use_cache=False).logits[0].double(), dim=-1)
        for j in range(a + 1, b + 1):
            row = logprobs[j - 1 - start]
            rows.append({"j": j, "nll": -row[seq[j]].item(), "top1": int(row.argmax()), "window_position": j - 1 - start,
                         "logprobs": row})
    return rows


def reference_signals(model: torch.nn.Module, tokenizer, text: str, prefix_id: int | None, max_length: int,
                      stride: int, k: float) -> dict | None:
    """--min-k's signals of one document from float64 full log-probabilities: min_k (mean of the m = max(1,
    floor(k n)) lowest log p(x_t)), min_k_plus_plus (the same of z_t = (log p(x_t) - mu_t) / sigma_t, mu_t and
    sigma_t the mean and standard deviation of log p under p) and zlib_ratio; None for a document with no target."""
    import zlib

    seq, first_target = document_sequence(tokenizer, text, prefix_id)
    model64 = as_float64(model)
    lp, z = [], []
    with torch.no_grad():
        for start, a, b in document_windows(len(seq), first_target, max_length, stride):
            input_ids = torch.tensor([seq[start:b]], dtype=torch.long, device=_device(model64))
            logp = torch.log_softmax(model64(input_ids=input_ids, use_cache=False).logits[0].double(), dim=-1)
            logp = logp[a - start : b - start]  # the rows predicting S[a+1..b]
            p = logp.exp()
            mu = (p * logp).sum(-1)
            sigma = (p * (logp - mu[:, None]) ** 2).sum(-1).sqrt()
            picked = logp.gather(1, torch.tensor(seq[a + 1 : b + 1], device=logp.device)[:, None]).squeeze(1)
            lp += picked.tolist()
            z += ((picked - mu) / sigma).tolist()
    if not lp:
        return None
    m = max(1, math.floor(k * len(lp)))
    return {"min_k": sum(sorted(lp)[:m]) / m, "min_k_plus_plus": sum(sorted(z)[:m]) / m,
            "zlib_ratio": -sum(lp) / len(lp) / len(zlib.compress(text.encode("utf-8")))}


@torch.no_grad()
def reference_longppl(model: torch.nn.Module, tokenizer, evaluator: torch.nn.Module, evaluator_tokenizer, text: str, *,
                      prefix_id: int | None, evaluator_prefix_id: int | None, max_length: int, stride: int, short: int,
                      step: int, alpha: float, beta: float) -> tuple[float, int]:
    """(NLL sum, count) of the model's key tokens in one document, LongPPL's definition from float64 full logits.

    The evaluator scores each target t of its own sequence E with the document windows (full context) and with
    E[c:t], c = t - short - ((t - short) mod step) (the short context, as the paper's code slides it), for every t
    with at least `short` tokens before it; t is key when loss_short - loss_full > alpha and loss_full < beta. With
    another tokenizer, adjacent key tokens' characters are merged into spans, and the model's tokens lying within
    a span are its key tokens; with the same, the key targets are the model's own."""
    seq, first = document_sequence(tokenizer, text, prefix_id)
    mine = {r["j"]: r["nll"] for r in reference_tokens(model, seq, document_windows(len(seq), first, max_length, stride))}
    same = evaluator is model or (tokenizer.get_vocab() == evaluator_tokenizer.get_vocab()
                                  and prefix_id == evaluator_prefix_id)
    e_seq = seq if same else document_sequence(evaluator_tokenizer, text, evaluator_prefix_id)[0]
    full = {r["j"]: r["nll"] for r in reference_tokens(evaluator, e_seq, document_windows(len(e_seq), 1, max_length,
                                                                                          stride))}
    model64 = as_float64(evaluator)
    key = []
    for t in range(max(short, 1), len(e_seq)):
        c = t - short - ((t - short) % step)
        logits = model64(input_ids=torch.tensor([e_seq[c:t]], device=_device(model64)), use_cache=False).logits[0, -1]
        loss_short = -torch.log_softmax(logits.double(), dim=-1)[e_seq[t]].item()
        if loss_short - full[t] > alpha and full[t] < beta:
            key.append(t)
    if not same:
        def spans(tok, prefix):
            offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            return [None] * (prefix is not None) + [tuple(o) for o in offsets]

        e_spans, my_spans = spans(evaluator_tokenizer, evaluator_prefix_id), spans(tokenizer, prefix_id)
        merged = []
        for t in key:
            s, e = e_spans[t]
            if merged and merged[-1][1] == s:
                merged[-1] = (merged[-1][0], e)
            else:
                merged.append((s, e))
        key = [j for j in range(1, len(seq)) if any(s <= my_spans[j][0] and my_spans[j][1] <= e for s, e in merged)]
    return sum(mine[j] for j in key), len(key)
