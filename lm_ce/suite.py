"""Suites: several datasets scored with one model load, each as its own run, with pooled and mean figures.

A config's `suite:` lists the datasets (read and checked by overrides.py: suite_entries, entry_config).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

from .config import Config
from .overrides import entry_config
from .records import Results
from .summary import metrics

AVERAGED = ("mean_loss", "perplexity", "bits_per_token", "bits_per_byte", "byte_perplexity", "word_perplexity")
PER_DATASET = ("nll_sum", "counts", "metrics", "uncertainty", "settings", "data", "complete")


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
