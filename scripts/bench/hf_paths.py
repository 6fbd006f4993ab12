"""The transformers peers, as a careful user writes them by hand, on lm_ce's own windows.

  file-order  model(input_ids, labels=...) with a fixed batch size, windows in file order, right padding.
  labels      the same, on windows sorted by length (longest first), right padding with an attention mask.
  body        the model body alone on the sorted batches, with the mask (no head, no loss).
  plan-body   the model body alone on lm_ce's own batches (its plan, right padding, no mask): what lm_ce's
              forward passes cost without its head and loss.
In both body paths, afterwards and untimed in the body's figure, the head's matrix multiply alone over every
scored position's final hidden state is timed, in lm_ce's blocks of rows and tiles: the faster body plus that
matmul is the measured limit of an exact evaluator.

A window (start, a, b) scores S[a+1..b]. transformers shifts labels inside the model, so the labels paths
feed S[start:b+1] (one token more than lm_ce); the body is fed lm_ce's exact input S[start:b].
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from .measure import profiler, read_texts, save_profile, status_mb

BODIES = ("body", "plan-body")


@dataclass
class Span:
    """One window of one document's sequence: feed seq[start:b] (+1 for labels), score seq[a+1..b]."""

    doc: int
    seq: list[int]
    start: int
    a: int
    b: int


def run_hf(spec: dict, mode: str) -> dict:
    """Time one transformers path over the case's data: reading, tokenizing, windowing and the loop."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype, attn_implementation="sdpa").eval()
    load_seconds = time.perf_counter() - t0
    after_load = status_mb("VmRSS")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    step = Stepper(model, mode, pad, spec["batch_size"], token_budget(spec))
    if spec["warmup"]:
        step.run(spans_of(tokenizer, read_texts(spec["warmup_data"]), spec["max_length"]))
    step.hidden.clear()
    after_warmup = status_mb("VmRSS")
    with profiler(spec) as prof:
        start, cpu_start = time.perf_counter(), time.process_time()
        spans = spans_of(tokenizer, read_texts(spec["data"]), spec["max_length"])
        prepared = time.perf_counter()
        nll, tokens, padded = step.run(spans)
        end, cpu_end = time.perf_counter(), time.process_time()
    result = {
        "path": mode, "tokens": tokens, "nll_sum": nll if mode not in BODIES else None, "seconds": end - start,
        "loop_seconds": end - prepared, "prep_seconds": prepared - start, "load_seconds": load_seconds,
        "cpu_seconds": cpu_end - cpu_start, "windows": len(spans), "padded_tokens": padded,
        "input_tokens": sum(s.b - s.start for s in spans),
        "memory": {"after_load_mb": after_load, "before_scoring_mb": after_warmup, "after_warmup_mb": after_warmup,
                   "peak_before_head_mb": status_mb("VmHWM")},
        "parameters": parameter_counts(model), "profile": save_profile(prof, spec, mode),
    }
    if mode in BODIES:
        result["head_matmul"] = head_matmul(model, step.hidden)
    return result


def spans_of(tokenizer, texts: list[str], max_length: int) -> list[Span]:
    """lm_ce's windows of each text (its prefix token, its encoding, its document spans), in file order."""
    from lm_ce.config.fields import Config
    from lm_ce.scoring.setup import prefix_id
    from lm_ce.scoring.windows import document_spans, encode

    prefix = prefix_id(Config(mode="document", prefix_token="auto"), tokenizer)
    head = [prefix] if prefix is not None else []
    out = []
    for doc, text in enumerate(texts):
        seq = head + encode(tokenizer, text)
        out += [Span(doc, seq, s, a, b) for s, a, b in document_spans(len(seq), len(head), max_length, max_length)]
    return out


def token_budget(spec: dict) -> int:
    """lm_ce's token budget for the case (its CPU default, or the one given to lm_ce with --lm-ce)."""
    import torch

    from lm_ce.scoring.setup import default_budget

    given = spec.get("lm_ce_options", {}).get("token_budget")
    return given or default_budget(spec["batch_size"], spec["max_length"], torch.device("cpu"))


