"""Log-probabilities where a task reads them: a choice's targets through the perplexity path's tiled head; the
surprisal task's whole distributions in float64 from the model's float32 logits.

The choices of an item share a prefix (their context, or their common tokens): it is read once, its cache copied
to every choice and the rest of each choice read on top of it, instead of each choice whole as
lm-evaluation-harness does. Several items are read together: their prefixes left-padded in one batch, then all
their choices' remainders in another, over the copied caches (attention mask and positions given). Whether a
model's cache gives what whole sequences give, across items (padded) and for one item, is probed once per run
(`probe_cache`); where it does not, items are read one at a time, or each choice whole (items batched, padded on
the right, which no causal model reads).
"""
from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lm_ce.scoring.head import Head, logits_losses, token_losses
from lm_ce.scoring.scorer import body as body_of, final_hidden
from lm_ce.tasks.requests import Request

ROW_BYTES = 32 * 2**20  # float64 log-probabilities held at once
BATCHED, ONE_BY_ONE, WHOLE = "batched", "one item at a time", "whole"
BAND = 0.875  # a pass reads sequences of at least this share of its longest (at most 1/8 of it padding) ...
MIN_TOKENS = 256  # ... once it reads this many tokens


@dataclass
class Body:
    """The model as the tasks read it: final hidden states then the head, or (no splittable head) full logits."""

    model: torch.nn.Module
    head: Head | None
    device: torch.device

    def states(self, ids: torch.Tensor, cache=None, keep_cache: bool = False,
               padding: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, object]:
        """([batch, length, hidden] hidden states, or logits without a head; the cache, when kept or given).
        `padding`: (attention mask over the cache and ids, position ids of ids), where some rows are padded."""
        module = body_of(self.model) if self.head is not None else self.model
        kwargs = {"use_cache": keep_cache or cache is not None}
        if cache is not None:
            kwargs[cache_argument(module)] = cache
        if padding is not None:
            kwargs.update(attention_mask=padding[0].to(self.device), position_ids=padding[1].to(self.device))
        out = module(input_ids=ids.to(self.device), **kwargs)
        states = out.last_hidden_state if self.head is not None else out.logits
        if not kwargs["use_cache"]:
            return states, None
        found = getattr(out, "cache", None)  # transformers 5; before it, past_key_values
        return states, found if found is not None else getattr(out, "past_key_values", None)

    def rows(self, inputs: dict, rows: torch.Tensor) -> torch.Tensor:
        """The states at flat positions `rows` of a padded batch (scoring.scorer's batch inputs)."""
        if self.head is not None:
            return final_hidden(self.model, inputs, rows)
        logits = self.model(**inputs, use_cache=False).logits
        return logits.reshape(-1, logits.shape[-1]).index_select(0, rows.to(logits.device))

    def log_probs(self, states: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, float64 log-probabilities over the vocabulary) of the given rows, a block at a time."""
        vocab = self.head.vocab_size if self.head is not None else states.shape[-1]
        rows = max(1, ROW_BYTES // (8 * vocab))
        for start in range(0, states.shape[0], rows):
            block = states[start : start + rows]
            logits = self.head.logits(block) if self.head is not None else block.float()
            yield start, torch.log_softmax(logits.double(), dim=-1)


def cache_argument(module: torch.nn.Module) -> str:
    """The keyword a model's forward takes its cache by: `cache` (transformers 5), else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def padded(sequences: list[list[int]]) -> torch.Tensor:
    """The sequences right-padded with token 0: causal attention keeps every real token from seeing a later pad, and
    positions count from each sequence's start, so no mask is needed."""
    ids = torch.zeros(len(sequences), max(len(s) for s in sequences), dtype=torch.long)
    for r, s in enumerate(sequences):
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids


