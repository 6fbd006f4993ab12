"""explain's figures: each state's value and log value from its run's exact sums, each step's log Δ and its paired
standard error over the documents, which every state shares as clusters.

log_value = nats per unit (tokens, words or bytes) = ln of the metric's perplexity form, so the steps' log Δs add
up to the ends' difference. A joined run keeps no per-document sums: each of its targets belongs to the document
that owns the target's first byte in the joined text (tokens.parquet's `owner`).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lm_ce.errors import UsageError
from lm_ce.explain.chain import METRICS, State
from lm_ce.sums.stats import ratio_difference

COUNTS = {"tokens": "tokens", "words": "words", "bytes": "bytes"}


@dataclass
class Texts:
    """What the clusters need of the documents: each row's text (None: not a string)."""

    texts: list[str | None]
    separator: str

    def joined_units(self) -> dict[str, np.ndarray]:
        """Per document, the bytes it owns in the joined stream (its text and the separator after it) and its words."""
        joined = [i for i, t in enumerate(self.texts) if t is not None]
        sep = len(self.separator.encode("utf-8"))
        n_bytes = np.zeros(len(self.texts))
        words = np.zeros(len(self.texts))
        for k, i in enumerate(joined):
            n_bytes[i] = len(self.texts[i].encode("utf-8")) + (sep if k + 1 < len(joined) else 0)
            words[i] = len(re.split(r"\s+", self.texts[i])) if self.texts[i].strip() else 0
        return {"bytes": n_bytes, "words": words}


@dataclass
class RunSums:
    """One run state: its results.json and, per document, its NLL and units."""

    summary: dict
    directory: str
    y: np.ndarray
    n: dict[str, np.ndarray]
    approximate: list[str] = field(default_factory=list)  # units whose split by document is proportional to tokens


def run_sums(summary: dict, directory: Path, texts: Texts) -> RunSums:
    """The per-document clusters of a finished run: documents.jsonl (document mode), else its tokens' owners."""
    rows = len(texts.texts)
    mode = summary["settings"]["mode"]
    if mode == "document":
        y, n = np.zeros(rows), {k: np.zeros(rows) for k in COUNTS}
        with open(directory / "documents.jsonl", encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                y[r["index"]] = r["nll_sum"]
                for k in COUNTS:
                    n[k][r["index"]] = r[k]
        return RunSums(summary, str(directory), y, n)
    import pyarrow.parquet as pq

    table = pq.read_table(directory / "tokens.parquet", columns=["owner", "nll"])
    owner, nll = table.column("owner").to_numpy(), table.column("nll").to_numpy().astype(np.float64)
    if len(owner) and owner.min() < 0:
        raise UsageError(f"{directory}: its tokens have no owner document (byte spans need a fast tokenizer), so the "
                         "steps' standard errors cannot be paired by document")
    y, tokens = np.bincount(owner, nll, minlength=rows), np.bincount(owner, minlength=rows).astype(np.float64)
    if mode == "stream":
        return RunSums(summary, str(directory), y, {"tokens": tokens, **texts.joined_units()})
    share = tokens / tokens.sum()  # chunks: bytes and words are counted per window's decoded text, not per document
    n = {"tokens": tokens, "bytes": share * summary["counts"]["bytes"], "words": share * summary["counts"]["words"]}
    return RunSums(summary, str(directory), y, n, approximate=["bytes", "words"])


def measure(run: RunSums, metric: str) -> dict:
    """{metric, value, log_value} of a run in a metric: the run's own figure (results.json's metrics.<metric>), and
    nats per unit from its sums."""
    unit = METRICS[metric][0]
    count = run.summary["counts"][COUNTS[unit]]
    if not count:
        raise UsageError(f"{run.directory} has no {unit} counted, so it cannot be measured as {metric}")
    return {"metric": metric, "value": run.summary["metrics"][metric], "log_value": run.summary["nll_sum"] / count}


def settings_of(state: State) -> dict:
    """A step's settings: the run's window fields, its unit and form."""
    unit, form = METRICS[state.metric]
    return {**state.point.fields(), "unit": unit, "form": form}


def explain_block(states: list[State], runs: list[RunSums], ends: tuple, root: Path, notes: list[str]) -> dict:
    """results.json's `explain`: the ends, the steps (each with its log Δ and paired stderr) and the notes."""
    rows = []
    for state, run in zip(states, runs):
        rows.append({**measure(run, state.metric), "run": run})
    steps = []
    for k in range(1, len(states)):
        state, here, before = states[k], rows[k], rows[k - 1]
        unit_i, unit_j = METRICS[states[k - 1].metric][0], METRICS[state.metric][0]
        paired = ratio_difference(before["run"].y, before["run"].n[unit_i], here["run"].y, here["run"].n[unit_j])
        step = {"factor": state.factor, "kind": state.kind, "settings": settings_of(state), "metric": state.metric,
                "value": here["value"], "log_value": here["log_value"],
                "log_delta": here["log_value"] - before["log_value"],
                "log_delta_stderr": 0.0 if state.factor == "log_base" else paired["stderr"],
                "clusters": paired["clusters"], "directory": _relative(here["run"].directory, root)}
        approximate = sorted({u for u in (unit_i, unit_j) if u in here["run"].approximate + before["run"].approximate})
        if approximate and state.factor != "log_base":
            notes.append(f"step {k} ({state.factor}): a chunk run's {', '.join(approximate)} are split by document in "
                         "proportion to its tokens for the standard error (the value is exact)")
        steps.append(step)
    deltas = [s["log_delta"] for s in steps]
    return {
        "start": _end(ends[0], rows[0], root),
        "end": _end(ends[1], rows[-1], root),
        "steps": steps,
        "order": [s.factor for s in states[1:]],
        "log_unit": "nats per unit of each state's metric (ln of its perplexity form)",
        "telescoping_error": math.fsum(deltas) - (rows[-1]["log_value"] - rows[0]["log_value"]),
        "notes": notes,
    }


def _end(endpoint, row: dict, root: Path) -> dict:
    return {"protocol": endpoint.protocol, "overrides": endpoint.overrides, "metric": row["metric"],
            "value": row["value"], "log_value": row["log_value"], "directory": _relative(row["run"].directory, root)}


def _relative(directory: str, root: Path) -> str:
    try:
        return str(Path(directory).relative_to(root))
    except ValueError:
        return directory
