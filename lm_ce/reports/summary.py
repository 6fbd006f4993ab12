"""results.json: the figures from a run's exact sums, and what was run (model, data, settings, environment).

The key paths typed below are a contract other tools read; the README's key table documents each one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NotRequired, TypedDict

import torch

from lm_ce.config.fields import Config
from lm_ce.config.protocols import PROTOCOLS, protocol_values
from lm_ce.data.local import local_files
from lm_ce.data.reading import MEMORY
from lm_ce.model.load import ModelInfo
from lm_ce.reports.figures import Metrics, figures
from lm_ce.rundir.outputs import Outputs
from lm_ce.scoring.setup import Setup
from lm_ce.sums.records import Results, Run


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
    joined_empty_rows: NotRequired[int]  # joined runs only (stream mode, chunk protocols)


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
    multiple_choice: dict
    surprisal: dict


@dataclass(frozen=True)
class Durations:
    """Wall-clock seconds of the run's phases."""

    load: float  # start to scoring (model loading, probe)
    scoring: float
    total: float


READ_FIELDS = ("text_field", "prompt_field", "group_field", "id_field", "join_by", "streaming", "limit")


def summarize(cfg: Config, *, run: Run, stopped: bool, setup: Setup, info: ModelInfo, durations: Durations,
              outputs: Outputs | None = None) -> Results:
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


def data_summary(cfg: Config, read: dict | None = None) -> dict:
    """What was read: the local files (paths, sizes, content hashes), the Hub dataset (the revision asked, the commit
    read), or rows given in memory; then how the rows were read. Only what was actually read: no Hub dataset for
    local files. `read`: the data as the run recorded it when it read it (data/identity.py); without it the files'
    sizes and hashes are not known here, and are not taken again at the end."""
    read = read or {}
    fields = {k: getattr(cfg, k) for k in READ_FIELDS}
    if cfg.data_files:
        builder, paths = local_files(cfg)
        files = read.get("files") or [{"path": p, "bytes": None, "sha256": None} for p in paths]
        return {"source": "files", "format": builder, "data_files": cfg.data_files, "files": files, **fields}
    if cfg.dataset == MEMORY:
        return {"source": "memory", **fields}
    return {"source": "hub", "dataset": cfg.dataset, "dataset_config": cfg.dataset_config, "split": cfg.split,
            "revision": cfg.dataset_revision, "resolved_revision": read.get("resolved_revision"), **fields}


def record_identity(summary: dict, cfg: Config, identity: dict) -> None:
    """Put what the run recorded as it read it (rundir/identity.py) into results.json: the data's sizes, hashes and
    Hub commit, and each --compare-to model's and the LongPPL evaluator's identity beside its table."""
    summary["data"] = data_summary(cfg, identity["data"])
    models = identity["models"]
    for name in cfg.compare_to or []:
        if name in summary.get("compare", {}):
            summary["compare"][name]["model"] = models.get(f"--compare-to {name}")
    if "longppl" in summary:
        summary["longppl"]["evaluator_model"] = models.get(f"--longppl-evaluator {cfg.longppl_evaluator}")


def identity_of(summary: dict) -> dict:
    """The record of what a finished run read (rundir/identity.py's form), from its results.json: what lm-ce merge
    and lm-ce compare check. A key missing in an older run's results.json reads as not recorded."""
    model = summary.get("model", {})
    models = {"model": {k: model.get(k) for k in ("commit", "weights", "tokenizer")}}
    for name, table in (summary.get("compare") or {}).items():
        models[f"--compare-to {name}"] = table.get("model")
    evaluator = (summary.get("longppl") or {}).get("evaluator")
    if evaluator not in (None, "self"):
        models[f"--longppl-evaluator {evaluator}"] = summary["longppl"].get("evaluator_model")
    return {"data": summary.get("data", {}), "models": models}


def _settings(cfg: Config, setup: Setup) -> dict:
    return {
        "protocol": cfg.protocol,
        "task": cfg.task,
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


def environment(setup: Setup) -> dict:
    """Library versions and hardware, so a figure can be traced to what produced it."""
    import platform

    import accelerate
    import datasets
    import transformers

    from lm_ce import __version__

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