class Reader:
    """A group of requests' sequences read in passes: the shared prefixes (left-padded, cache kept), the remainders
    over copies of that cache, and whole sequences (requests with no shared prefix, or all when not `shared`).
    Each pass keeps only the states a target reads; `index(j, k, row)` says where the state after row `row` of
    request j's sequence k lies in `states`."""

    def __init__(self, body: Body, requests: list[Request], shared: bool, budget: int):
        self.body, self.budget = body, budget
        inputs = [r.inputs() for r in requests]
        self.first = [r.shared_prefix() if shared else 0 for r in requests]
        self.wanted: dict[tuple[int, int], set[int]] = {}  # (request, sequence or -1: its prefix) -> rows read
        for j, r in enumerate(requests):
            for _, k, row in (target for targets in r.targets for target in targets):
                self.wanted.setdefault(self._key(j, k, row), set()).add(row)
        self.kept: list[torch.Tensor] = []
        self.at: dict[tuple[tuple[int, int], int], int] = {}
        cached = [j for j, f in enumerate(self.first) if f]
        if cached:
            self._prefixes_then_rests(inputs, cached)
        whole = sorted(((j, k) for j, f in enumerate(self.first) if not f for k in range(len(inputs[j]))),
                       key=lambda jk: -len(inputs[jk[0]][jk[1]]))
        for part in batches(whole, lambda jk: len(inputs[jk[0]][jk[1]]), 0, budget):
            self._keep(body.states(padded([inputs[j][k] for j, k in part]))[0], [(key, 0) for key in part])
        self.states = torch.cat(self.kept)

    def _prefixes_then_rests(self, inputs: list[list[list[int]]], cached: list[int]) -> None:
        """The `cached` requests' prefixes in one pass, then their sequences' remainders, longest first."""
        prefixes = [inputs[j][0][: self.first[j]] for j in cached]
        width = max(len(p) for p in prefixes)
        mask = torch.zeros(len(prefixes), width, dtype=torch.long)
        for g, p in enumerate(prefixes):
            mask[g, width - len(p) :] = 1
        ids = torch.zeros_like(mask)
        ids[mask.bool()] = torch.tensor([t for p in prefixes for t in p], dtype=torch.long)
        ragged = bool((mask == 0).any())  # else no mask and no position ids, as for one item
        padding = (mask, (mask.cumsum(1) - 1).clamp(min=0)) if ragged else None
        states, cache = self.body.states(ids, keep_cache=True, padding=padding)
        self._keep(states, [((j, -1), width - self.first[j]) for j in cached])  # prefix row r: column width - first + r
        rest = sorted(((j, k) for j in cached for k, s in enumerate(inputs[j]) if len(s) > self.first[j]),
                      key=lambda jk: -len(inputs[jk[0]][jk[1]]) + self.first[jk[0]])
        parts = list(batches(rest, lambda jk: len(inputs[jk[0]][jk[1]]) - self.first[jk[0]], width, self.budget))
        slot = {j: g for g, j in enumerate(cached)}  # a request's row in the prefixes' pass and cache
        for n, part in enumerate(parts):
            owner = [slot[j] for j, _ in part]
            copied = cache if n == len(parts) - 1 else copy.deepcopy(cache)  # the last pass takes the cache itself
            copied.reorder_cache(torch.tensor(owner, device=self.body.device))
            ids = padded([inputs[j][k][self.first[j] :] for j, k in part])
            if ragged:  # keys: the prefix's mask, then the remainder; positions go on from each prefix's length
                steps = torch.arange(ids.shape[1])
                padding = (torch.cat([mask[owner], torch.ones_like(ids)], dim=1),
                           torch.stack([self.first[j] + steps for j, _ in part]))
            states = self.body.states(ids, cache=copied, padding=padding)[0]
            self._keep(states, [((j, k), -self.first[j]) for j, k in part])  # remainder row r: column r - first

    def _key(self, j: int, k: int, row: int) -> tuple[int, int]:
        return (j, -1) if row < self.first[j] else (j, k)

    def _keep(self, states: torch.Tensor, placed: list[tuple[tuple[int, int], int]]) -> None:
        """From a pass's [rows, width, ...] states, the rows its targets read: row b holds placed[b]'s key, whose
        row r lies at column r + shift."""
        width, flat, base = states.shape[1], [], sum(len(x) for x in self.kept)
        for b, (key, shift) in enumerate(placed):
            for row in sorted(self.wanted.get(key, ())):
                self.at[(key, row)] = base + len(flat)
                flat.append(b * width + row + shift)
        rows = torch.tensor(flat, dtype=torch.long, device=states.device)
        self.kept.append(states.reshape(-1, *states.shape[2:]).index_select(0, rows))

    def index(self, j: int, k: int, row: int) -> int:
        """Where the state after row `row` of request j's sequence k lies in `states`."""
        return self.at[(self._key(j, k, row), row)]


def batches(keys: list, length, before: int, budget: int) -> Iterator[list]:
    """`keys` (longest first) in consecutive batches whose rows times (`before` + their longest) stay within
    `budget` tokens, cut where padding would grow (`closes`)."""
    part: list = []
    for key in keys:
        if part and ((len(part) + 1) * (before + length(part[0])) > budget or
                     closes(len(part), length(part[0]), length(key))):
            yield part
            part = []
        part.append(key)
    if part:
        yield part


