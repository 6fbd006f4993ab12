"""Suites: several datasets scored with one model load, each as its own run, with pooled and mean figures.

A config's `suite:` lists the datasets (read and checked by overrides.py: suite_entries, entry_config).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

from lm_ce.config.fields import Config
from lm_ce.config.sources import entry_config
from lm_ce.data.local import local_files
from lm_ce.errors import UsageError
from lm_ce.reports.figures import metrics
from lm_ce.rundir.claims import previous_run
from lm_ce.sums.records import Results

AVERAGED = ("mean_loss", "perplexity", "bits_per_token", "bits_per_byte", "byte_perplexity", "word_perplexity")
PER_DATASET = ("nll_sum", "counts", "metrics", "uncertainty", "settings", "data", "complete")


def check_suite(cfg: Config) -> None:
    """Before the model loads: every entry's data files exist and can be read, and no output directory holds a
    previous run unless --resume or --overwrite says what to do with it (advice naming the entry)."""
    for entry in cfg.suite or []:
        entry_cfg = entry_config(cfg, entry)
        try:
            for path in local_files(entry_cfg)[1] if entry_cfg.data_files else []:
                with open(path, "rb") as f:
                    f.read(1)
        except UsageError as e:
            raise UsageError(f"suite entry '{entry['name']}': {e}") from None
        except OSError as e:
            raise UsageError(f"suite entry '{entry['name']}': data file {e.filename} cannot be read ({e.strerror}); "
                             "check --data-files") from None
    if not cfg.suite or not cfg.output_dir or cfg.resume or cfg.overwrite:
        return
    for entry in cfg.suite:
        directory = Path(cfg.output_dir).absolute() / entry["name"]
        found = previous_run(directory) if directory.is_dir() else None
        if found:
            raise UsageError(f"suite entry '{entry['name']}': {directory} holds {found.words}: continue the suite "
                             "with --resume, replace it with --overwrite (deletes the suite's files), or use another "
                             "--output-dir")


def run_suite(cfg: Config, score: Callable[[Config], Results]) -> Results:
    """Each dataset of the suite scored by `score` (one model, loaded once), in order; stops at a stopped one.
    With an output directory, dataset NAME keeps its own files and saved state in OUTPUT_DIR/NAME."""
    parts: dict[str, Results] = {}
    for entry in cfg.suite:
        sub = str(Path(cfg.output_dir) / entry["name"]) if cfg.output_dir else None
        part = score(dataclasses.replace(entry_config(cfg, entry), output_dir=sub))
        parts[entry["name"]] = part
        if not part.summary["complete"]:
            break
    return Results(summary=suite_summary(cfg, {name: r.summary for name, r in parts.items()}), parts=parts)


def suite_summary(cfg: Config, summaries: dict[str, dict]) -> dict:
    """results.json of a suite: suite.datasets.NAME (a single run's figures), suite.micro (pooled sums) and
    suite.macro (the unweighted mean over datasets of each metric)."""
    finished = len(summaries) == len(cfg.suite) and all(s["complete"] for s in summaries.values())
    first = next(iter(summaries.values()))
    return {
        "suite": {
            "datasets": {name: {k: s[k] for k in PER_DATASET} for name, s in summaries.items()},
            "micro": micro(list(summaries.values())),
            "macro": macro(list(summaries.values())),
        },
        "complete": finished,
        "timing": {"seconds": math.fsum(s["timing"]["seconds"] for s in summaries.values())},
        "model": first["model"],
        "environment": first["environment"],
        "config": cfg.resolved(),
    }


def micro(summaries: list[dict]) -> dict:
    """The datasets pooled: their exact sums added, the figures computed from the totals."""
    nll = math.fsum(s["nll_sum"] for s in summaries)
    tokens, n_bytes, words = (sum(s["counts"][k] for s in summaries) for k in ("tokens", "bytes", "words"))
    return {"nll_sum": nll, "tokens": tokens, "bytes": n_bytes, "words": words, **metrics(nll, tokens, n_bytes, words)}


def macro(summaries: list[dict]) -> dict:
    """The unweighted mean over datasets of each metric (None where a dataset has none)."""
    out: dict = {"datasets": len(summaries)}
    for key in AVERAGED:
        values = [s["metrics"][key] for s in summaries]
        out[key] = None if any(v is None for v in values) else math.fsum(values) / len(values)
    return out
