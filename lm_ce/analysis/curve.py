"""Perplexity against context length (--context-curve): the same target tokens scored with each context length.

The targets: every token of a sequence S (a document with its prefix token in document mode, the joined text in
stream mode) that has at least max(lengths) tokens of S before it, and, with --prompt-field, comes after the
prompt. Point L scores exactly those targets with the windows a plain run with --max-length L --stride s_L would
use, s_L = max(1, L // context_curve_divisor) (in stream mode at most L - 1), so point L equals that run restricted
to the targets. Each target sees between L - s_L + 1 and L tokens of context (document mode), or between L - s_L
and L - 1 (stream mode, whose windows never score their first token); a point reads about L / s_L input tokens
per target, so the default divisor 4 gives every target 3/4 L to L tokens of context for 4 tokens read.
"""
from __future__ import annotations

import dataclasses
import logging
import time

from lm_ce.data import documents as data
from lm_ce.scoring.parallel import Plan, gather, save_if_due, score_windows
from lm_ce.scoring.passes import TokenSequence, document_chunks, stream_sequence, tokenize_share
from lm_ce.scoring.progress import Progress
from lm_ce.scoring.windows import document_spans, stream_spans, windows_of
from lm_ce.sums.records import CurveSums, DocumentResult, Run

log = logging.getLogger("lm_ce")


def curve_stride(length: int, divisor: int, mode: str = "document") -> int:
    """The stride of the windows of context length `length`: targets see between length - stride + 1 and length.
    In stream mode at most length - 1: a stream window that moves by its whole length skips its first token."""
    stride = max(1, length // divisor)
    return min(stride, length - 1) if mode == "stream" else stride


def restricted(spans: list[tuple[int, int, int]], first: int) -> list[tuple[int, int, int]]:
    """The spans scoring only targets S[first:], the windows themselves unchanged (the same context per target)."""
    return [(start, max(a, first - 1), b) for start, a, b in spans if b >= first]


def curve_spans(mode: str, n_seq: int, first_target: int, length: int, stride: int,
                longest: int) -> list[tuple[int, int, int]]:
    """The windows of context length `length` over the curve's targets of one sequence: a plain run's windows
    (--max-length length --stride stride), restricted to the targets with at least `longest` tokens before them."""
    if mode == "stream":
        return restricted(stream_spans(n_seq, length, stride), longest)
    return restricted(document_spans(n_seq, first_target, length, stride), max(longest, first_target))


def context_curve(plan: Plan, tokenizer, run: Run) -> bool:
    """Score the curve into `run.curve` (results.json's `context_curve`, made by reports.figures): each length's
    exact NLL sum over the same targets, a chunk of documents at a time (a shard's own chunks), saved with the
    run between chunks, so that --resume continues it. True when stopped before its end."""
    cfg = plan.cfg
    longest = cfg.context_curve[-1]
    strides = [curve_stride(n, cfg.context_curve_divisor, cfg.mode) for n in cfg.context_curve]
    if run.curve is None or (run.curve.lengths, run.curve.strides) != (cfg.context_curve, strides):
        run.curve = CurveSums.empty(cfg.context_curve, strides)
    curve = run.curve
    if curve.done:
        return False
    # Its own progress bar; its points' runs are never saved (the state holds the curve's sums, between chunks).
    curve_plan = dataclasses.replace(plan, setup=dataclasses.replace(plan.setup, max_length=longest),
                                     progress=Progress(plan.progress.enabled, main=plan.progress.main))
    # The token budget bounds a batch's memory: short windows fill it (more of them than --batch-size).
    plans = [dataclasses.replace(curve_plan, cfg=dataclasses.replace(
        cfg, output_dir=None, batch_size=max(cfg.batch_size, plan.setup.budget // n))) for n in cfg.context_curve]
    started = time.perf_counter()
    try:
        for sequences in _sequences(plan, tokenizer, curve.chunks_done):
            sums = []
            for k, point_plan in enumerate(plans):
                windows = []
                for index in sorted(sequences):
                    s = sequences[index]
                    spans = curve_spans(cfg.mode, len(s.ids), s.first_target, curve.lengths[k], curve.strides[k],
                                        longest)
                    windows += windows_of(index, s.ids, spans, plan.setup.window_first)
                results = {index: DocumentResult(index=index) for index in sequences}
                if score_windows(windows, point_plan, Run(tally=curve_plan.new_tally()), results):
                    log.warning("stopped during --context-curve: its sums are saved up to the last finished chunk; "
                                "--resume continues it")
                    return True
                sums.append(results)
            plan.settled = False  # a KeyboardInterrupt from here to chunk_added would save half a chunk's sums
            for k, results in enumerate(sums):  # every document's exact sum: the same with any shards or processes
                for index in sorted(results):
                    curve.nll[k].add(results[index].nll_sum)
                    curve.tokens[k] += results[index].tokens
            curve.documents += sum(len(s.ids) - 1 >= max(longest, s.first_target) for s in sequences.values())
            curve.chunks_done += 1
            curve.seconds += time.perf_counter() - started
            plan.chunk_added()
            started = time.perf_counter()
            save_if_due(plan, run)
    finally:
        curve_plan.progress.close()
    curve.done = True
    if not any(curve.tokens):
        log.warning("--context-curve: no token has %d tokens of context before it; give shorter lengths or longer "
                    "documents (context_curve lists empty points)", longest)
    return False


def _sequences(plan: Plan, tokenizer, done: int):
    """{index: TokenSequence} per chunk of documents this run scores, from its `done`-th on (document mode), or the one
    joined stream (stream mode, index -1)."""
    cfg = plan.cfg
    if cfg.mode == "stream":
        if done:
            return
        texts = [d.text for d in data.iter_documents(cfg, plan.rows, read=plan.read) if d.text is not None]
        ids, _ = stream_sequence(plan, tokenizer, texts)
        yield {-1: TokenSequence(ids, 1)}
        return
    rank, world = plan.accelerator.process_index, plan.accelerator.num_processes
    for docs in document_chunks(plan, done):
        share = tokenize_share(docs, tokenizer, plan.setup.prefix, rank, world, cfg.detokenizer)
        yield {k: v for part in gather(share, plan) for k, v in part.items()}
