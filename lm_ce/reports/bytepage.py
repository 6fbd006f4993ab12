"""comparison.html: two models with different tokenizers compared byte by byte, for people: the gap by byte class,
the documents and spans of largest gap, and a heatmap of the documents of largest gap, each character coloured by
B − A in bits on its bytes (hover: both models' bits and whether a token of each begins there).

One offline file, like results.html (inline CSS, no script, a Content-Security-Policy that forbids any fetch).
"""
from __future__ import annotations

import html

from lm_ce.reports.page import CSS, HEAT_CSS, heatmap
from lm_ce.sums.bytegap import Shown

def render(comparison: dict, shown: list[Shown]) -> str:
    """The whole page as one HTML string."""
    e = html.escape
    a, b, block = comparison["a"], comparison["b"], comparison["bytes"]
    title = f"{b['model']} (B) minus {a['model']} (A), byte by byte"
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; style-src \'unsafe-inline\'">',
           f"<title>{e(title)}</title><style>{CSS}{HEAT_CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
           f'<p class="note">A: {e(a["directory"])}<br>B: {e(b["directory"])}</p>',
           f"<p>Gap B − A: <b>{block['gap_bits_per_byte']:+.6f} bits per byte</b> over {block['bytes']:,} bytes of "
           f"{block['documents']} documents (A {a['bits_per_byte']:.6f}, B {b['bits_per_byte']:.6f}).</p>",
           f'<p class="note">{e(block["attribution"].capitalize())}. The class split depends on that rule; the '
           "document and span gaps do not.</p>", '<section id="classes"><h2>By byte class</h2>']
    rows = [[name, f"{block['class_bytes'][name]:,}", _f(value), _f(block["class_gap_within"][name]),
             _f(block["class_bits_per_byte_a"][name]), _f(block["class_bits_per_byte_b"][name])]
            for name, value in block["classes"].items()]
    out += [_table(["class", "bytes", "contribution to the gap", "gap within the class", "bits/byte A", "bits/byte B"],
                   rows), "</section>"]
    if block["groups"]:
        rows = [[g, f"{v['bytes']:,}", _f(v["gap_bits_per_byte"]), _f(v["contribution"])] for g, v in block["groups"].items()]
        out += ['<section id="groups"><h2>By group</h2>', _table(["group", "bytes", "gap within", "contribution"], rows),
                "</section>"]
    rows = [[str(r["index"]), r["id"] or "-", f"{r['bytes']:,}", _f(r["delta_bits"]), _f(r["bits_per_byte_gap"])]
            for r in block["documents_top"]]
    out += ['<section id="documents"><h2>Largest gaps by document</h2>',
            _table(["document", "id", "bytes", "Δ bits (B − A)", "gap (bits/byte)"], rows), "</section>"]
    rows = [[str(s["index"]), f"{s['byte_start']}-{s['byte_end']}", _f(s["delta_bits"]), s["tokens_a"], s["tokens_b"]]
            for s in block["aligned_spans_top"]]
    out += ['<section id="spans"><h2>Largest gaps by span</h2><p class="note">Spans between token boundaries that both '
            "tokenizations share (| marks where each one's tokens begin): both models' losses over them are sums of "
            "whole tokens.</p>", _table(["document", "bytes", "Δ bits", "A's tokens", "B's tokens"], rows), "</section>"]
    out.append(heatmap(shown))
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _f(x) -> str:
    return "-" if x is None else f"{x:+.5f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>\n" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"
