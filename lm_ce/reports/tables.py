"""The run's figures as text: the console table and results.md (a summary dict in, lines out).

What came from the run's inputs (model and data paths, dataset, group and model names) is written to Markdown as
literal text (`md`): raw HTML in a name (`<svg onload=...>`) would run in any viewer that renders it, as
results.html escapes it too, and a `|` or a newline would break the table.
"""
from __future__ import annotations

import math
import re

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


# HTML's specials as entities; Markdown's inline syntax (code, emphasis, links, strikethrough, table cells) escaped
# with a backslash, which CommonMark and GitHub read as the character itself; a line break is shown as \n. An
# underscore between two letters or digits never starts emphasis (my_model, max_length): only the others are escaped.
_MARKDOWN = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\\": "\\\\", "`": "\\`", "*": "\\*", "[": "\\[",
                           "]": "\\]", "|": "\\|", "~": "\\~", "\n": "\\n", "\r": "\\r"})
_EMPHASIS_UNDERSCORE = re.compile(r"(?<![^\W_])_|_(?![^\W_])")


def md(text) -> str:
    """Text shown as itself in Markdown, in a table cell or a heading: no HTML, link, code or emphasis from it."""
    return _EMPHASIS_UNDERSCORE.sub(r"\\_", str(text).translate(_MARKDOWN))


def md_row(cells) -> str:
    """One Markdown table row, each cell as literal text."""
    return "| " + " | ".join(md(c) for c in cells) + " |"


def md_code(lines: list[str], info: str = "text") -> list[str]:
    """A fenced code block holding `lines` as they are: its fence is longer than any run of backticks in them, so no
    line can close it early (inside, Markdown escapes would show as backslashes)."""
    longest = max((len(run) for line in lines for run in re.findall("`+", line)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + info, *lines, fence]


def figure_rows(summary: dict) -> list[tuple[str, str]]:
    """(label, value) of ROWS; in a joined run (stream, chunk protocols) also the empty rows joined into its text."""
    rows = [(label, fmt(lookup(summary, path))) for label, path in ROWS]
    if lookup(summary, "counts.joined_empty_rows") is not None:
        at = next(i for i, (_, path) in enumerate(ROWS) if path == "counts.skipped_documents") + 1
        rows.insert(at, ("empty rows joined", fmt(summary["counts"]["joined_empty_rows"])))
    return rows


def lookup(summary: dict, path: str):
    value = summary
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):  # before int (a bool is one): results.json's spelling, not 0 and 1
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:,.6g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def title(summary: dict) -> str:
    s, m = summary["settings"], summary["model"]
    protocol = f"protocol {protocol_label(s)}, " if s.get("protocol") else ""
    return (
        f"{m['name']} ({m['dtype']}) on {data_source(summary['data'])}: {protocol}{s['mode']} mode, "
        f"max_length {s['max_length']}" + (f", stride {s['stride']}" if s.get("stride") else "")
        + (f", shard {summary['shard']['index']} of {summary['shard']['count']}" if summary.get("shard") else "")
    )


def shard_note(summary: dict) -> str | None:
    """For one shard's report: that its figures are of that shard's documents only."""
    shard = summary.get("shard")
    if not shard:
        return None
    return (f"SHARD {shard['index']} of {shard['count']}: these figures cover only this shard's documents; "
            "lm-ce merge joins the shards into the whole run's figures")


def protocol_label(s: dict) -> str:
    """The protocol's name, and the fields of it this run set otherwise: 'lm-eval (overridden: --mode stream)'."""
    overrides = s.get("protocol_overrides") or {}
    if not overrides:
        return s["protocol"]
    shown = []
    for key, value in overrides.items():
        text = repr(value) if isinstance(value, str) and value != value.strip() else value  # a separator: '\n'
        shown.append(f"--{key.replace('_', '-')} {text}")
    return f"{s['protocol']} (overridden: {', '.join(shown)})"


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
            elif value is not None and value != {}:
                rows.append((f"{section}.{key}", fmt(value)))
    return rows


