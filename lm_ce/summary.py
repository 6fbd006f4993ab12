"""results.json: the figures from a run's exact sums, and what was run (model, data, settings, environment).

The key paths typed below are a contract other tools read; the README's key table documents each one.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import TypedDict

import torch

from . import stats
from .config import Config
from .errors import UsageError
from .data import MEMORY, local_files
from .model import ModelInfo, file_sha256
from .protocols import PROTOCOLS, protocol_values
from .outputs import Outputs
from .records import KeySums, Results, RowSums, Run, Tally, TokenSums
from .setup import Setup
from .signals import SignalSums


class Counts(TypedDict):
    tokens: int
    documents: int
    skipped_documents: int
    bytes: int
    words: int
    windows: int
    input_tokens: int
    padding_tokens: int
    tokens_per_process: list[int]
    double_prefix_removed: int


class Metrics(TypedDict):
    mean_loss: float | None
    perplexity: float | None
    bits_per_token: float | None
    bits_per_byte: float | None
    byte_perplexity: float | None
    word_perplexity: float | None


class Timing(TypedDict):
    seconds: float
    tokens_per_second: float | None
    load_seconds: float
    total_seconds: float


class Summary(TypedDict, total=False):
    """What results.json holds (groups and compare only when asked for)."""

    nll_sum: float
    counts: Counts
    metrics: Metrics
    uncertainty: dict
    timing: Timing
    complete: bool
    by_position: list[dict]
    model: dict
    data: dict
    settings: dict
    environment: dict
    config: dict
    groups: dict
    compare: dict
    context_curve: dict
    signals: dict
    longppl: dict


@dataclass(frozen=True)
class Durations:
    """Wall-clock seconds of the run's phases."""

    load: float  # start to scoring (model loading, probe)
    scoring: float
    total: float


@dataclass(frozen=True)
class Totals:
    """The exact sums the headline figures are made from."""

    nll_sum: float
    tokens: int
    bytes: int
    words: int


READ_FIELDS = ("text_field", "prompt_field", "group_field", "id_field", "join_by", "streaming", "limit")


def summarize(cfg: Config, *, run: Run, stopped: bool, setup: Setup, info: ModelInfo, durations: Durations,
              tokenizer, outputs: Outputs | None = None) -> Results:
    """The summary (results.json) and the breakdowns of a run, from its running sums (`outputs`: where its rows
    and tokens went). Stopped inside a chunk, the figures include what was scored of it, as the state saved."""
    found, tally = figures(cfg, run, stopped)
    tokens = found["counts"]["tokens"]
    summary: Summary = {
        "nll_sum": found.pop("nll_sum"),
        "counts": found.pop("counts"),
        "metrics": found.pop("metrics"),
        "uncertainty": found.pop("uncertainty"),
        "timing": {
            "seconds": durations.scoring,
            "tokens_per_second": tokens / durations.scoring if durations.scoring > 0 else None,
            "load_seconds": durations.load,
            "total_seconds": durations.total,
        },
        "complete": not stopped,
        "by_position": found.pop("by_position"),
        "model": {**info.__dict__, "head": setup.head_note},
        "data": data_summary(cfg),
        "settings": _settings(cfg, setup),
        "environment": environment(setup),
        "config": cfg.resolved(),
        **found,  # groups, compare, shard, signals: when there are some
    }
    documents, table, files, joined = outputs.results() if outputs is not None else ([], None, [], None)
    return Results(summary, documents, tally.positions, table, token_files=files, joined_tokens=joined,
                   extremes=run.extremes)


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
            "tokens": totals.tokens, "documents": rows.documents, "skipped_documents": rows.skipped,
            "bytes": rows.bytes if document else totals.bytes, "words": rows.words if document else totals.words,
            "windows": windows, "input_tokens": tally.inputs, "padding_tokens": tally.padding,
            "tokens_per_process": run.tokens_per_process, "double_prefix_removed": run.doubled_prefix,
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
    if tally.compares:
        out["compare"] = {name: c.summary(n_bytes=totals.bytes) for name, c in zip(cfg.compare_to, tally.compares)}
    if run.shard is not None:
        k, n = (int(x) for x in run.shard.split("/"))
        out["shard"] = {"index": k, "count": n}
    return out, tally


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


def data_summary(cfg: Config) -> dict:
    """What was read: the local files (paths, sizes, content hashes), the Hub dataset, or rows given in memory;
    then how the rows were read. Only what was actually read: no Hub dataset for local files."""
    read = {k: getattr(cfg, k) for k in READ_FIELDS}
    if cfg.data_files:
        builder, paths = local_files(cfg)
        files = [{"path": p, "bytes": os.path.getsize(p), "sha256": file_sha256(p)} for p in paths]
        return {"source": "files", "format": builder, "data_files": cfg.data_files, "files": files, **read}
    if cfg.dataset == MEMORY:
        return {"source": "memory", **read}
    return {"source": "hub", "dataset": cfg.dataset, "dataset_config": cfg.dataset_config, "split": cfg.split, **read}


def _settings(cfg: Config, setup: Setup) -> dict:
    return {
        "protocol": cfg.protocol,
        "protocol_overrides": protocol_overrides(cfg),
        "headline": PROTOCOLS[cfg.protocol].headline,
        "mode": cfg.mode,
        "max_length": setup.max_length,
        "stride": setup.stride if cfg.mode in ("document", "stream") else None,  # chunks do not overlap
        "prefix_token": cfg.prefix_token,
        "prefix_token_id": setup.prefix,
        "bos_policy": cfg.bos_policy,
        "window_first_token_id": setup.window_first,
        "chunks": cfg.chunks,
        "detokenizer": cfg.detokenizer,
        "separator": cfg.separator if cfg.mode != "document" else None,
        "batch_size": cfg.batch_size,
        "token_budget": setup.budget,
        "padding_side": cfg.padding_side,
    }


def protocol_overrides(cfg: Config) -> dict:
    """The fields the protocol sets that this run set otherwise (e.g. --mode stream under lm-eval, whose figure is
    document-level): printed beside the protocol's name, so the figure is not quoted as the protocol's."""
    values = protocol_values(cfg.protocol)
    no_prefix = cfg.mode == "stream" and {cfg.prefix_token, values["prefix_token"]} <= {"auto", "none"}  # the same
    return {k: getattr(cfg, k) for k, v in values.items()
            if v is not None and getattr(cfg, k) != v and not (k == "prefix_token" and no_prefix)}


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


def environment(setup: Setup) -> dict:
    """Library versions and hardware, so a figure can be traced to what produced it."""
    import platform

    import accelerate
    import datasets
    import transformers

    from . import __version__

    device = setup.device
    return {
        "lm_ce": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "processes": setup.processes,
        "threads_per_process": setup.threads,
    }


def cpu_name() -> str:
    """The CPU model ("AMD EPYC 7B13", "Apple M2"), from /proc/cpuinfo or the platform; the architecture at worst."""
    import platform
    import subprocess

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
            if out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()
