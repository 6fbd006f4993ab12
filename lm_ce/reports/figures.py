"""The figures of a run from its exact running sums: counts, metrics (perplexity, bits per byte, word perplexity),
clustered uncertainty, loss by position, groups and the analyses' tables; also what `lm-ce merge` adds up."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TypedDict

from lm_ce.config.fields import Config
from lm_ce.errors import UsageError
from lm_ce.sums import stats
from lm_ce.sums.records import CurveSums, KeySums, RowSums, Run, Tally, TokenSums
from lm_ce.sums.signals import SignalSums
from lm_ce.sums.tasks import ChoiceSums, SurprisalSums


class Metrics(TypedDict):
    mean_loss: float | None
    perplexity: float | None
    bits_per_token: float | None
    bits_per_byte: float | None
    byte_perplexity: float | None
    word_perplexity: float | None


@dataclass(frozen=True)
class Totals:
    """The exact sums the headline figures are made from."""

    nll_sum: float
    tokens: int
    bytes: int
    words: int


def figures(cfg: Config, run: Run, stopped: bool) -> tuple[dict, Tally]:
    """(results.json's figures from the run's running sums: nll_sum, counts, metrics, uncertainty, by_position, and
    groups, compare and shard when there are some; the run-wide tally they came from). Also what `lm-ce merge`
    reports of the shards' sums added up."""
    rows, sums, tally, windows = run.rows, run.sums, run.tally, run.windows
    by_document = rows.by_document
    partial = run.partial is not None and run.partial.tokens > 0
    if partial:
        sums, tally, by_document = _with_partial(run)
        windows += len(run.partial.windows)
    totals = _totals(cfg, run, rows, sums, stopped, partial)
    if totals.tokens == 0 and not stopped and run.shard is None:  # a shard may hold no chunk of a small corpus
        _refuse_nothing_scored(cfg, rows)
    document = cfg.mode == "document"
    out = {
        "nll_sum": totals.nll_sum,
        "counts": {
            "tokens": totals.tokens, "documents": rows.documents,
            "skipped_documents": rows.skipped if document else rows.not_text,  # joined: rows with no text
            "bytes": rows.bytes if document else totals.bytes, "words": rows.words if document else totals.words,
            "windows": windows, "input_tokens": tally.inputs, "padding_tokens": tally.padding,
            "tokens_per_process": run.tokens_per_process, "double_prefix_removed": run.doubled_prefix,
            # a joined run's empty or whitespace-only rows: joined into its text with their separators, not skipped
            **({} if document else {"joined_empty_rows": rows.skipped - rows.not_text}),
        },
        "metrics": metrics(totals.nll_sum, totals.tokens, totals.bytes, totals.words),
        "uncertainty": _uncertainty(cfg, by_document, sums, totals),
        "by_position": tally.positions.buckets() if tally.positions is not None else [],
    }
    if cfg.group_field and document:
        out["groups"] = stats.group_table(rows.groups)
    if cfg.min_k is not None and document:  # the means of the finished documents' signals, run-wide and per group
        signals = rows.signals or {}
        out["signals"] = {"k": cfg.min_k, **signals.get(None, SignalSums()).means()}
        for name, row in out.get("groups", {}).items():
            row.update({k: v for k, v in signals.get(name, SignalSums()).means().items() if k != "documents"})
    if cfg.longppl_evaluator is not None and document:  # over the finished documents, run-wide and per group
        sums = rows.longppl or {}
        out["longppl"] = {**sums.get(None, KeySums()).figures(), **longppl_settings(cfg)}
        for name, row in out.get("groups", {}).items():
            group = sums.get(name, KeySums()).figures()
            row.update(longppl=group["perplexity"], longppl_key_tokens=group["key_tokens"])
    if run.task is not None:
        out.update(task_figures(cfg, run.task))
    if tally.compares:
        out["compare"] = {name: c.summary(n_bytes=totals.bytes) for name, c in zip(cfg.compare_to, tally.compares)}
    if run.shard is not None:
        k, n = (int(x) for x in run.shard.split("/"))
        out["shard"] = {"index": k, "count": n}
    if cfg.context_curve and run.curve is not None and run.curve.done:
        out["context_curve"] = curve_figures(run.curve, cfg.mode)
    return out, tally


CURVE_TARGETS = "every token with at least {} tokens of its sequence before it (after the prompt, if any)"


def curve_figures(curve: CurveSums, mode: str) -> dict:
    """results.json's `context_curve` from its exact sums (analysis/curve.py), one entry per length, with what
    defines its targets and windows."""
    nll = [s.value for s in curve.nll]
    means = [v / n if n else None for v, n in zip(nll, curve.tokens)]
    low = 1 if mode == "stream" else 0  # a stream window never scores its first token
    return {
        "lengths": curve.lengths,
        "mean_loss": means,
        "perplexity": [math.exp(m) if m is not None else None for m in means],
        "tokens": curve.tokens,
        "nll_sum": nll,
        "strides": curve.strides,
        "context": [[n - s + 1 - low, n - low] for n, s in zip(curve.lengths, curve.strides)],  # fewest, most seen
        "targets": CURVE_TARGETS.format(curve.lengths[-1]),
        "documents": curve.documents,
        "seconds": curve.seconds,
    }


