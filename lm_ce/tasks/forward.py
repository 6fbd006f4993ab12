"""Log-probabilities where a task reads them, in float64 from the model's float32 logits.

The choices of an item share a prefix (their context, or their common tokens): it is computed once, its cache
copied to every choice and the rest of each choice read on top of it, instead of each choice whole as
lm-evaluation-harness does. Whether a model's cache gives what a whole sequence gives is probed once per run
(`probe_cache`); a model whose cache cannot be reused (or copied per choice) has each choice scored whole.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lm_ce.scoring.head import Head
from lm_ce.scoring.scorer import final_hidden
from lm_ce.tasks.requests import Request, common_prefix

ROW_BYTES = 32 * 2**20  # float64 log-probabilities held at once


@dataclass
class Body:
    """The model as the tasks read it: final hidden states then the head, or (no splittable head) full logits."""

    model: torch.nn.Module
    head: Head | None
    device: torch.device

    def states(self, ids: torch.Tensor, cache=None, keep_cache: bool = False) -> tuple[torch.Tensor, object]:
        """([batch, length, hidden] hidden states, or logits without a head; the cache, when kept or given)."""
        module = self.model.base_model if self.head is not None else self.model
        kwargs = {"use_cache": keep_cache or cache is not None}
        if cache is not None:
            kwargs[cache_argument(module)] = cache
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


def whole_states(body: Body, inputs: list[list[int]], wanted: list[tuple[int, int]]) -> torch.Tensor:
    """The states at (sequence, row) for each wanted pair, every sequence read whole."""
    states, _ = body.states(padded(inputs))
    return torch.stack([states[k, row] for k, row in wanted])


def shared_states(body: Body, inputs: list[list[int]], wanted: list[tuple[int, int]], shared: int) -> torch.Tensor:
    """The same states, the sequences' first `shared` tokens (common to all) read once and their cache copied to
    each sequence's remainder."""
    prefix, cache = body.states(torch.tensor([inputs[0][:shared]]), keep_cache=True)
    rest = [k for k, s in enumerate(inputs) if len(s) > shared]
    after = None
    if rest:
        cache.batch_repeat_interleave(len(rest))
        after, _ = body.states(padded([inputs[k][shared:] for k in rest]), cache=cache)
    at = {k: i for i, k in enumerate(rest)}
    return torch.stack([prefix[0, row] if row < shared else after[at[k], row - shared] for k, row in wanted])


def target_values(body: Body, request: Request, shared: bool) -> list[list[tuple[float, bool]]]:
    """Per choice, per target: (log p of the target in float64, whether the target is the model's top-1 there)."""
    inputs = [s[:n] for s, n in zip(request.sequences, request.rows_needed())]
    first = common_prefix(inputs) if shared else 0

    def key(k: int, row: int) -> tuple[int, int]:  # a row inside the common prefix is read once, for all sequences
        return (0, row) if row < first else (k, row)

    wanted = sorted({key(k, row) for targets in request.targets for _, k, row in targets})
    place = {pair: i for i, pair in enumerate(wanted)}
    tokens: dict[int, set[int]] = {}
    for targets in request.targets:
        for t, k, row in targets:
            tokens.setdefault(place[key(k, row)], set()).add(t)
    states = shared_states(body, inputs, wanted, first) if first else whole_states(body, inputs, wanted)
    found: dict[tuple[int, int], tuple[float, bool]] = {}
    for start, logp in body.log_probs(states):
        top = logp.argmax(dim=-1).tolist()
        for i in range(logp.shape[0]):
            for t in tokens[start + i]:
                found[(start + i, t)] = (float(logp[i, t]), top[i] == t)
    return [[found[(place[key(k, row)], t)] for t, k, row in targets] for targets in request.targets]


PROBE_TOLERANCE = 1e-3  # nats, float32 (half precision: HALF_TOLERANCE); a cache that does not work is off by ~1


HALF_TOLERANCE = 0.1


def probe_cache(body: Body) -> str | None:
    """None when a prefix read once with its cache copied to two continuations gives the log-probabilities that
    reading the two sequences whole gives; else why not (the choices are then scored whole)."""
    vocab = body.model.get_input_embeddings().num_embeddings
    ids = [(7919 * i + 13) % vocab for i in range(1, 13)]
    sequences = [ids, ids[:8] + ids[9:11]]
    request = Request(sequences, [[(s[j], k, j - 1) for j in range(8, len(s))] for k, s in enumerate(sequences)])
    try:
        with torch.inference_mode():
            shared = target_values(body, request, shared=True)
            whole = target_values(body, request, shared=False)
    except Exception as e:  # noqa: BLE001 - any failure of the cache path means: score whole
        return f"its cache cannot be reused per choice ({type(e).__name__})"
    error = max(abs(a[0] - b[0]) for x, y in zip(shared, whole) for a, b in zip(x, y))
    dtype = next(body.model.parameters()).dtype
    tolerance = PROBE_TOLERANCE if dtype in (torch.float32, torch.float64) else HALF_TOLERANCE
    if not error <= tolerance:
        return f"its cache gives other log-probabilities than whole sequences ({error:.3g} nats apart)"
    return None