def closes(rows: int, longest: int, n: int) -> bool:
    """Whether a pass of `rows` sequences of up to `longest` tokens ends before one of n tokens: when that one
    would be padded by more than 1 - BAND of its row and the pass already reads MIN_TOKENS (fewer make slow
    matrix products)."""
    return n < BAND * longest and rows * longest >= MIN_TOKENS


def group_values(body: Body, requests: list[Request], shared: bool,
                 budget: int) -> list[list[list[tuple[float, bool]]]]:
    """Per request, per choice, per target: (log p of the target, whether it is the model's top-1 there), the
    group's sequences read together (their common prefixes once each when `shared`), in passes of at most `budget`
    padded tokens (counting the cache a remainder reads). The log-probabilities are the perplexity path's own
    (scoring.head: log-sum-exp over the vocabulary a tile at a time)."""
    reader = Reader(body, requests, shared, budget)
    where = [[[(reader.index(j, k, row), t) for t, k, row in targets] for targets in r.targets]
             for j, r in enumerate(requests)]
    pairs = sorted({pair for at in where for choice in at for pair in choice})  # a state read for several tokens: once each
    states = reader.states.index_select(0, torch.tensor([flat for flat, _ in pairs], device=reader.states.device))
    targets = torch.tensor([t for _, t in pairs], device=states.device)
    if body.head is not None:
        losses = token_losses(states, targets, body.head, want_top1=True)
    else:
        losses = logits_losses(states, targets, want_top1=True)
    found = {pair: (-nll, top == pair[1]) for pair, nll, top in zip(pairs, losses.nll.tolist(), losses.top1.tolist())}
    return [[[found[pair] for pair in choice] for choice in at] for at in where]


PROBE_TOLERANCE = 1e-3  # nats, float32 (half precision: HALF_TOLERANCE); a cache that does not work is off by ~1
HALF_TOLERANCE = 0.1
PROBE_BUDGET = 40  # tokens per pass: the probe's remainders are read in two passes (a copied cache each)


def probe_requests(vocab: int) -> list[Request]:
    """Three short items: two choices after a common prefix of 8 tokens, two after one of 5 (so that prefixes are
    padded and remainders differ in length), and two with none."""
    ids = [(7919 * i + 13) % vocab for i in range(1, 14)]
    items = [[ids[:12], ids[:8] + ids[9:11]], [ids[3:8] + ids[1:4], ids[3:8] + ids[9:13]], [ids[:6], ids[1:5]]]
    return [Request(seqs, [[(s[j], k, j - 1) for j in range(1, len(s))] for k, s in enumerate(seqs)]) for seqs in items]


def probe_cache(body: Body) -> tuple[str, str | None]:
    """How the choices are read: (BATCHED, None) when prefixes read once, padded across items, their caches copied
    to the choices, give what reading every sequence whole and alone gives; else (ONE_BY_ONE, why) when one item's
    prefix read once does; else (WHOLE, why): each choice whole (items batched)."""
    requests = probe_requests(body.model.get_input_embeddings().num_embeddings)
    dtype = next(body.model.parameters()).dtype
    tolerance = PROBE_TOLERANCE if dtype in (torch.float32, torch.float64) else HALF_TOLERANCE
    with torch.inference_mode():
        alone = [group_values(body, [Request([s], [[(t, 0, row) for t, _, row in targets]])], False, PROBE_BUDGET)[0][0]
                 for r in requests for s, targets in zip(r.sequences, r.targets)]
    why = _differs(body, requests, alone, tolerance)
    if why is None:
        return BATCHED, None
    per_item = [_differs(body, [r], alone[2 * j : 2 * j + 2], tolerance) for j, r in enumerate(requests[:2])]
    if all(w is None for w in per_item):
        return ONE_BY_ONE, f"with prefixes padded across items {why}"
    return WHOLE, next(w for w in per_item if w is not None)


def _differs(body: Body, requests: list[Request], alone: list[list[tuple[float, bool]]], tolerance: float) -> str | None:
    """None when the requests read with their prefixes shared give the values of `alone`; else why not."""
    try:
        with torch.inference_mode():
            shared = [choice for request in group_values(body, requests, True, PROBE_BUDGET) for choice in request]
    except Exception as e:  # noqa: BLE001 - any failure of the cache path means: read otherwise
        return f"its cache cannot be reused per choice ({type(e).__name__})"
    error = max(abs(a[0] - b[0]) for x, y in zip(shared, alone) for a, b in zip(x, y))
    if not error <= tolerance:
        return f"its cache gives other log-probabilities than whole sequences ({error:.3g} nats apart)"
    return None