def task_figures(cfg: Config, sums: ChoiceSums | SurprisalSums) -> dict:
    """results.json's multiple_choice or surprisal: the task's figures and what defined them."""
    if isinstance(sums, ChoiceSums):
        norm = "characters" if cfg.protocol == "lm-eval" else "tokens (the protocol's score is a mean per token)"
        return {"multiple_choice": {"protocol": cfg.protocol, "layout": cfg.layout, **sums.figures(),
                                    "acc_norm_divides_by": norm, "stderr_clusters": "items"}}
    style = cfg.bow_style if cfg.bow_correction else "none"
    first = {"pm": "divided by P(a first token of its kind | prefix)", "minicons": "no denominator",
             "none": "no correction"}[style]
    return {"surprisal": {**sums.figures(cfg.surprisal_unit), "bow_correction": style, "first_word": first,
                          "stderr_clusters": "documents"}}


def longppl_settings(cfg: Config) -> dict:
    """What defined results.json's key tokens: the evaluator, the short context and the two thresholds."""
    return {"evaluator": cfg.longppl_evaluator, "short": cfg.longppl_short, "step": cfg.longppl_step,
            "context": [cfg.longppl_short, cfg.longppl_short + cfg.longppl_step - 1], "alpha": cfg.longppl_alpha,
            "beta": cfg.longppl_beta}


def _with_partial(run: Run) -> tuple[TokenSums, Tally, stats.Clustered]:
    """(token sums, run-wide tally, document clusters) of the finished chunks and the stopped one's scored part
    (copies: the run is not changed). A document scored in part is a cluster of the tokens it has."""
    partial = run.partial
    sums = copy.deepcopy(run.sums)
    sums.add(partial)
    tally = Tally(positions=copy.deepcopy(run.tally.positions), compares=copy.deepcopy(run.tally.compares),
                  padding=run.tally.padding, inputs=run.tally.inputs)
    tally.merge(Tally(positions=partial.positions, compares=partial.compares, padding=partial.padding,
                      inputs=partial.inputs))
    by_document = copy.deepcopy(run.rows.by_document)
    for d in partial.docs.values():
        by_document.add(d.nll, d.tokens)
    return sums, tally, by_document


def _totals(cfg: Config, run: Run, rows: RowSums, sums: TokenSums, stopped: bool, partial: bool) -> Totals:
    """The token sums; bytes and words of the finished documents (a stream's only when complete). With a scored
    part of a stopped chunk, whose documents' bytes are not all scored, none: no per-byte or per-word figures."""
    if cfg.mode == "document":
        n_bytes, words = rows.bytes, rows.words
    else:
        n_bytes = run.stream_bytes if not stopped else 0
        words = run.stream_words if cfg.mode in ("llama-cpp", "gptq") else rows.words
        words = words if not stopped else 0
    if partial:
        n_bytes = words = 0
    return Totals(sums.nll.value, sums.tokens, n_bytes, words)


def _refuse_nothing_scored(cfg: Config, rows: RowSums) -> None:
    if rows.not_text == rows.rows:
        raise UsageError(f"nothing to score: no row has a string in field '{cfg.text_field}'; check --text-field")
    raise UsageError(
        f"nothing to score: all {rows.rows} documents tokenize to nothing (empty or whitespace only; check "
        f"--text-field '{cfg.text_field}')"
    )


def _uncertainty(cfg: Config, by_document: stats.Clustered, sums: TokenSums, totals: Totals) -> dict:
    """Standard errors clustered by document (by window for a single stream or a single document); in
    llama-cpp mode also llama-perplexity's own `PPL +/- error` (per-token, as it prints it)."""
    if cfg.mode == "document" and by_document.count >= 2:
        clusters, unit = by_document, "documents"
    else:
        clusters, unit = sums.by_window, "windows"
    sum_sq = sums.sum_sq.value
    out = stats.uncertainty(clusters, sum_sq, unit)
    if cfg.mode == "llama-cpp" and totals.tokens > 1:
        out["llama_cpp_perplexity_error"] = llama_cpp_error(totals.nll_sum, sum_sq, totals.tokens)
    return out


def llama_cpp_error(nll_sum: float, sum_sq: float, tokens: int) -> float | None:
    """The `+/-` llama-perplexity prints after PPL: exp(mean) * sqrt((E[nll^2] - mean^2) / (tokens - 1))."""
    mean = nll_sum / tokens
    variance = sum_sq / tokens - mean * mean
    return stats.exp_capped(mean) * math.sqrt(variance / (tokens - 1)) if variance > 0 else None


def metrics(nll_sum: float, tokens: int, n_bytes: int, words: int) -> Metrics:
    """All the figures from the exact sums: nats/token, perplexity, bits per token/byte, byte and word perplexity."""
    ln2 = math.log(2)

    def ratio(n):
        return nll_sum / n if n else None

    def exp(x):
        return None if x is None else stats.exp_capped(x)

    mean = ratio(tokens)
    per_byte = ratio(n_bytes)
    return {
        "mean_loss": mean,
        "perplexity": exp(mean),
        "bits_per_token": mean / ln2 if mean is not None else None,
        "bits_per_byte": per_byte / ln2 if per_byte is not None else None,
        "byte_perplexity": exp(per_byte),
        "word_perplexity": exp(ratio(words)),
    }
