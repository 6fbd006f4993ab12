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

from .records import Results

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
    return (
        f"{m['name']} ({m['dtype']}) on {data_source(summary['data'])}: {s['mode']} mode, max_length {s['max_length']}, "
        f"stride {s['stride']}"
    )


def data_source(data: dict) -> str:
    """The data in a few words: the files, the Hub dataset, or the rows given in memory."""
    if data.get("data_files"):
        return ", ".join(data["data_files"])
    if data.get("source") == "memory":
        return "rows given in memory"
    return " ".join(str(data[k]) for k in ("dataset", "dataset_config", "split") if data.get(k))


def what_was_run(summary: dict) -> list[tuple[str, str]]:
    """(key, value) rows of the "What was run" table: model, data (one row per file), settings, environment."""
    rows = []
    for section in ("model", "data", "settings", "environment"):
        for key, value in summary[section].items():
            if key == "files":
                rows += [(f"data.files[{i}]", f"{f['path']} ({fmt(f['bytes'])} bytes, sha256 {f['sha256']})")
                         for i, f in enumerate(value)]
            elif value is not None:
                rows.append((f"{section}.{key}", fmt(value)))
    return rows


def interval(summary: dict) -> str:
    u = summary.get("uncertainty", {})
    if "mean_loss_stderr" not in u:
        return "-"
    lo, hi = u["perplexity_ci95"]
    return f"{fmt(lo)} .. {fmt(hi)} (stderr of mean loss {u['mean_loss_stderr']:.3g} over {u['clusters']} {u['unit']})"


def sections(summary: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of each breakdown: groups, compared models, loss by position."""
    out = []
    if summary.get("groups"):
        rows = [[g, fmt(v["documents"]), fmt(v["tokens"]), fmt(v["mean_loss"]), fmt(v["perplexity"]), fmt(v["bits_per_byte"])]
                for g, v in summary["groups"].items()]
        out.append(("By group", ["group", "documents", "tokens", "mean loss", "perplexity", "bits/byte"], rows))
    if summary.get("compare"):
        first = summary["metrics"]
        rows = [[summary["model"]["name"] + " (first)", fmt(first["perplexity"]), fmt(first["bits_per_byte"]), "-", "-", "-", "-"]]
        for name, c in summary["compare"].items():
            rows.append([name, fmt(c.get("perplexity")), fmt(c.get("bits_per_byte")), fmt(c.get("delta_perplexity")),
                         fmt(c.get("kl_mean")), fmt(c.get("kl_p99")), fmt(c.get("top1_agreement"))])
            if c.get("note"):
                rows[-1][3:] = [c["note"], "-", "-", "-"]
        out.append(("Model against model (same tokens)", ["model", "perplexity", "bits/byte", "delta ppl", "KL mean",
                                                           "KL p99", "top-1 agreement"], rows))
    if summary.get("by_position"):
        rows = [[f"{b['positions'][0]}-{b['positions'][1]}", fmt(b["tokens"]), fmt(b["mean_loss"]), fmt(b["perplexity"])]
                for b in summary["by_position"]]
        out.append(("Mean loss by position in the window", ["positions", "tokens", "mean loss", "perplexity"], rows))
    return out


def table(summary: dict) -> str:
    """The console table: one figure a line, then the breakdowns."""
    rows = [(label, fmt(lookup(summary, path))) for label, path in ROWS]
    rows.insert(2, ("perplexity 95% interval", interval(summary)))
    width = max(len(label) for label, _ in rows)
    lines = [title(summary)]
    if not summary.get("complete", True):
        lines.append("INTERRUPTED: these figures cover only what was scored before the stop")
    lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    for name, header, body in sections(summary):
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines += ["", name]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header, *body]]
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    """results.md: the figures, then what was run."""
    out = [f"# {title(summary)}", ""]
    if not summary.get("complete", True):
        out += ["**Interrupted: these figures cover only what was scored before the stop.**", ""]
    out += ["| metric | value |", "|---|---|"]
    out += [f"| {label} | {fmt(lookup(summary, path))} |" for label, path in ROWS]
    out += [f"| perplexity 95% interval | {interval(summary)} |"]
    for name, header, body in sections(summary):
        out += ["", f"## {name}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(r) + " |" for r in body]
    out += ["", "## What was run", "", "| | |", "|---|---|"]
    out += [f"| {key} | {value} |" for key, value in what_was_run(summary)]
    return "\n".join(out) + "\n"


def write(results: Results, output_dir: str, plot: bool = True) -> Path:
    """results.json, results.md, config.yaml (the resolved config), documents.jsonl, and with them
    tokens.parquet (--save-tokens) and position_loss.png (loss by position in the window)."""
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    if results.token_table:
        import pyarrow as pa
        import pyarrow.parquet as pq

        tmp = directory / f".tokens.parquet.tmp{os.getpid()}"
        pq.write_table(pa.table(results.token_table), tmp)
        os.replace(tmp, directory / "tokens.parquet")
    if plot and results.positions is not None and int(results.positions.count.sum()):
        plot_positions(results.positions, directory / "position_loss.png", title(results.summary))
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


def plot_positions(positions, path: Path, caption: str) -> bool:
    """Mean loss against the position in the window (the long-context check), as a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    seen = positions.count > 0
    x = seen.nonzero().squeeze(1)
    mean = positions.nll[seen] / positions.count[seen]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x.numpy(), mean.numpy(), lw=0.6, alpha=0.4, label="per position")
    buckets = [(sum(b["positions"]) / 2, b["mean_loss"]) for b in positions.buckets()]
    ax.plot([b[0] for b in buckets], [b[1] for b in buckets], "o-", label="powers-of-two buckets")
    ax.set_xscale("symlog")
    ax.set_xlabel("position in the window (tokens of context before the prediction)")
    ax.set_ylabel("mean loss (nats/token)")
    ax.set_title(caption, fontsize=7)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return True
