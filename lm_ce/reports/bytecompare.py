"""Two finished runs of models with different tokenizers compared byte by byte (`lm-ce compare A B`): each token's
loss spread over its bytes (tokens.parquet's byte_start, byte_end), so that the two align; the bits-per-byte gap
B − A per document, group and byte class, the aligned spans of largest gap, and a heatmap page.

The texts are read again as the runs read them (the data named in results.json, checked by content as compare
checks it, with the runs' detokenizer); each run's token spans must fit them.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lm_ce.config.fields import FIELDS, Config
from lm_ce.config.protocols import detokenized
from lm_ce.data.documents import iter_documents
from lm_ce.reports import paired
from lm_ce.sums.bytegap import (
    ATTRIBUTION,
    LN2,
    Tokens,
    by_document,
    compare_documents,
    user_classes,
)

SPAN_COLUMNS = ("doc", "position", "nll", "byte_start", "byte_end")


def compare(dir_a: str, dir_b: str, classes: list[str] | None = None) -> tuple[dict, dict | None]:
    """(comparison.json, the byte-level parts for documents.jsonl and comparison.html, or None): paired.compare_runs,
    with comparison['bytes'] when the runs scored different tokens and both kept their tokens' byte spans."""
    user = user_classes(classes)
    comparison = paired.compare_runs(dir_a, dir_b)
    if comparison["same_tokens"]:
        return comparison, None
    a, b = paired.read_run(dir_a), paired.read_run(dir_b)
    why = why_not(a, b)
    if why:
        comparison["notes"].append(f"no byte-level breakdown: {why}")
        return comparison, None
    block, extra = by_bytes(a, b, user)
    comparison["bytes"] = block
    comparison["notes"].append("byte-level breakdown: " + ATTRIBUTION)
    return comparison, extra


def why_not(a: paired.RunFiles, b: paired.RunFiles) -> str | None:
    """Why two runs cannot be compared byte by byte (None: they can)."""
    if a.documents is None:
        return "it pairs documents, and these runs joined them (document mode keeps each document's text and loss)"
    for run in (a, b):
        if run.tokens is None or not set(SPAN_COLUMNS) <= set(_columns(run.tokens)):
            return f"{run.directory} kept no token byte spans: rerun it with --save-tokens"
    detok = [r.summary["settings"].get("detokenizer") for r in (a, b)]
    if detok[0] != detok[1]:
        return f"the runs scored different texts (detokenizer {detok[0]} vs {detok[1]})"
    return None


def _columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_schema(path).names


def token_spans(path: Path) -> dict[int, Tokens]:
    """Each document's scored tokens (byte spans, NLL) from a tokens.parquet."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=list(SPAN_COLUMNS))
    return by_document({k: table.column(k).to_numpy() for k in SPAN_COLUMNS})


def scored_texts(run: paired.RunFiles, wanted: set[int]) -> dict[int, str]:
    """The texts a run scored (its data read again, its detokenizer applied), by document index."""
    values = {k: v for k, v in run.summary["config"].items() if k in FIELDS and k != "suite"}
    cfg = dataclasses.replace(Config(**values), output_dir=str(run.directory), resume=False, overwrite=False)
    out = {}
    for d in iter_documents(cfg):
        if d.index in wanted:
            out[d.index] = detokenized(cfg.detokenizer, d.text)
        if d.index >= max(wanted, default=-1):
            break
    return out


def by_bytes(a: paired.RunFiles, b: paired.RunFiles, user: list) -> tuple[dict, dict]:
    """comparison['bytes'] and {'documents': rows for documents.jsonl, 'shown': heatmap documents}."""
    pairs = [(x, y) for x, y in zip(a.documents, b.documents) if not x.get("skipped") and x["tokens"] and y["tokens"]]
    texts = scored_texts(a, {x["index"] for x, _ in pairs})
    block, rows, shown = compare_documents(pairs, (token_spans(a.tokens), token_spans(b.tokens)), texts, user)
    block["gap_bits_per_byte"] = (b.summary["nll_sum"] - a.summary["nll_sum"]) / (block["bytes"] * LN2)  # bpb_B − bpb_A
    return block, {"documents": rows, "shown": shown}


def markdown(block: dict) -> str:
    """comparison.md's byte-level section."""
    out = ["", "## Byte by byte (B − A, bits per byte)", "",
           f"Gap {block['gap_bits_per_byte']:+.6f} bits per byte over {block['bytes']:,} bytes of {block['documents']} "
           f"documents. {block['attribution'].capitalize()}.", "",
           "| byte class | bytes | contribution | gap within the class | bits/byte A | bits/byte B |",
           "|---|---|---|---|---|---|"]
    for name, value in block["classes"].items():
        within = block["class_gap_within"][name]
        out.append(f"| {name} | {block['class_bytes'][name]:,} | {value:+.6f} | {_num(within, '+')} | "
                   f"{_num(block['class_bits_per_byte_a'][name])} | {_num(block['class_bits_per_byte_b'][name])} |")
    if block["groups"]:
        out += ["", "| group | bytes | gap within | contribution |", "|---|---|---|---|"]
        out += [f"| {g} | {v['bytes']:,} | {v['gap_bits_per_byte']:+.6f} | {v['contribution']:+.6f} |"
                for g, v in block["groups"].items()]
    out += ["", "Largest gaps by document (Δ bits = B − A over the document):", "",
            "| document | id | bytes | Δ bits | gap (bits/byte) |", "|---|---|---|---|---|"]
    out += [f"| {r['index']} | {r['id'] or '-'} | {r['bytes']:,} | {r['delta_bits']:+.2f} | {r['bits_per_byte_gap']:+.4f} |"
            for r in block["documents_top"]]
    out += ["", "Largest gaps by span (spans between token boundaries of both tokenizations):", "",
            "| document | bytes | Δ bits | A's tokens | B's tokens |", "|---|---|---|---|---|"]
    out += [f"| {s['index']} | {s['byte_start']}-{s['byte_end']} | {s['delta_bits']:+.2f} | `{_cell(s['tokens_a'])}` | "
            f"`{_cell(s['tokens_b'])}` |" for s in block["aligned_spans_top"]]
    return "\n".join(out) + "\n"


def _num(x, sign: str = "") -> str:
    return "-" if x is None else f"{x:{sign}.4f}"


def _cell(text: str, width: int = 60) -> str:
    """A span's text in a Markdown table cell: escapes shown (a newline as \\n), | escaped, at most `width` wide."""
    text = json.dumps(text, ensure_ascii=False)[1:-1].replace("`", "'")
    text = text if len(text) <= width else text[: width - 1] + "…"
    return text.replace("|", "\\|")


def write(comparison: dict, extra: dict | None, output_dir: str) -> list[str]:
    """comparison.json and comparison.md (paired.write); with a byte-level breakdown also documents.jsonl (one row per
    paired document) and comparison.html (the heatmap). The names written."""
    from lm_ce.reports.bytepage import render

    directory = paired.write(comparison, output_dir)
    names = ["comparison.json", "comparison.md"]
    if extra is None:
        return names
    with open(directory / "comparison.md", "a", encoding="utf-8") as f:
        f.write(markdown(comparison["bytes"]))
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in extra["documents"])
    (directory / "documents.jsonl").write_text(lines, encoding="utf-8")
    (directory / "comparison.html").write_text(render(comparison, extra["shown"]), encoding="utf-8")
    return [*names, "documents.jsonl", "comparison.html"]