def headline(summary: dict) -> tuple[str, str] | None:
    """(label, value) of the protocol's headline figure when it is not plain perplexity, and llama.cpp's own
    `PPL +/- error` in llama-cpp mode; None otherwise."""
    s = summary.get("settings", {})
    key = s.get("headline")
    error = summary.get("uncertainty", {}).get("llama_cpp_perplexity_error")
    if not key or (key == "perplexity" and error is None):  # plain perplexity: the table's second row already
        return None
    value = fmt(lookup(summary, f"metrics.{key}"))
    if error is not None:
        value = f"PPL = {summary['metrics']['perplexity']:.4f} +/- {error:.5f} (llama-perplexity's per-token error)"
    return f"headline ({protocol_label(s)}: {key})", value


def suite_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a suite: one row per dataset, then the pooled and the mean figures."""
    header = ["dataset", "protocol", "tokens", "mean loss", "perplexity", "bits/byte", "headline"]
    rows = []
    for name, d in summary["suite"]["datasets"].items():
        key = d["settings"]["headline"]
        rows.append([name + ("" if d["complete"] else " (interrupted)"), protocol_label(d["settings"]),
                     fmt(d["counts"]["tokens"]), fmt(d["metrics"]["mean_loss"]), fmt(d["metrics"]["perplexity"]),
                     fmt(d["metrics"]["bits_per_byte"]), f"{key} {fmt(d['metrics'][key])}"])
    micro, macro = summary["suite"]["micro"], summary["suite"]["macro"]
    rows.append(["micro (pooled)", "-", fmt(micro["tokens"]), fmt(micro["mean_loss"]), fmt(micro["perplexity"]),
                 fmt(micro["bits_per_byte"]), "-"])
    rows.append([f"macro (mean of {macro['datasets']})", "-", "-", fmt(macro["mean_loss"]), fmt(macro["perplexity"]),
                 fmt(macro["bits_per_byte"]), "-"])
    return header, rows


def _suite_title(summary: dict) -> str:
    m = summary["model"]
    return f"{m['name']} ({m['dtype']}) on a suite of {len(summary['suite']['datasets'])} datasets"


def _grid(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header, *body]]


def interval(summary: dict) -> str:
    u = summary.get("uncertainty", {})
    if "mean_loss_stderr" not in u:
        return "-"
    lo, hi = u["perplexity_ci95"]
    return f"{fmt(lo)} .. {fmt(hi)} (stderr of mean loss {u['mean_loss_stderr']:.3g} over {u['clusters']} {u['unit']})"


def sections(summary: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of each breakdown: groups, compared models, LongPPL, loss by position."""
    out = []
    if summary.get("groups"):
        rows = [[g, fmt(v["documents"]), fmt(v["tokens"]), fmt(v["mean_loss"]), fmt(v["perplexity"]), fmt(v["bits_per_byte"])]
                for g, v in summary["groups"].items()]
        out.append(("By group", ["group", "documents", "tokens", "mean loss", "perplexity", "bits/byte"], rows))
    if summary.get("compare"):
        first = summary["metrics"]
        rows = [[summary["model"]["name"] + " (first)", fmt(first["perplexity"]), fmt(first["bits_per_byte"]), *"----"]]
        for name, c in summary["compare"].items():  # kl_mean, kl_p99, top1_agreement: the first-version names
            rows.append([name, fmt(c.get("perplexity")), fmt(c.get("bits_per_byte")), fmt(c.get("delta_perplexity")),
                         fmt(c.get("kl_mean")), fmt(c.get("kl_p99")), fmt(c.get("top1_agreement"))])
            if c.get("note"):
                rows[-1][3:] = [c["note"], "-", "-", "-"]
        out.append(("Model against model (same tokens)", ["model", "perplexity", "bits/byte", "delta ppl", "KL mean",
                                                           "KL p99", "same top-1"], rows))
        for name, c in summary["compare"].items():  # another tokenizer, with --save-tokens: the gap byte by byte
            b = c.get("bytes") or {}
            if "classes" in b:
                rows = [[k, fmt(b["class_bytes"][k]), fmt(v), fmt(b["class_gap_within"][k])] for k, v in b["classes"].items()]
                out.append((f"Byte by byte: {name} minus the first model, {fmt(b['gap_bits_per_byte'])} bits per byte",
                            ["byte class", "bytes", "contribution to the gap", "gap within the class"], rows))
    if summary.get("longppl"):
        k = summary["longppl"]
        out.append((f"LongPPL (key tokens: short context {k['context'][0]}-{k['context'][1]}, alpha {fmt(k['alpha'])}, "
                    f"beta {fmt(k['beta'])})", ["evaluator", "LongPPL", "key tokens", "key fraction", "perplexity"],
                    [[k["evaluator"], fmt(k["perplexity"]), fmt(k["key_tokens"]), fmt(k["key_fraction"]),
                      fmt(summary["metrics"]["perplexity"])]]))
    out += task_sections(summary)
    if summary.get("by_position"):
        rows = [[f"{b['positions'][0]}-{b['positions'][1]}", fmt(b["tokens"]), fmt(b["mean_loss"]), fmt(b["perplexity"])]
                for b in summary["by_position"]]
        out.append(("Mean loss by position in the window", ["positions", "tokens", "mean loss", "perplexity"], rows))
    return out


