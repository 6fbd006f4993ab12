"""Suites: several datasets scored with one model load, each as its own run, with pooled and mean figures.

A config's `suite:` lists the datasets; each entry has a `name` and any data or window field. An entry
takes the top-level config, then its protocol's fields if it names one, then its own fields.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

from .config import FIELDS, Config, UsageError
from .overrides import _coerce, _unknown
from .protocols import protocol_values
from .records import Results
from .summary import metrics

SUITE_EXCLUDED = ("model", "revision", "dtype", "trust_remote_code", "gguf_cache", "compile", "threads", "compare_to",
                  "output_dir", "resume", "checkpoint_seconds", "plot", "progress", "seed", "suite")


def suite_entries(value, source: str) -> list[dict]:
    """The `suite:` list of a config file, each entry a mapping with a unique name and data or window fields."""
    if not isinstance(value, list) or not value:
        raise UsageError(f"{source}: field 'suite' must be a list of datasets, each a mapping with a 'name'")
    entries, names = [], set()
    for number, entry in enumerate(value, 1):
        where = f"{source}: suite entry {number}"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
            raise UsageError(f"{where}: give a mapping with a 'name' (a string) and the dataset's fields")
        name = entry["name"]
        if name in names or "." in name:
            raise UsageError(f"{where}: name '{name}' is {'used twice' if name in names else 'not allowed (no dots)'}; "
                             "give each entry its own name")
        names.add(name)
        out = {"name": name}
        for key, item in entry.items():
            field_name = str(key).replace("-", "_")
            if field_name == "name":
                continue
            if field_name not in FIELDS:
                raise _unknown(str(key), f"{where} ('{name}')")
            if field_name in SUITE_EXCLUDED:
                raise UsageError(f"{where} ('{name}'): '{key}' is set once for the whole suite, at the top level")
            out[field_name] = _coerce(field_name, item, f"{where} ('{name}')")
        entries.append(out)
    return entries


def entry_config(cfg: Config, entry: dict) -> Config:
    """The config of one suite entry: the top-level config, then the entry's protocol (if it names one),
    then the entry's own fields."""
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "suite"}
    if "protocol" in entry:
        values.update(protocol_values(entry["protocol"]))
    values.update({k: v for k, v in entry.items() if k != "name"})
    return Config(**values, suite=None)




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
