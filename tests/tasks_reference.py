"""The plain reference of the multiple-choice and surprisal tasks: slow, simple and independent of lm_ce.

Each sequence read whole in its own forward pass (no cache, no batch, no padding), full logits, log_softmax in
float64; the model as given (the tests give a float64 copy of a tiny model, or SmolLM2 in float32 as the peers ran
it). The rules are the peers' own, read from their sources: lm-evaluation-harness 0.4.13's loglikelihood and
multiple_choice metrics, llama.cpp's llama-perplexity --hellaswag / --multiple-choice / --winogrande, minicons'
word_score_tokenized and wordsprobability (Pimentel & Meister's package). Nothing here imports lm_ce.
"""
from __future__ import annotations

import math

import torch


class LM:
    """A model and its tokenizer, read one whole sequence at a time."""

    def __init__(self, model, tokenizer):
        self.model, self.tok = model.eval(), tokenizer
        self.prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        output = model.get_output_embeddings()
        self.vocab = output.weight.shape[0] if output is not None else None

    @torch.no_grad()
    def logdist(self, ids: list[int]) -> torch.Tensor:
        """float64 log-probabilities: row r is the distribution of the token after ids[:r + 1]."""
        logits = self.model(torch.tensor([ids]), use_cache=False).logits[0]
        return torch.log_softmax(logits.double(), dim=-1)

    def plain(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def adds_bos(self) -> bool:
        bos = self.tok.bos_token_id
        return bos is not None and self.tok("a")["input_ids"][:1] == [bos] != self.plain("a")[:1]


def first_argmax(values) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


# --- lm-evaluation-harness -------------------------------------------------------------------------------------
def lmeval_split(lm: LM, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """TemplateLM._encode_pair: trailing whitespace of the context to the continuation; cont = whole[len(ctx):]."""
    if context == "":
        cont = lm.plain(continuation)
        return ([lm.prefix_id], cont) if cont[0] != lm.prefix_id else (cont[:1], cont[1:])
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole, ctx = lm.tok(stripped + continuation)["input_ids"], lm.tok(stripped)["input_ids"]
    return ctx, whole[len(ctx):]


def loglikelihood(lm: LM, context: str, continuation: str) -> tuple[float, bool, int]:
    """(sum of log p of the continuation tokens, is_greedy, tokens)."""
    ctx, cont = lmeval_split(lm, context, continuation)
    seq = ctx + cont
    rows = lm.logdist(seq[:-1])[len(ctx) - 1:]
    target = torch.tensor(cont)
    lp = rows[torch.arange(len(cont)), target]
    return float(lp.sum()), bool((rows.argmax(-1) == target).all()), len(cont)


def lmeval_item(lm: LM, context: str, choices: list[str], gold: list[int], delimiter: str = " ",
                normalized: list[str] | None = None, contexts: list[str] | None = None) -> dict:
    """lm-eval's multiple_choice metrics of one item (contexts: Winogrande's one context per option, the continuation
    then being `choices[0]` for every option)."""
    if contexts is None:
        res = [loglikelihood(lm, context, delimiter + c) for c in choices]
    else:
        res = [loglikelihood(lm, c, delimiter + choices[0]) for c in contexts]
    lls = [r[0] for r in res]
    normalized = normalized or choices
    chars = [len(c) for c in normalized]
    nbytes = [len(c.encode("utf-8")) for c in normalized]
    pred = first_argmax(lls)
    pred_norm = first_argmax([a / n for a, n in zip(lls, chars)])
    pred_bytes = first_argmax([a / n for a, n in zip(lls, nbytes)])
    return {"loglikelihoods": lls, "is_greedy": [r[1] for r in res], "tokens": [r[2] for r in res], "pred": pred,
            "pred_norm": pred_norm, "pred_bytes": pred_bytes, "acc": float(pred in gold),
            "acc_norm": float(pred_norm in gold), "acc_bytes": float(pred_bytes in gold)}


def lmeval_winogrande(lm: LM, sentence: str, option1: str, option2: str) -> dict:
    k = sentence.index("_")
    contexts = [sentence[:k] + option1, sentence[:k] + option2]
    return lmeval_item(lm, "", [sentence[k + 1:].strip()], [0], contexts=contexts, normalized=contexts)


def mean_stderr(xs: list[float]) -> float:
    """lm-eval's stderr of a mean: the (n-1) sample standard deviation over sqrt(n)."""
    n, mu = len(xs), sum(xs) / len(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


# --- llama.cpp llama-perplexity ------------------------------------------------------------------------------
def llama_tokens(lm: LM, text: str) -> list[int]:
    ids = lm.plain(text)
    return [lm.tok.bos_token_id, *ids] if lm.adds_bos() else ids


def common_prefix(seqs: list[list[int]]) -> int:
    k, n = 0, min(len(s) for s in seqs)
    while k < n and all(s[k] == seqs[0][k] for s in seqs[1:]):
        k += 1
    return k


def llama_hellaswag(lm: LM, context: str, endings: list[str]) -> dict:
    """--hellaswag / --multiple-choice: the mean log p of the tokens after the candidates' common prefix."""
    seqs = [llama_tokens(lm, context + " " + e) for e in endings]
    cp = common_prefix(seqs)
    means, counts = [], []
    for s in seqs:
        ld = lm.logdist(s)
        lps = [float(ld[j - 1, s[j]]) for j in range(cp, len(s))]
        means.append(sum(lps) / len(lps))
        counts.append(len(lps))
    return {"common_prefix": cp, "means": means, "counts": counts, "pred": first_argmax(means)}


def llama_winogrande(lm: LM, sentence: str, option1: str, option2: str, quirk: bool = True) -> dict:
    """--winogrande, with its FIXME reproduced when `quirk`: a short tail's second sequence reads its first scored
    token from the logits after the first sequence's last token."""
    k = sentence.index("_")
    first, second = sentence[:k], sentence[k + 1:]
    seqs = [llama_tokens(lm, first + o + second) for o in (option1, option2)]
    bases = [len(llama_tokens(lm, first + o)) for o in (option1, option2)]
    cp = common_prefix(seqs)
    skip_choice = all(len(s) - cp > 3 for s in seqs)
    lds = [lm.logdist(s) for s in seqs]
    means, counts = [], []
    for i, s in enumerate(seqs):
        base = bases[i] if skip_choice else cp
        last = 1 if len(s) - base > 1 else 0
        lps = []
        for j in range(base, len(s) - last):
            row = lds[0][len(seqs[0]) - 1] if quirk and i == 1 and not skip_choice and j == cp else lds[i][j - 1]
            lps.append(float(row[s[j]]))
        means.append(sum(lps) / len(lps))
        counts.append(len(lps))
    return {"common_prefix": cp, "skip_choice": skip_choice, "means": means, "counts": counts,
            "pred": 0 if means[0] > means[1] else 1}


def wilson(k: int, n: int, z: float = 1.95996398454) -> tuple[float, float]:
    f, zz = k / n, z * z / n
    half = zz * math.sqrt(n * (4.0 * f * (1 - f) + zz)) / (2 * z)
    return (f + zz / 2 - half) / (1 + zz), (f + zz / 2 + half) / (1 + zz)


# --- word surprisal ----------------------------------------------------------------------------------------------
def bow_ids(lm: LM) -> torch.Tensor:
    """Ids whose token string starts with the marker a lone space encodes to (minicons' rule)."""
    marker = lm.tok.convert_ids_to_tokens(lm.plain(" ")[0])[0]
    mask = torch.zeros(lm.vocab, dtype=torch.bool)
    for s, i in lm.tok.get_vocab().items():
        if i < lm.vocab and s.startswith(marker):
            mask[i] = True
    for i, t in lm.tok.added_tokens_decoder.items():
        if getattr(t, "lstrip", False) and i < lm.vocab:
            mask[i] = True
    return mask


def word_spans(lm: LM, words: list[str]) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokens of ' '.join(words); token t belongs to the word whose [end of the previous word, its end) holds the
    token's first character."""
    text = " ".join(words)
    enc = lm.tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    ends, pos = [], 0
    for w in words:
        pos += len(w)
        ends.append(pos)
        pos += 1
    spans, t = [], 0
    for e in ends:
        start = t
        while t < len(ids) and offsets[t][0] < e:
            t += 1
        spans.append((start, t))
    assert t == len(ids) and all(b > a for a, b in spans)
    return ids, spans


def word_surprisals(lm: LM, words: list[str], style: str, base: float = 2.0) -> list[dict]:
    """Per word: surprisal in log base `base` (style none, minicons or pm), entropy and rank at its first token.
    pm is wordsprobability's rule (EOS in the word-start set; the first word over P(not a word start | prefix),
    EOS counted twice there as the package counts it); minicons' is applied token by token as word_score_tokenized
    applies it."""
    ids, spans = word_spans(lm, words)
    seq = [lm.prefix_id, *ids]
    ld = lm.logdist(seq)
    lp = [float(ld[t, seq[t + 1]]) for t in range(len(ids))]
    bow = bow_ids(lm)
    ends = bow.clone()
    if lm.tok.eos_token_id is not None:
        ends[lm.tok.eos_token_id] = True

    def lse(row, mask):
        return float(torch.logsumexp(row[mask], 0))

    starts = [bool(bow[i]) for i in ids]
    out = []
    for k, (a, b) in enumerate(spans):
        value = sum(lp[a:b])
        if style == "pm":
            first = torch.logaddexp(torch.logsumexp(ld[0][~bow], 0), ld[0][lm.tok.eos_token_id])  # EOS twice, as wp
            value += lse(ld[b], ends) - (lse(ld[a], ends) if k else float(first))
        elif style == "minicons":
            for t in range(a, b):
                if t == len(ids) - 1 or starts[t + 1]:
                    value += lse(ld[t + 1], bow)
                if t > 0 and starts[t]:
                    value -= lse(ld[t], bow)
        row = ld[a]
        out.append({"word": words[k], "surprisal": -value / math.log(base), "tokens": b - a,
                    "entropy": float(-(row.exp() * row).nan_to_num().sum()) / math.log(base),
                    "rank": int((row > row[seq[a + 1]]).sum()) + 1})
    return out
