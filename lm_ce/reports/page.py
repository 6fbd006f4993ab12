"""results.html: one self-contained page of a run, for people: the figures, the breakdowns, the loss by position
as an inline SVG, and the documents of highest and lowest mean loss with each token coloured by its loss.

Nothing is fetched from elsewhere (inline CSS, an inline SVG, no script; a Content-Security-Policy forbids any
fetch), so the file opens offline. Hovering a token shows its loss and the model's top-1 guess (title attributes).
The report module gives the figures as text; this one only lays them out.
"""
from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass, field

from lm_ce.sums.extremes import SHOWN_TOKENS, Extremes, ShownDocument

# The fixed colour scale of token losses (nats): class k holds losses in [EDGES[k-1], EDGES[k]).
EDGES = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
COLOURS = ("#ffffff", "#fff3c4", "#ffe08a", "#ffc04d", "#ff9a3c", "#f4632a", "#d7301f", "#8c0d0d")
DARK = 6  # classes from this one on take white text
NUMBER = re.compile(r"-?[\d,]*\.?\d+")

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 70em;
       padding: 0 1em; color: #1b1b1b; }
h1 { font-size: 1.3em; } h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1em; margin: 1.2em 0 0.3em; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { padding: 2px 10px; border-bottom: 1px solid #eee;
text-align: left; vertical-align: top; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.warn { background: #fde2e1; padding: 0.5em; border-left: 4px solid #c0392b; }
.note { color: #555; }
.text { white-space: pre-wrap; word-wrap: break-word; font: 13px/1.7 ui-monospace, Menlo, Consolas, monospace;
        border: 1px solid #ddd; padding: 0.6em; max-height: 28em; overflow: auto; }
.text span { border-radius: 2px; box-shadow: inset -1px 0 0 rgba(0, 0, 0, 0.12); }
.legend span { display: inline-block; padding: 1px 8px; margin-right: 2px; border: 1px solid #ccc;
               font: 12px ui-monospace, Menlo, Consolas, monospace; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
""" + "".join(f".c{k} {{ background: {c};{' color: #fff;' if k >= DARK else ''} }}\n" for k, c in enumerate(COLOURS))


# The diverging scale of a byte-level gap (Δ bits on a character, B − A): class k holds values below HEAT_EDGES[k].
HEAT_EDGES = (-2.0, -1.0, -0.5, -0.2, -0.05, 0.05, 0.2, 0.5, 1.0, 2.0)
HEAT_COLOURS = ("#08519c", "#3182bd", "#6baed6", "#bdd7e7", "#e3eef7", "#ffffff", "#fde0dd", "#fcae91", "#fb6a4a",
           "#de2d26", "#a50f15")
HEAT_CSS = "".join(f".h{k} {{ background: {c};{' color: #fff;' if k in (0, 1, 9, 10) else ''} }}\n"
                   for k, c in enumerate(HEAT_COLOURS)) + ".cut { box-shadow: inset 1px 0 0 rgba(0, 0, 0, 0.35); }\n"


def heat_class(delta_bits: float) -> int:
    """The colour class of a character's Δ bits on the fixed diverging scale (blue: B lower, red: B higher)."""
    return sum(delta_bits >= edge for edge in HEAT_EDGES) if math.isfinite(delta_bits) else len(HEAT_EDGES)



@dataclass(frozen=True)
class PageParts:
    """What the page shows, as the report module words it."""

    title: str
    interrupted: bool
    figures: list[tuple[str, str]]  # (label, value) of the headline figures
    tables: list[tuple[str, list[str], list[list[str]]]]  # (title, header, rows): groups, compared models, positions
    what_was_run: list[tuple[str, str]]
    buckets: list[dict]  # results.json's by_position
    per_position: list[tuple[int, float]]  # (position, mean loss) of every position seen
    extremes: Extremes | None
    no_documents: str | None  # why the page has no documents section (None: it has one)
    note: str | None = None  # a line under the title (a shard's report: that it is one shard of N)
    byte_heatmaps: dict = field(default_factory=dict)  # --compare-to model -> bytegap.Shown documents (byte by byte)


def loss_class(nll: float) -> int:
    """The colour class of a loss on the fixed scale."""
    return sum(nll >= edge for edge in EDGES) if math.isfinite(nll) else len(EDGES)


def render(parts: PageParts) -> str:
    """The whole page as one HTML string."""
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; style-src \'unsafe-inline\'">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{e(parts.title)}</title><style>{CSS}{HEAT_CSS if parts.byte_heatmaps else ''}</style></head><body>", f"<h1>{e(parts.title)}</h1>"]
    if parts.interrupted:
        out.append('<p class="warn">Interrupted: these figures cover only what was scored before the stop.</p>')
    if parts.note:
        out.append(f'<p class="warn">{e(parts.note)}.</p>')
    out += ['<section id="summary"><h2>Summary</h2>', _table(["figure", "value"], [list(r) for r in parts.figures]),
            "</section>"]
    for name, header, rows in parts.tables:
        out += [f'<section><h2>{e(name)}</h2>', _table(header, rows), "</section>"]
    if parts.buckets:
        out += ['<section id="plot"><h2>Mean loss by position in the window</h2>', svg_plot(parts.buckets,
                parts.per_position), "</section>"]
    out.append(_documents(parts.extremes, parts.no_documents))
    for name, shown in parts.byte_heatmaps.items():
        out.append(heatmap(shown, f"Byte by byte: {name} (B) minus the first model (A)"))
    out += ['<section id="run"><h2>What was run</h2>', _table(["", ""], [list(r) for r in parts.what_was_run]),
            "</section>", "</body></html>"]
    return "\n".join(out) + "\n"


def _table(header: list[str], rows: list[list[str]]) -> str:
    def cell(value: str) -> str:
        numeric = NUMBER.fullmatch(value) is not None  # right-aligned
        return f'<td class="n">{html.escape(value)}</td>' if numeric else f"<td>{html.escape(value)}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(str(v)) for v in row) + "</tr>\n" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"


def _documents(extremes: Extremes | None, why_not: str | None) -> str:
    """The documents section: a legend, then the documents of highest and of lowest mean loss."""
    if why_not is not None:
        return f'<section id="documents"><h2>Documents</h2><p class="note">{html.escape(why_not)}</p></section>'
    if extremes.lost is not None:
        return (f'<section id="documents"><h2>Documents</h2><p class="note">No documents are shown: '
                f"{html.escape(extremes.lost)}.</p></section>")
    out = ['<section id="documents">', legend()]
    for kind, docs in (("highest", extremes.highest()), ("lowest", extremes.lowest())):
        out.append(f'<h2 id="{kind}">The {len(docs)} document{"s" if len(docs) != 1 else ""} of {kind} mean loss</h2>')
        out += [_document(d, kind) for d in docs]
    out.append("</section>")
    return "\n".join(out)


def legend() -> str:
    labels = [f"< {EDGES[0]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(EDGES, EDGES[1:])] + [f">= {EDGES[-1]:g}"]
    swatches = "".join(f'<span class="c{k}">{html.escape(label)}</span>' for k, label in enumerate(labels))
    return (f'<p class="legend">Token loss (nats), a fixed scale: {swatches}</p><p class="note">Each token is '
            "coloured by its loss; hover over it to see the loss and the model's top-1 guess (a character split "
            "across tokens is one box, coloured by the highest of their losses).</p>")


def _document(d: ShownDocument, kind: str) -> str:
    e = html.escape
    name = f"{d.id} (document {d.index})" if d.id is not None else f"document {d.index}"
    facts = [f"mean loss {d.mean_loss:.4f} nats", f"perplexity {math.exp(min(d.mean_loss, 700)):.4g}",
             f"{d.tokens:,} tokens scored"]
    if d.group is not None:
        facts.insert(0, f"group {d.group}")
    shown = ""
    if len(d.text) < d.tokens:
        shown = f'<p class="note">The first {len(d.text):,} of its {d.tokens:,} scored tokens (at most {SHOWN_TOKENS:,} are kept).</p>'
    spans, waiting = [], []  # tokens of a character not finished yet (their text is "")
    for k, (text, nll, top1) in enumerate(zip(d.text, d.nll, d.top1)):
        waiting.append((nll, top1))
        if text or k == len(d.text) - 1:
            hover = " + ".join(_hover(n, t, text if len(waiting) == 1 else None) for n, t in waiting)
            if len(waiting) > 1:
                hover = f"{len(waiting)} tokens of one character: {hover}"
            worst = max(n for n, _ in waiting)
            spans.append(f'<span class="c{loss_class(worst)}" title="{e(hover)}">{e(text or chr(0xFFFD))}</span>')
            waiting = []
    spans = "".join(spans)
    return (f'<article class="doc {kind}" id="{kind}-{d.index}" data-document="{d.index}"><h3>{e(name)}</h3>'
            f'<p class="note">{e(", ".join(facts))}</p>{shown}<div class="text">{spans}</div></article>')


def _hover(nll: float, top1: str, text: str | None) -> str:
    """A token's title: its loss and the model's top-1 guess (quoted as JSON, so spaces and newlines show)."""
    quoted = json.dumps(top1, ensure_ascii=False)
    return f"loss {nll:.3f} nats; top-1 guess: {quoted}" + (" (this token)" if top1 == text else "")


def svg_plot(buckets: list[dict], per_position: list[tuple[int, float]], width: int = 720, height: int = 320) -> str:
    """Mean loss against the position in the window, x on a log2(1 + position) scale: every position (thin) and
    the powers-of-two buckets of results.json (points; hover for figures)."""
    left, right, top, bottom = 56, 16, 16, 44
    xs = [p for p, _ in per_position] + [b["positions"][1] for b in buckets]
    ys = [m for _, m in per_position] + [b["mean_loss"] for b in buckets]
    ys = [y for y in ys if math.isfinite(y)] or [0.0]
    x_max = math.log2(2 + max(xs)) if xs else 1.0
    y_lo, y_hi = min(ys), max(ys)
    if y_hi - y_lo < 1e-9:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    pad = 0.05 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def sx(position: float) -> float:
        return left + (width - left - right) * math.log2(1 + position) / x_max

    def sy(loss: float) -> float:
        return top + (height - top - bottom) * (y_hi - loss) / (y_hi - y_lo)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           'role="img" aria-label="mean loss by position in the window">',
           f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" fill="#fafafa" '
           'stroke="#ccc"/>']
    ticks, p = [0], 1
    while p <= max(xs or [0]):
        ticks.append(p)
        p *= 4 if len(ticks) > 6 else 2
    for t in ticks:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{height - bottom}" x2="{x:.1f}" y2="{height - bottom + 4}" stroke="#666"/>'
                   f'<text x="{x:.1f}" y="{height - bottom + 16}" text-anchor="middle">{t}</text>')
    for k in range(6):
        loss = y_lo + (y_hi - y_lo) * k / 5
        y = sy(loss)
        out.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#e4e4e4"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{loss:.2f}</text>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle">position in the window '
               "(tokens of context before the prediction; log scale)</text>")
    out.append(f'<text transform="translate(14 {(top + height - bottom) / 2}) rotate(-90)" text-anchor="middle">'
               "mean loss (nats/token)</text>")
    if per_position:
        points = " ".join(f"{sx(p):.1f},{sy(m):.1f}" for p, m in per_position if math.isfinite(m))
        out.append(f'<polyline points="{points}" fill="none" stroke="#7aa6d6" stroke-width="0.8" opacity="0.6"/>')
    centres = [((b["positions"][0] + b["positions"][1]) / 2, b) for b in buckets]
    line = " ".join(f"{sx(c):.1f},{sy(b['mean_loss']):.1f}" for c, b in centres if math.isfinite(b["mean_loss"]))
    out.append(f'<polyline points="{line}" fill="none" stroke="#d35400" stroke-width="2"/>')
    for c, b in centres:
        if math.isfinite(b["mean_loss"]):
            a, z = b["positions"]
            out.append(f'<circle cx="{sx(c):.1f}" cy="{sy(b["mean_loss"]):.1f}" r="4" fill="#d35400"><title>positions '
                       f'{a}-{z}: mean loss {b["mean_loss"]:.4f} nats over {b["tokens"]:,} tokens</title></circle>')
    out.append(f'<text x="{width - right - 6}" y="{top + 14}" text-anchor="end"><tspan fill="#d35400">&#9679; '
               'powers-of-two buckets</tspan>  <tspan fill="#7aa6d6">&#8212; each position</tspan></text>')
    out.append("</svg>")
    return "\n".join(out)


def heatmap(shown: list, title: str = "Heatmap of the gap") -> str:
    """The byte-level gap's heatmap: each document of `shown` (bytegap.Shown) character by character, coloured by
    B − A in bits on the character's bytes, hover for both models' bits and where tokens begin."""
    e = html.escape
    edges = HEAT_EDGES
    labels = [f"< {edges[0]:g}"] + [f"{x:g} to {y:g}" for x, y in zip(edges, edges[1:])] + [f">= {edges[-1]:g}"]
    legend = "".join(f'<span class="h{k}">{e(label)}</span>' for k, label in enumerate(labels))
    out = [f'<section id="heatmap"><h2>{e(title)}</h2>',
           f'<p class="legend">Δ bits on each character (B − A), a fixed scale: {legend}</p>',
           '<p class="note">The documents of largest gap each way. A line on a character\'s left: a token of A or B '
           "begins there; hover for both models' bits.</p>"]
    for doc in shown:
        name = f"{doc.id} (document {doc.index})" if doc.id is not None else f"document {doc.index}"
        spans = []
        for ch, x, y, cut_a, cut_b in zip(doc.chars, doc.bits_a, doc.bits_b, doc.cut_a, doc.cut_b):
            starts = " and ".join(n for n, c in (("A", cut_a), ("B", cut_b)) if c)
            hover = f"A {x:.3f} bits, B {y:.3f} bits, B − A {y - x:+.3f}" + (f"; a token of {starts} begins" if starts else "")
            cls = f"h{heat_class(y - x)}" + (" cut" if cut_a or cut_b else "")
            spans.append(f'<span class="{cls}" title="{e(hover)}">{e(ch)}</span>')
        more = '<p class="note">(the text goes on)</p>' if doc.more else ""
        out.append(f'<article id="doc-{doc.index}"><h3>{e(name)}</h3><p class="note">Δ {doc.gap_bits:+.2f} bits, '
                   f'{doc.bits_per_byte_gap:+.4f} bits per byte</p><div class="text">{"".join(spans)}</div>{more}'
                   "</article>")
    out.append("</section>")
    return "\n".join(out)