def batches_of(spans: list[Span], mode: str, batch_size: int, budget: int) -> list[list[Span]]:
    """file-order: fixed batches in file order; labels and body: fixed batches of the windows sorted by length
    (longest first); plan-body: lm_ce's own batches (lm_ce.windows.plan_batches)."""
    if mode == "plan-body":
        from lm_ce.scoring.windows import Window, plan_batches

        windows = [Window(s.doc, s.seq, s.start, s.a, s.b, 0) for s in spans]  # the fields plan_batches reads
        return plan_batches(windows, batch_size, budget)
    if mode != "file-order":
        spans = sorted(spans, key=lambda s: -(s.b - s.start))
    return [spans[i : i + batch_size] for i in range(0, len(spans), batch_size)]


class Stepper:
    """One path's loop: batches (file order, or sorted by length) through the model, NLL summed in float64."""

    def __init__(self, model, mode: str, pad: int, batch_size: int, budget: int):
        self.model, self.mode, self.pad, self.batch_size, self.budget = model, mode, pad, batch_size, budget
        self.body = getattr(model, "model", None) or model.base_model
        self.hidden: list = []  # the body path's scored final hidden states, for the head-matmul timing

    def run(self, spans: list[Span]) -> tuple[float, int, int]:
        """(NLL sum, scored tokens, padded input positions) over all spans."""
        nll, tokens, padded = 0.0, 0, 0
        for batch in batches_of(spans, self.mode, self.batch_size, self.budget):
            s, n, p = self.batch(batch)
            nll, tokens, padded = nll + s, tokens + n, padded + p
        return nll, tokens, padded

    def batch(self, batch: list[Span]) -> tuple[float, int, int]:
        import torch

        extra = 0 if self.mode in BODIES else 1  # the labels paths feed the last target too
        width = max(s.b + extra - s.start for s in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for r, s in enumerate(batch):
            n = s.b + extra - s.start
            ids[r, :n] = torch.as_tensor(s.seq[s.start : s.b + extra])
            mask[r, :n] = 1
            labels[r, s.a + 1 - s.start : n] = ids[r, s.a + 1 - s.start : n]
        scored = sum(s.b - s.a for s in batch)
        with torch.no_grad():
            if self.mode == "file-order":  # the unmasked hand-written loop (right padding never leaks)
                return float(self.model(ids, labels=labels).loss) * scored, scored, ids.numel()
            if self.mode == "labels":
                return float(self.model(ids, attention_mask=mask, labels=labels).loss) * scored, scored, ids.numel()
            # lm_ce's batches are right-padded and need no mask (a real token never attends to a later pad)
            hidden = self.body(input_ids=ids, attention_mask=None if self.mode == "plan-body" else mask,
                               use_cache=False).last_hidden_state
        rows = [hidden[r, s.a - s.start : s.b - s.start] for r, s in enumerate(batch)]
        self.hidden.append(torch.cat(rows))
        return 0.0, scored, ids.numel()


def head_matmul(model, hidden: list) -> dict:
    """Seconds of the head's matrix multiply alone over the scored hidden states: lm_ce's blocks of rows and
    tiles of the vocabulary (lm_ce.loss.ROW_BLOCK, tile_columns), each written into one reused buffer."""
    import torch

    from lm_ce.scoring.head import ROW_BLOCK, tile_columns

    weight = model.get_output_embeddings().weight
    states = torch.cat(hidden).to(weight.dtype)
    rows = min(len(states), ROW_BLOCK)
    cols = min(weight.shape[0], tile_columns(rows))
    out = torch.empty(rows, cols, dtype=weight.dtype)

    def matmul(block, v0):
        w = weight[v0 : v0 + cols]
        torch.mm(block, w.t(), out=out[: len(block), : len(w)])

    with torch.no_grad():
        matmul(states[:rows], 0)  # warm
        start, cpu_start = time.perf_counter(), time.process_time()
        for i in range(0, len(states), rows):
            for v0 in range(0, weight.shape[0], cols):
                matmul(states[i : i + rows], v0)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start,
            "rows": len(states), "block_rows": rows, "tile_columns": cols}


def parameter_counts(model) -> dict:
    """Parameters of the body's matrix multiplies and of the head (the head's share of the FLOPs per token)."""
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    head = model.get_output_embeddings().weight.numel()
    embed = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    body = sum(unique.values()) - embed - (0 if tied else head)
    return {"total": sum(unique.values()), "head": head, "embedding": embed, "tied": tied,
            "body_matmul": body, "head_share": head / (head + body)}
