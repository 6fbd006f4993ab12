"""One multiple-choice item scored under a protocol: each choice's log-likelihood, scored tokens, bytes and
characters, and the predictions each tool makes from them (ties: the lowest index, as numpy's argmax; llama.cpp's
Winogrande: option 2)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lm_ce.config.fields import Config
from lm_ce.errors import UsageError
from lm_ce.scoring.parallel import Plan
from lm_ce.scoring.passes import count_words
from lm_ce.sums.records import DocSums, DocumentResult, WindowSums
from lm_ce.sums.tasks import ChoiceRow
from lm_ce.tasks.forward import ONE_BY_ONE, WHOLE, Body, closes, group_values
from lm_ce.tasks.items import Item, item_of
from lm_ce.tasks.steps import ChunkOut, in_lockstep, share
from lm_ce.tasks.requests import Request, hellaswag_request, lm_eval_request, winogrande_request


@dataclass
class Scored:
    """An item's row of documents.jsonl and the exact sums of its scored tokens."""

    result: DocumentResult
    sums: DocSums


def first_max(values: list[float]) -> int:
    """The index of the first largest value (numpy's argmax; llama.cpp's strict `>` scan)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def predictions(protocol: str, lls: list[float], tokens: list[int], chars: list[int],
                n_bytes: list[int]) -> tuple[int, int, int]:
    """(pred, pred_norm, pred_bytes): lm-eval's argmax of the sums, of the sums per character and per byte; llama.cpp's
    prediction from the means per scored token (its Winogrande: option 1 only if strictly better) for all three."""
    if protocol == "lm-eval":
        return (first_max(lls), first_max([ll / n for ll, n in zip(lls, chars)]),
                first_max([ll / n for ll, n in zip(lls, n_bytes)]))
    means = [ll / n for ll, n in zip(lls, tokens)]
    pred = (0 if means[0] > means[1] else 1) if protocol == "llama-cpp-winogrande" else first_max(means)
    return pred, pred, pred


@dataclass
class ChoiceScorer:
    """Scores items under the configured protocol, several at a time (forward.probe_cache's reading `mode`)."""

    body: Body
    tokenizer: object
    cfg: Config
    prefix: int | None  # lm-eval's prefix token for an empty context (BOS, else EOS)
    mode: str  # forward.BATCHED, ONE_BY_ONE or WHOLE
    max_length: int  # tokens a choice may read at most
    budget: int  # padded tokens a group of items reads at most in one pass

    def score_chunk(self, rows: list[tuple[int, dict, str]], plan: Plan) -> ChunkOut | None:
        """The chunk's items scored, every world-th on each process (None: stopped inside the chunk)."""
        items = [item_of(self.cfg, *r) for r in rows]
        requests = [self.request(item) for item in items]
        for item, (request, _) in zip(items, requests):
            longest = max(request.rows_needed())
            if longest > self.max_length:
                raise UsageError(f"item {item.index}: a choice reads {longest} tokens, more than --max-length "
                                 f"{self.max_length}; give a larger --max-length (up to the model's positions)")
        plan.progress.add_total(sum(len(t) for request, _ in requests for t in request.targets))
        accelerator = plan.accelerator
        mine = share(self.groups([r for r, _ in requests]), accelerator.process_index, accelerator.num_processes)

        def work(group: list[int]) -> tuple[list[Scored], int, float]:
            scored = self.score([items[i] for i in group], [requests[i] for i in group])
            return scored, sum(s.result.tokens for s in scored), math.fsum(s.result.nll_sum for s in scored)

        done = in_lockstep(plan, mine, work)
        if done is None:
            return None
        found = sorted((s for group in done[0] for s in group), key=lambda s: s.result.index)
        return ChunkOut([s.result for s in found], {s.result.index: s.sums for s in found},
                        [WindowSums(s.result.index, 0, s.sums.nll, s.sums.tokens) for s in found],
                        tokens_per_process=done[1])

    def groups(self, requests: list[Request]) -> list[list[int]]:
        """The items (by position) in groups read together: by the length of their choices' common prefix, longest
        first, a group's prefixes of similar lengths (forward.closes), its tokens and its padded prefixes within the
        token budget (one item per group where the model's cache cannot be padded across items)."""
        inputs = [r.inputs() for r in requests]
        first = [r.shared_prefix() if self.mode != WHOLE else 0 for r in requests]
        out: list[list[int]] = []
        tokens = 0
        for i in sorted(range(len(requests)), key=lambda i: (-first[i], -sum(map(len, inputs[i])))):
            cost = first[i] + sum(len(s) - first[i] for s in inputs[i])
            width = first[out[-1][0]] if out else 0
            if out and self.mode != ONE_BY_ONE and tokens + cost <= self.budget and \
                    (len(out[-1]) + 1) * width <= self.budget and not closes(len(out[-1]), width, first[i]):
                out[-1].append(i)
                tokens += cost
            else:
                out.append([i])
                tokens = cost
        return out

    def request(self, item: Item) -> tuple[Request, list[str]]:
        """(the item's request, the strings its choices' characters and bytes are counted on)."""
        cfg = self.cfg
        if cfg.protocol == "llama-cpp-hellaswag":
            return hellaswag_request(self.tokenizer, item, cfg.choice_delimiter), item.choices
        if cfg.protocol == "llama-cpp-winogrande":
            return winogrande_request(self.tokenizer, item, cfg.llama_cpp_quirk), item.choices
        return lm_eval_request(self.tokenizer, item, cfg.choice_delimiter, self.prefix)

    @torch.inference_mode()
    def score(self, items: list[Item], requests: list[tuple[Request, list[str]]]) -> list[Scored]:
        """A group of items read together, each scored."""
        values = group_values(self.body, [r for r, _ in requests], self.mode != WHOLE, self.budget)
        return [self.scored(item, v, counted) for item, v, (_, counted) in zip(items, values, requests)]

    def scored(self, item: Item, values: list[list[tuple[float, bool]]], counted: list[str]) -> Scored:
        """One item's row and sums from its targets' (log p, top-1) values."""
        lls = [math.fsum(v for v, _ in choice) for choice in values]
        tokens = [len(choice) for choice in values]
        chars = [len(c) for c in counted]
        n_bytes = [len(c.encode("utf-8")) for c in counted]
        pred, pred_norm, pred_bytes = predictions(self.cfg.protocol, lls, tokens, chars, n_bytes)
        row = ChoiceRow(item.labels, lls, tokens, n_bytes, chars, pred, pred_norm, pred_bytes,
                        [all(top for _, top in choice) for choice in values])
        logps = [v for choice in values for v, _ in choice]
        result = DocumentResult(index=item.index, id=item.id, group=item.group, tokens=sum(tokens),
                                nll_sum=-math.fsum(lls), bytes=sum(n_bytes), words=sum(count_words(c) for c in counted),
                                windows=len(counted), task=row)
        return Scored(result, DocSums(nll=result.nll_sum, tokens=result.tokens, sum_sq=math.fsum(v * v for v in logps)))
