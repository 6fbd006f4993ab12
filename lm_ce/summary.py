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
from .protocols import PROTOCOLS
from .records import DocumentResult, Results, Run, Tally
from .setup import Setup


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
              tokenizer) -> Results:
    """The summary (results.json) and the breakdowns of a run."""
    tally = copy.deepcopy(run.tally)
    if run.partial is not None and cfg.mode != "document":  # a stopped stream has only partial sums
        tally.merge(run.partial)
    documents = run.documents  # stopped inside a chunk: the report covers the finished chunks only
    scored = [d for d in documents if not d.skipped]
    totals = _totals(cfg, run, tally, scored, stopped)
    if totals.tokens == 0 and not stopped:
        _refuse_nothing_scored(cfg, documents)
    summary: Summary = {
        "nll_sum": totals.nll_sum,
        "counts": {
            "tokens": totals.tokens, "documents": len(scored), "skipped_documents": len(documents) - len(scored),
            "bytes": totals.bytes, "words": totals.words, "windows": run.windows, "input_tokens": tally.inputs,
            "padding_tokens": tally.padding, "tokens_per_process": run.tokens_per_process,
            "double_prefix_removed": run.doubled_prefix,
        },
        "metrics": metrics(totals.nll_sum, totals.tokens, totals.bytes, totals.words),
        "uncertainty": _uncertainty(cfg, tally, scored, totals),
        "timing": {
            "seconds": durations.scoring,
            "tokens_per_second": totals.tokens / durations.scoring if durations.scoring > 0 else None,
            "load_seconds": durations.load,
            "total_seconds": durations.total,
        },
        "complete": not stopped,
        "by_position": tally.positions.buckets() if tally.positions is not None else [],
        "model": {**info.__dict__, "head": setup.head_note},
        "data": data_summary(cfg),
        "settings": _settings(cfg, setup),
        "environment": environment(setup),
        "config": cfg.resolved(),
    }
    if cfg.group_field and cfg.mode == "document":
        summary["groups"] = stats.groups(scored)
    if tally.compares:
        summary["compare"] = {name: c.summary(n_bytes=totals.bytes) for name, c in zip(cfg.compare_to, tally.compares)}
    table = token_table(tally.token_blocks, documents, tokenizer) if cfg.save_tokens else None
    return Results(summary, documents if cfg.mode == "document" else [], tally.positions, table)


def _totals(cfg: Config, run: Run, tally: Tally, scored: list[DocumentResult], stopped: bool) -> Totals:
    """Document mode: the sums of finished documents; stream mode: the tally's (bytes and words only when complete)."""
    if cfg.mode == "document":
        return Totals(math.fsum(d.nll_sum for d in scored), sum(d.tokens for d in scored),
                      sum(d.bytes for d in scored), sum(d.words for d in scored))
    words = run.stream_words if cfg.mode in ("llama-cpp", "gptq") else sum(d.words for d in scored)
    return Totals(math.fsum(d.nll for d in tally.docs.values()), tally.tokens,
                  run.stream_bytes if not stopped else 0, words if not stopped else 0)


def _refuse_nothing_scored(cfg: Config, documents: list[DocumentResult]) -> None:
    if all(d.skipped == "not_text" for d in documents):
        raise UsageError(f"nothing to score: no row has a string in field '{cfg.text_field}'; check --text-field")
    raise UsageError(
        f"nothing to score: all {len(documents)} documents tokenize to nothing (check --text-field '{cfg.text_field}')"
    )


def _uncertainty(cfg: Config, tally: Tally, scored: list[DocumentResult], totals: Totals) -> dict:
    """Standard errors clustered by document (by window for a single stream or a single document); in
    llama-cpp mode also llama-perplexity's own `PPL +/- error` (per-token, as it prints it)."""
    if cfg.mode == "document" and len(scored) >= 2:
        clusters = stats.Clustered([d.nll_sum for d in scored], [d.tokens for d in scored])
        unit = "documents"
    else:
        clusters = stats.Clustered([w.nll for w in tally.windows], [w.tokens for w in tally.windows])
        unit = "windows"
    sum_sq = math.fsum(d.sum_sq for d in tally.docs.values())
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


def token_table(blocks: list[dict], documents: list[DocumentResult], tokenizer) -> dict[str, list] | None:
    """Token columns in document order, with the token texts and document ids added."""
    if not blocks:
        return None
    columns = {k: torch.cat([b[k] for b in blocks]) for k in blocks[0]}
    order = torch.argsort(columns["doc"] * (1 << 32) + columns["position"])
    columns = {k: v[order] for k, v in columns.items()}
    ids = {d.index: d.id for d in documents}
    vocab: dict[int, str] = {}

    def text(i: int) -> str:
        if i not in vocab:
            vocab[i] = tokenizer.decode([i])
        return vocab[i]

    out = {k: v.tolist() for k, v in columns.items()}
    out["doc_id"] = [ids.get(d) for d in out["doc"]]
    out["token"] = [text(i) for i in out["token_id"]]
    out["top1"] = [text(i) for i in out["top1_id"]]
    return out
