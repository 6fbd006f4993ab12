"""Token sequences, the windows that score them, and batches of windows.

A sequence S is what one document (document mode) or the whole corpus (stream mode) becomes.
A window (start, a, b) feeds S[start:b] to the model and scores the targets S[a+1..b]: the
input position i predicts S[start+i+1], and positions before a-start are masked context.
Every target of S from `first_target` on is scored exactly once. A window may put another token
(BOS, the prefix) at its first input position: `first_id`; its targets stay those of S.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Window:
    doc: int  # index of the document (its position in the run) this window scores
    seq: torch.Tensor  # the whole sequence S (int64); windows of one document share it
    start: int
    a: int
    b: int
    target_offset: int  # how many of the document's targets come before this window's first
    first_id: int | None = None  # put at input position 0 in place of S[start] (BOS per chunk, every-window prefix)
    bytes: torch.Tensor | None = None  # int64 [len(S), 3]: each token's byte span and owner document (bytespans.py)

    def inputs(self) -> torch.Tensor:
        """The input ids S[start:b], with first_id at position 0 when set."""
        ids = self.seq[self.start : self.b]
        if self.first_id is None or int(ids[0]) == self.first_id:
            return ids
        ids = ids.clone()
        ids[0] = self.first_id
        return ids

    @property
    def length(self) -> int:
        return self.b - self.start

    @property
    def n_context(self) -> int:
        return self.a - self.start

    @property
    def n_scored(self) -> int:
        return self.b - self.a


def document_spans(n_seq: int, first_target: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows of one document: the first predicts up to max_length targets, each later one at most
    `stride` new targets with the tokens before them as context (lm-evaluation-harness's rolling
    windows when stride == max_length)."""
    first_target = max(first_target, 1)  # S[0] has nothing before it: never a target
    last = n_seq - 1
    if last < first_target:
        return []
    a = first_target - 1
    b = min(last, max_length) if a < max_length else min(last, a + stride)
    spans = [(max(0, b - max_length), a, b)]
    while b < last:
        a, b = b, min(last, b + stride)
        spans.append((max(0, b - max_length), a, b))
    return spans


def stream_spans(n_seq: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows of the transformers docs recipe: one every `stride` tokens, each scoring the tokens the
    previous windows did not. A window's first token has no context inside it and is not scored there,
    as in the recipe (S[0] never; with stride == max_length, the first token of every window)."""
    spans, prev = [], 0
    for begin in range(0, n_seq, stride):
        end = min(begin + max_length, n_seq)
        a = max(prev, begin)
        if end - 1 > a:
            spans.append((begin, a, end - 1))
        prev = end - 1
        if end == n_seq:
            break
    return spans


def llama_cpp_spans(n_seq: int, n_ctx: int, chunks: int | None = None) -> list[tuple[int, int, int]]:
    """Windows of llama.cpp's `llama-perplexity`: chunks of n_ctx tokens (the remainder dropped, at most
    `chunks` of them), each scoring only its second half, the targets at chunk positions n_ctx/2+1 .. n_ctx-1."""
    first = n_ctx // 2
    spans = []
    for i in range(chunk_count(n_seq, n_ctx, chunks)):
        start = i * n_ctx
        spans.append((start, start + first, start + n_ctx - 1))
    return spans


def gptq_spans(n_seq: int, n_ctx: int, chunks: int | None = None) -> list[tuple[int, int, int]]:
    """Windows of the GPTQ/AWQ evaluation script: chunks of n_ctx tokens (the remainder dropped, at most
    `chunks` of them), each scored as `labels = input_ids` scores it: the targets at positions 1 .. n_ctx-1."""
    return [(i * n_ctx, i * n_ctx, i * n_ctx + n_ctx - 1) for i in range(chunk_count(n_seq, n_ctx, chunks))]


def chunk_count(n_seq: int, n_ctx: int, chunks: int | None) -> int:
    """Whole chunks of n_ctx tokens in n_seq (`numel // n_ctx`), at most `chunks`."""
    n = n_seq // n_ctx
    return n if chunks is None else min(n, chunks)


def without_double_prefix(ids: list[int], prefix: int | None) -> tuple[list[int], bool]:
    """(ids, removed): the text's ids without a leading prefix token when one is placed before them anyway
    (a text that begins with the BOS/EOS string, or a tokenizer that adds BOS itself)."""
    if prefix is not None and ids and ids[0] == prefix:
        return ids[1:], True
    return ids, False


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a text by default (as llama.cpp's add_bos asks)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos and ids[:1] != tokenizer("a", add_special_tokens=False)["input_ids"][:1]


def document_sequence(tokenizer, text: str, prefix_id: int | None, prompt: str | None = None) -> tuple[list[int], int]:
    """(S, first_target) of one document: prefix + [prompt] + text tokens; targets start after the prompt.

    With a prompt the pair is encoded as a whole and split where the prompt's tokens end, moving
    the prompt's trailing whitespace to the text (as lm-evaluation-harness encodes context/continuation)."""
    prefix = [prefix_id] if prefix_id is not None else []
    if prompt is None:
        return prefix + encode(tokenizer, text), len(prefix)
    stripped = prompt.rstrip()
    text = prompt[len(stripped):] + text
    whole = encode(tokenizer, stripped + text)
    n_prompt = len(encode(tokenizer, stripped))
    return prefix + whole, len(prefix) + n_prompt


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a text with no special tokens added (prefixes are ours to place)."""
    if not text:
        return []
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def windows_of(doc: int, seq: list[int] | torch.Tensor, spans: list[tuple[int, int, int]],
               first_id: int | None = None, byte_spans: torch.Tensor | None = None) -> list[Window]:
    """Window records for the spans of one sequence (a list of ids, or an int64 tensor, shared, not copied);
    `first_id` goes at every window's first input position; `byte_spans` (shared too) rides along for tokens.parquet."""
    tensor = torch.as_tensor(seq, dtype=torch.long)
    out, offset = [], 0
    for start, a, b in spans:
        out.append(Window(doc, tensor, start, a, b, offset, first_id, byte_spans))
        offset += b - a
    return out


MAX_PADDING = 0.1  # a batch is closed rather than let padding exceed this share of its positions


def plan_batches(windows: list[Window], batch_size: int, token_budget: int) -> list[list[Window]]:
    """Batches of windows of similar length, longest first, each at most `batch_size` windows and
    `token_budget` padded input tokens, and at most MAX_PADDING of padding (compute spent on nothing)."""
    order = sorted(windows, key=lambda w: (-w.length, w.doc, w.a))
    batches: list[list[Window]] = []
    current: list[Window] = []
    real = 0
    for w in order:
        width = current[0].length if current else w.length  # sorted: the first is the longest
        slots = (len(current) + 1) * width
        if current and (len(current) >= batch_size or slots > token_budget or slots - real - w.length > MAX_PADDING * slots):
            batches.append(current)
            current, real = [], 0
        current.append(w)
        real += w.length
    if current:
        batches.append(current)
    return batches


def assign_batches(batches: list[list[Window]], world: int) -> list[list[list[Window] | None]]:
    """Each process's share of the batches, balanced by tokens, padded with None to equal length
    so that every process takes the same number of steps (no collective ever hangs)."""
    loads = [0] * world
    shares: list[list] = [[] for _ in range(world)]
    for batch in batches:  # longest first: greedy least-loaded assignment balances well
        rank = min(range(world), key=lambda r: (loads[r], r))
        shares[rank].append(batch)
        loads[rank] += sum(w.length for w in batch)
    steps = max(len(s) for s in shares)
    return [s + [None] * (steps - len(s)) for s in shares]
