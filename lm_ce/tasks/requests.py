"""Which tokens each protocol scores for each choice of an item, and from where.

A `Request` holds one token sequence per choice and, per choice, its targets: (token, sequence, row) reads
log p(token) from the distribution after position `row` of sequence `sequence` (the sequence's own row before the
token, except for llama.cpp's Winogrande quirk). The rules, each its tool's own:

- lm-eval (lm-evaluation-harness's `loglikelihood`): the context's trailing whitespace moves to the continuation;
  the context is tokenized alone and with the continuation, the continuation's tokens are those of the whole after
  as many tokens as the context alone has; special tokens as the tokenizer adds them by default; all continuation
  tokens are scored and summed. An empty context is the prefix token (BOS, else EOS).
- llama-cpp-hellaswag (llama-perplexity's --hellaswag and --multiple-choice): each `context + delimiter + choice`
  tokenized whole, BOS in front when the tokenizer adds it; the tokens after the choices' common token prefix are
  scored, their mean is the choice's score.
- llama-cpp-winogrande (llama-perplexity's --winogrande): `before + option + after` tokenized whole; with more than
  three tokens after the common prefix in both, only the tokens after the option are scored, else those after the
  common prefix; the last token is left out; the mean is the score.
"""
from __future__ import annotations

from dataclasses import dataclass

from lm_ce.errors import UsageError
from lm_ce.scoring.windows import adds_bos
from lm_ce.tasks.items import Item

MIN_TRAILING = 3  # llama.cpp's k_min_trailing_ctx: a tail of this many tokens or fewer scores the options too


@dataclass
class Request:
    """One item's token sequences, one per choice, and each choice's targets (token, sequence, row)."""

    sequences: list[list[int]]
    targets: list[list[tuple[int, int, int]]]

    def rows_needed(self) -> list[int]:
        """How many positions of each sequence the model must read: up to the last row a target reads from it."""
        last = [0] * len(self.sequences)
        for targets in self.targets:
            for _, k, row in targets:
                last[k] = max(last[k], row + 1)
        return last

    def inputs(self) -> list[list[int]]:
        """The tokens of each sequence the model reads."""
        return [s[:n] for s, n in zip(self.sequences, self.rows_needed())]

    def shared_prefix(self) -> int:
        """How many leading tokens the model reads once for all the sequences."""
        return common_prefix(self.inputs())


def encode(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"] if text else []


def tool_encode(tokenizer, text: str) -> list[int]:
    """lm-eval's HFLM.tok_encode: the tokenizer's default special tokens, none when the text already starts with
    the BOS token's own string."""
    bos = tokenizer.bos_token
    return encode(tokenizer, text, not (bos and text.startswith(bos)))


def lm_eval_pair(tokenizer, context: str, continuation: str, prefix: int | None) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval's TemplateLM._encode_pair makes them."""
    if context == "":
        cont = encode(tokenizer, continuation, False)
        if prefix is None:
            raise UsageError("an item with an empty context needs a prefix token (BOS or EOS); the tokenizer has none")
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = tool_encode(tokenizer, stripped + continuation)
    ctx = tool_encode(tokenizer, stripped)
    return ctx, whole[len(ctx):]


def lm_eval_request(tokenizer, item: Item, delimiter: str, prefix: int | None) -> tuple[Request, list[str]]:
    """(request, the strings acc_norm divides by): every continuation token, from the row before it. Winogrande
    items are lm-eval's partial scoring: one context per option (the text before the blank and the option), the
    same continuation (the text after the blank, stripped) for all; acc_norm then divides by the contexts."""
    if item.blank is None:
        pairs = [(item.context, delimiter + c) for c in item.choices]
        normalized = item.choices
    else:
        normalized = [item.blank.before + option for option in item.choices]
        pairs = [(c, delimiter + item.blank.after.strip()) for c in normalized]
    sequences, targets = [], []
    for k, (context, continuation) in enumerate(pairs):
        ctx, cont = lm_eval_pair(tokenizer, context, continuation, prefix)
        if not cont:
            raise UsageError(f"item {item.index}: choice {k} tokenizes to nothing after its context; give it some text")
        sequences.append(ctx + cont)
        targets.append([(t, k, len(ctx) + i - 1) for i, t in enumerate(cont)])
    return Request(sequences, targets), normalized


def llama_tokenize(tokenizer, text: str) -> list[int]:
    """common_tokenize(text, add_special=true): BOS in front when the model's tokenizer adds it, nothing else."""
    ids = encode(tokenizer, text, False)
    return [tokenizer.bos_token_id, *ids] if adds_bos(tokenizer) else ids


def common_prefix(sequences: list[list[int]]) -> int:
    """How many leading tokens all sequences share."""
    n = min(len(s) for s in sequences)
    k = 0
    while k < n and all(s[k] == sequences[0][k] for s in sequences[1:]):
        k += 1
    return k


def hellaswag_request(tokenizer, item: Item, delimiter: str) -> Request:
    """llama-perplexity's --hellaswag / --multiple-choice: the tokens after the candidates' common prefix."""
    if item.blank is not None:
        raise UsageError("--protocol llama-cpp-hellaswag scores context and endings; Winogrande rows take "
                         "--protocol llama-cpp-winogrande or lm-eval")
    sequences = [llama_tokenize(tokenizer, item.context + delimiter + c) for c in item.choices]
    cp = common_prefix(sequences)
    if cp == 0:
        raise UsageError(f"item {item.index}: its choices share no first token, which llama.cpp's rule needs (it reads "
                         "the first scored token's logits after the common prefix); give it a context")
    return Request(sequences, [_span(item, k, s, cp, len(s)) for k, s in enumerate(sequences)])


def winogrande_request(tokenizer, item: Item, quirk: bool) -> Request:
    """llama-perplexity's --winogrande. With `quirk`, as llama.cpp computes it: when the options are scored too (a
    short tail), the second option's first scored token is read from the logits after the first sequence's last
    token (a FIXME in llama.cpp's source), not from its own."""
    if item.blank is None:
        raise UsageError("--protocol llama-cpp-winogrande scores Winogrande rows: give --layout winogrande")
    sequences = [llama_tokenize(tokenizer, item.blank.before + o + item.blank.after) for o in item.choices]
    bases = [len(llama_tokenize(tokenizer, item.blank.before + o)) for o in item.choices]
    cp = common_prefix(sequences)
    after_option = all(len(s) - cp > MIN_TRAILING for s in sequences)
    if cp == 0 or (after_option and min(bases) < cp):
        raise UsageError(f"item {item.index}: its options' tokens overlap the text around the blank in a way "
                         "llama.cpp's Winogrande rule cannot score; use --protocol lm-eval")
    targets = []
    for k, s in enumerate(sequences):
        base = bases[k] if after_option else cp
        last = 1 if len(s) - base > 1 else 0
        span = _span(item, k, s, base, len(s) - last)
        if quirk and k == 1 and not after_option:
            span[0] = (span[0][0], 0, len(sequences[0]) - 1)
        targets.append(span)
    return Request(sequences, targets)


def _span(item: Item, k: int, sequence: list[int], first: int, end: int) -> list[tuple[int, int, int]]:
    """The targets of positions first..end-1 of choice k, each read from the row before it."""
    if end <= first:
        raise UsageError(f"item {item.index}: choice {k} has no token left to score after the choices' common prefix "
                         "(two choices the same, or one a prefix of another); fix the item")
    return [(sequence[j], k, j - 1) for j in range(first, end)]
