"""explain's reports: the table (console and results.md), the waterfall chart (explain.png, drawn on a matplotlib
Figure without pyplot, so no global backend is set) and results.html (the table and the chart inline)."""
from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

from lm_ce.reports.page import CSS

Z95 = 1.959963984540054
FILES = ("results.json", "results.md", "results.html", "explain.png")


def _label(row: dict) -> str:
    return f"{row['protocol']}" + "".join(f",{k}={v}" for k, v in (row.get("overrides") or {}).items())


def rows(block: dict) -> list[list[str]]:
    """The table: start, each step (factor, kind, metric and value after it, log Δ ± paired stderr), end."""
    start, end = block["start"], block["end"]
    out = [["start", _label(start), start["metric"], f"{start['value']:.6g}", f"{start['log_value']:.6f}", "", ""]]
    for k, s in enumerate(block["steps"], 1):
        se = "-" if s["log_delta_stderr"] is None else f"{s['log_delta_stderr']:.6f}"
        out.append([f"{k}. {s['factor']}", s["kind"], s["metric"], f"{s['value']:.6g}", f"{s['log_value']:.6f}",
                    f"{s['log_delta']:+.6f}", se])
    out.append(["end", _label(end), end["metric"], f"{end['value']:.6g}", f"{end['log_value']:.6f}",
                f"{end['log_value'] - start['log_value']:+.6f}", ""])
    return out


HEADER = ["step", "what", "metric", "value after", "log value (nats/unit)", "log Δ", "paired stderr"]


def markdown(summary: dict) -> str:
    """results.md (and the console): the chain as a table, then the notes."""
    block = summary["explain"]
    start, end = block["start"], block["end"]
    out = [f"# Why {_label(start)} {start['metric']} {start['value']:.4g} becomes {_label(end)} {end['metric']} "
           f"{end['value']:.4g}", "", f"Model: {summary['model']['name']}. Order: {', '.join(block['order']) or '-'}.",
           "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows(block)]
    out += ["", f"The steps' log Δs add up to the ends' difference (telescoping error {block['telescoping_error']:.1e} "
                "nats). Log values are nats per unit of each metric (tokens, words or bytes); a change of unit or form "
                "is a step of its own. Standard errors are paired by document.", ""]
    out += [f"- {note}" for note in block["notes"]]
    return "\n".join(out) + "\n"


def waterfall(block: dict, path: Path) -> bool:
    """explain.png: the start's log value, each step's log Δ as a floating bar (±1.96 paired SE), the end's; each bar
    labelled with the metric value after it. False without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    steps = block["steps"]
    labels = ["start\n" + _label(block["start"])] + [f"{s['factor']}\n({s['metric']})" for s in steps] + [
        "end\n" + _label(block["end"])]
    levels = [block["start"]["log_value"]] + [s["log_value"] for s in steps]
    spread = [Z95 * (s["log_delta_stderr"] or 0.0) for s in steps]
    low = min(levels + [x - e for x, e in zip(levels[1:], spread)])
    high = max(levels + [x + e for x, e in zip(levels[1:], spread)])
    pad = 0.15 * (high - low or abs(high) or 1.0)
    base = low - pad
    fig = Figure(figsize=(max(6.0, 1.3 * len(labels)), 4.5))
    ax = fig.add_subplot()
    ax.bar(0, levels[0] - base, bottom=base, color="#7f8c8d")
    for k, s in enumerate(steps, 1):
        colour = "#c0392b" if s["log_delta"] > 0 else "#27ae60"
        ax.bar(k, s["log_delta"], bottom=levels[k - 1], color=colour)
        if s["log_delta_stderr"]:
            ax.errorbar(k, levels[k], yerr=Z95 * s["log_delta_stderr"], color="#333", capsize=3)
        ax.annotate(f"{s['value']:.4g}", (k, max(levels[k - 1], levels[k])), ha="center", va="bottom", fontsize=8)
    ax.bar(len(labels) - 1, levels[-1] - base, bottom=base, color="#34495e")
    ax.annotate(f"{block['start']['value']:.4g}", (0, levels[0]), ha="center", va="bottom", fontsize=8)
    ax.annotate(f"{block['end']['value']:.4g}", (len(labels) - 1, levels[-1]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylim(base, high + pad)
    ax.set_ylabel("log value: nats per unit (ln of the perplexity form)")
    ax.set_title(f"{_label(block['start'])} → {_label(block['end'])}: each step's log Δ (±1.96 paired SE)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    return True


def page(summary: dict, png: Path | None) -> str:
    """results.html: one offline page with the chain's table, the waterfall inline, the notes and the steps' runs."""
    e = html.escape
    block = summary["explain"]
    title = f"{summary['model']['name']}: {_label(block['start'])} → {_label(block['end'])}"
    head = "".join(f"<th>{e(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>\n" for row in rows(block))
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; style-src \'unsafe-inline\'; '
           'img-src data:">', f"<title>{e(title)}</title><style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
           '<section id="explain"><h2>Explain: from one protocol to the other, one factor at a time</h2>',
           f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"]
    if png is not None and png.is_file():
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        out.append(f'<p><img alt="waterfall of the steps" src="data:image/png;base64,{data}"></p>')
    out += ["<ul>" + "".join(f"<li>{e(n)}</li>" for n in block["notes"]) + "</ul>", "</section>",
            '<section id="steps"><h2>The runs</h2><p class="note">Each run state has its own directory (results.json, '
            "results.html, config.yaml) under this one:</p><ul>"]
    out += [f"<li>{e(s['factor'])}: {e(s['directory'])}</li>" for s in block["steps"] if s["kind"] == "run"]
    out += [f"<li>start: {e(block['start']['directory'])}</li></ul></section>", "</body></html>"]
    return "\n".join(out) + "\n"


def write_outputs(summary: dict, root: Path) -> list[Path]:
    """results.json, results.md, explain.png and results.html in the explain's directory (each written, then renamed)."""
    png = root / "explain.png"
    drawn = waterfall(summary["explain"], png)
    written = [png] if drawn else []
    for name, text in (("results.json", json.dumps(summary, indent=2, default=str) + "\n"),
                       ("results.md", markdown(summary)), ("results.html", page(summary, png if drawn else None))):
        tmp = root / f".{name}.tmp{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, root / name)
        written.append(root / name)
    return written
