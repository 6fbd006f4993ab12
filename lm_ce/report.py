"""Reports: results.json for machines, results.md and a console table for people.

results.json's key paths (nll_sum, counts.*, metrics.*, timing.*) are a contract other tools read.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import yaml

from .runner import Results

ROWS = [
    ("mean loss (nats/token)", "metrics.mean_loss"),
    ("perplexity", "metrics.perplexity"),
    ("bits per token", "metrics.bits_per_token"),
    ("bits per byte", "metrics.bits_per_byte"),
    ("byte perplexity", "metrics.byte_perplexity"),
    ("word perplexity", "metrics.word_perplexity"),
    ("NLL sum (nats)", "nll_sum"),
    ("tokens scored", "counts.tokens"),
    ("documents", "counts.documents"),
    ("documents skipped", "counts.skipped_documents"),
    ("bytes", "counts.bytes"),
    ("words", "counts.words"),
    ("windows", "counts.windows"),
    ("padding tokens", "counts.padding_tokens"),
    ("seconds (scoring)", "timing.seconds"),
    ("tokens/s", "timing.tokens_per_second"),
]


def lookup(summary: dict, path: str):
    value = summary
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:,.6g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def title(summary: dict) -> str:
    s, m = summary["settings"], summary["model"]
    data = summary["data"]
    source = ", ".join(data["data_files"]) if data["data_files"] else f"{data['dataset']} {data['dataset_config'] or ''} {data['split']}"
    return (
        f"{m['name']} ({m['dtype']}) on {source.strip()}: {s['mode']} mode, max_length {s['max_length']}, "
        f"stride {s['stride']}"
    )


def table(summary: dict) -> str:
    """The console table: one figure a line."""
    rows = [(label, fmt(lookup(summary, path))) for label, path in ROWS]
    width = max(len(label) for label, _ in rows)
    lines = [title(summary)]
    if not summary.get("complete", True):
        lines.append("INTERRUPTED: these figures cover only what was scored before the stop")
    lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    """results.md: the figures, then what was run."""
    out = [f"# {title(summary)}", ""]
    if not summary.get("complete", True):
        out += ["**Interrupted: these figures cover only what was scored before the stop.**", ""]
    out += ["| metric | value |", "|---|---|"]
    out += [f"| {label} | {fmt(lookup(summary, path))} |" for label, path in ROWS]
    out += ["", "## What was run", "", "| | |", "|---|---|"]
    for section in ("model", "data", "settings", "environment"):
        for key, value in summary[section].items():
            if value is not None:
                out.append(f"| {section}.{key} | {fmt(value)} |")
    return "\n".join(out) + "\n"


def write(results: Results, output_dir: str) -> Path:
    """results.json, results.md, config.yaml (the resolved config) and documents.jsonl, written whole."""
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic(directory / "results.json", json.dumps(results.summary, indent=2, default=str) + "\n")
    _atomic(directory / "results.md", markdown(results.summary))
    _atomic(directory / "config.yaml", yaml.safe_dump(results.summary["config"], sort_keys=False, allow_unicode=True))
    if results.documents:
        lines = []
        for d in results.documents:
            row = dataclasses.asdict(d)
            row["perplexity"] = math.exp(d.nll_sum / d.tokens) if d.tokens else None
            row["bits_per_byte"] = d.nll_sum / (d.bytes * math.log(2)) if d.tokens and d.bytes else None
            lines.append(json.dumps(row, ensure_ascii=False))
        _atomic(directory / "documents.jsonl", "\n".join(lines) + "\n")
    return directory


def _atomic(path: Path, text: str) -> None:
    """Write then rename, so a crash never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