def task_sections(summary: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The multiple-choice accuracies or the surprisal per word, with their standard errors."""
    out = []
    m = summary.get("multiple_choice")
    if m:
        names = ("acc", "acc_norm", "acc_bytes") if m["protocol"] == "lm-eval" else ("acc",)
        rows = [[name, fmt(m[name]), fmt(m[f"{name}_stderr"]),
                 " .. ".join(fmt(x) for x in m[f"{name}_wilson95"]) if m[f"{name}_wilson95"] else "-"] for name in names]
        out.append((f"Multiple choice ({m['protocol']}, {m['items']:,} items; stderr over items)",
                    ["metric", "value", "stderr", "95% Wilson interval"], rows))
    w = summary.get("surprisal")
    if w:
        ci = " .. ".join(fmt(x) for x in w["mean_surprisal_ci95"]) if w.get("mean_surprisal_ci95") else "-"
        out.append((f"Word surprisal ({w['unit']}, bow correction {w['bow_correction']}; stderr clustered by document)",
                    ["words", "documents", "mean surprisal per word", "stderr", "95% interval"],
                    [[fmt(w["words"]), fmt(w["documents"]), fmt(w["mean_surprisal"]),
                      fmt(w.get("mean_surprisal_stderr")), ci]]))
    return out


KL_ROWS = [("Mean   ", "mean"), ("Maximum", "max"), ("99.9%  ", "p99_9"), ("99.0%  ", "p99"), ("95.0%  ", "p95"),
           ("90.0%  ", "p90"), ("75.0%  ", "p75"), ("Median ", "median"), ("25.0%  ", "p25"), ("10.0%  ", "p10"),
           (" 5.0%  ", "p5"), (" 1.0%  ", "p1"), (" 0.1%  ", "p0_1"), ("Minimum", "min")]


def _pm(value, se, scale: float = 1.0, digits: int = 6) -> str:
    """'value ± stderr' in llama.cpp's fixed-width style (no ± part without a standard error)."""
    if value is None:
        return "-"
    text = f"{value * scale:{digits + 5}.{digits}f}"
    return text + (f" ± {se * scale:{digits + 4}.{digits}f}" if se is not None else "")


def divergence_blocks(summary: dict) -> list[tuple[str, list[str]]]:
    """Per compared model, its statistics against the base in the layout of llama.cpp's --kl-divergence
    (perplexity, KL divergence, token probability), so that users can read them side by side."""
    out = []
    base_se = summary.get("uncertainty", {}).get("mean_loss_stderr")
    for name, c in (summary.get("compare") or {}).items():
        if "kl_divergence" not in c:
            continue
        kl, dp, same, ratio = c["kl_divergence"], c["delta_p"], c["same_top1"], c["ln_ppl_ratio"]
        ppl, base_ppl = c["perplexity"], c["base_perplexity"]
        se_of = lambda x, se: x * se if se is not None and x is not None and math.isfinite(x) else None  # noqa: E731
        rows = [("Mean PPL(Q)", _pm(ppl, se_of(ppl, c["mean_loss_stderr"]))),
                ("Mean PPL(base)", _pm(base_ppl, se_of(base_ppl, base_se))),
                ("Cor(ln(PPL(Q)), ln(PPL(base)))", f"{100 * c['corr_ln_p']:6.2f}%" if c["corr_ln_p"] is not None else "-"),
                ("Mean ln(PPL(Q)/PPL(base))", _pm(ratio["mean"], ratio["stderr"])),
                ("Mean PPL(Q)/PPL(base)", _pm(c["perplexity_ratio"], se_of(c["perplexity_ratio"], ratio["stderr"]))),
                ("Mean PPL(Q)-PPL(base)", _pm(c["delta_perplexity"], c["delta_perplexity_stderr"]))]
        width = max(len(label) for label, _ in rows)
        lines = ["====== Perplexity statistics ======"] + [f"{label:<{width}}: {value}" for label, value in rows]
        lines += ["", "====== KL divergence statistics ======"]
        lines += [f"{label} KLD: {_pm(kl[key], kl['stderr'] if key == 'mean' else None)}"
                  for label, key in KL_ROWS if key in kl]
        lines += ["", "====== Token probability statistics ======"]
        lines += [f"{label} Δp: {_pm(dp[key], dp['stderr'] if key == 'mean' else None, 100, 3)} %"
                  for label, key in KL_ROWS]
        lines += [f"RMS Δp    : {_pm(dp['rms'], dp['rms_stderr'], 100, 3)} %",
                  f"Same top p: {_pm(same['mean'], same['stderr'], 100, 3)} %"]
        notes = [f"Q = {name}, base = {summary['model']['name']}; {c['tokens']:,} tokens; ± is the standard error "
                 f"clustered by {c['unit']} ({c['clusters']:,}); per-token (iid) errors are in results.json"]
        if c.get("quantile_rank_error"):
            notes.append(f"percentiles from a sketch: rank error at most {c['quantile_rank_error']:.2g} of the tokens")
        out.append((f"{name} against the base (llama.cpp's --kl-divergence layout)", lines + [""] + notes))
    return out


def table(summary: dict) -> str:
    """The console table: one figure a line, then the breakdowns (a suite: one row per dataset, then averages)."""
    if "suite" in summary:
        interrupted = [] if summary["complete"] else ["INTERRUPTED: the suite stopped before its last dataset"]
        return "\n".join([_suite_title(summary), *interrupted, *_grid(*suite_rows(summary))])
    rows = figure_rows(summary)
    rows.insert(2, ("perplexity 95% interval", interval(summary)))
    if headline(summary):
        rows.insert(0, headline(summary))
    width = max(len(label) for label, _ in rows)
    lines = [title(summary)]
    if not summary.get("complete", True):
        lines.append("INTERRUPTED: these figures cover only what was scored before the stop")
    if shard_note(summary):
        lines.append(shard_note(summary))
    lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    for name, header, body in sections(summary):
        lines += ["", name, *_grid(header, body)]
    for name, block in divergence_blocks(summary):
        lines += ["", name, *block]
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    """results.md: the figures, then what was run; every name and path in it as literal text (`md`)."""
    if "suite" in summary:
        header, body = suite_rows(summary)
        out = [f"# {md(_suite_title(summary))}", "", md_row(header), "|" + "---|" * len(header)]
        return "\n".join(out + [md_row(r) for r in body]) + "\n"
    out = [f"# {md(title(summary))}", ""]
    if not summary.get("complete", True):
        out += ["**Interrupted: these figures cover only what was scored before the stop.**", ""]
    if shard_note(summary):
        out += [f"**{shard_note(summary)}.**", ""]
    out += ["| metric | value |", "|---|---|"]
    out += [md_row([label, value]) for label, value in figure_rows(summary)]
    out += [md_row(["perplexity 95% interval", interval(summary)])]
    if headline(summary):
        out += [md_row(headline(summary))]
    for name, header, body in sections(summary):
        out += ["", f"## {md(name)}", "", md_row(header), "|" + "---|" * len(header)]
        out += [md_row(r) for r in body]
    for name, block in divergence_blocks(summary):
        out += ["", f"## {md(name)}", "", *md_code(block)]
    out += ["", "## What was run", "", "| | |", "|---|---|"]
    out += [md_row([key, value]) for key, value in what_was_run(summary)]
    return "\n".join(out) + "\n"
