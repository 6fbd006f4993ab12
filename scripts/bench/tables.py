"""From the children's records to figures: per-path summaries, checks, ratios, targets and Markdown tables.

Standard library only (the parent imports it).
"""
from __future__ import annotations

import statistics

from .spec import BUSY, PATH_NAMES, TARGETS


def summarize(runs: list[dict]) -> dict | None:
    """One path's runs: median tokens/s, largest peak memory, and what every run agreed on."""
    ok = [r for r in runs if r["ok"]]
    if not ok:
        return None
    res = [r["result"] for r in ok]
    rates = [x["tokens"] / x["seconds"] for x in res]
    util = [x["cpu_seconds"] / (x["seconds"] * x["threads"]) for x in res if x.get("cpu_seconds")]
    out = {
        "tokens": res[0]["tokens"], "tokens_all_equal": len({x["tokens"] for x in res}) == 1,
        "nll_sum": res[0].get("nll_sum"), "seconds": statistics.median(x["seconds"] for x in res),
        "tokens_per_second": statistics.median(rates), "tokens_per_second_all": rates,
        "peak_rss_mb": max(r["ru_maxrss_mb"] for r in ok),
        "rss_before_scoring_mb": max((x["memory"].get("before_scoring_mb") or 0) for x in res) or None,
        "cpu_seconds": statistics.median(x["cpu_seconds"] for x in res) if util else None,
        "cpu_utilization": statistics.median(util) if util else None,
        "load_average": ok[-1].get("load_average"), "process_wall_seconds": statistics.median(r["wall_seconds"] for r in ok),
        "load_seconds": statistics.median(x["load_seconds"] for x in res), "parameters": res[0].get("parameters"),
        "threads": max(x["threads"] for x in res), "padded_tokens": padded_positions(res[0]),
    }
    heads = [x["head_matmul"] for x in res if x.get("head_matmul")]
    if heads:  # this body's time plus the head's matrix multiply alone
        head = statistics.median(h["seconds"] for h in heads)
        out["head_matmul_seconds"] = head
        out["limit_tokens_per_second"] = out["tokens"] / (out["seconds"] + head)
        out["peak_rss_mb"] = max(x["memory"]["peak_before_head_mb"] for x in res)  # the body's own peak
    return out


def summarize_peer(runs: list[dict]) -> dict:
    """One whole-process peer's runs: median wall and scoring seconds, largest peak, the runs themselves."""
    ok = [r for r in runs if r["ok"]]
    if not ok:
        return {"ok": False, "error": runs[-1]["error"], "runs": runs}
    return {"ok": True, "runs": runs, "tokens": ok[0]["tokens"], "nll_sum": ok[0]["nll_sum"],
            "tokens_all_equal": len({r["tokens"] for r in ok}) == 1,
            "wall_seconds": statistics.median(r["wall_seconds"] for r in ok),
            "scoring_seconds": statistics.median(r["scoring_seconds"] for r in ok),
            "ru_maxrss_mb": max(r["ru_maxrss_mb"] for r in ok), "load_average": ok[-1]["load_average"]}


def padded_positions(result: dict) -> int | None:
    """Input positions the model computed, padding included."""
    if result.get("padded_tokens") is not None:
        return result["padded_tokens"]
    if result.get("input_tokens") is not None:
        return result["input_tokens"] + (result.get("padding_tokens") or 0)
    return None


def check_case(name: str, summary: dict, rtol: float, failures: list[str]) -> dict:
    """Every path scored the same tokens; every path with an NLL agrees with lm_ce's within rtol."""
    have = {p: s for p, s in summary.items() if s}
    counts = {p: s["tokens"] for p, s in have.items()}
    checks: dict = {"tokens": counts, "threads": {p: s["threads"] for p, s in have.items()}, "nll_rel_diff": {}}
    if len(set(counts.values())) > 1:
        failures.append(f"{name}: scored token counts differ between paths: {counts}")
    if len(set(checks["threads"].values())) > 1:
        failures.append(f"{name}: the paths ran with different torch thread counts: {checks['threads']}")
    failures += [f"{name}: path {p} scored different token counts across repeats"
                 for p, s in have.items() if not s["tokens_all_equal"]]
    ours = have.get("lm_ce", {}).get("nll_sum")
    for p, s in have.items():
        if p == "lm_ce" or s["nll_sum"] is None or ours is None:
            continue
        rel = abs(s["nll_sum"] - ours) / max(abs(ours), 1e-300)
        checks["nll_rel_diff"][p] = rel
        if rel > rtol:
            failures.append(f"{name}: NLL sum of {p} {s['nll_sum']:.6f} and lm_ce {ours:.6f} differ by {rel:.2e} (> {rtol:g})")
    checks["nll_ok"] = all(r <= rtol for r in checks["nll_rel_diff"].values()) if checks["nll_rel_diff"] else None
    return checks


def check_peer(name: str, peer: dict, rtol: float, failures: list[str]) -> None:
    """Each whole-process peer (lm-eval, the baseline's CLI) scored the lm_ce CLI's tokens with its NLL."""
    cli = peer["lm_ce_cli"]
    for key in ("lm_eval", "baseline"):
        other = peer.get(key)
        if not (cli["ok"] and other and other["ok"]):
            continue
        rel = abs(cli["nll_sum"] - other["nll_sum"]) / max(abs(cli["nll_sum"]), 1e-300)
        other.update(nll_rel_diff=rel, tokens_equal=cli["tokens"] == other["tokens"])
        if cli["tokens"] != other["tokens"] or rel > rtol or not (cli["tokens_all_equal"] and other["tokens_all_equal"]):
            failures.append(f"{name} peer: lm_ce CLI ({cli['tokens']} tok, NLL {cli['nll_sum']:.6f}) and {key} "
                            f"({other['tokens']} tok, NLL {other['nll_sum']:.6f}) disagree (rel {rel:.2e})")


def ratios(entry: dict) -> dict[str, float]:
    """The case's ratios: lm_ce's tokens/s over each peer's, and the whole-process ones against lm-eval."""
    sm = entry["summary"]
    rate = {p: s["tokens_per_second"] for p, s in sm.items() if s}
    if limit_rate(sm) is not None:
        rate["limit"] = limit_rate(sm)
    out = {}
    if "lm_ce" in rate:
        out.update({f"lm_ce/{p}": rate["lm_ce"] / r for p, r in rate.items() if p != "lm_ce"})
    if "lm_ce" in rate and "lm_ce-min-k" in rate:
        out["lm_ce-min-k/lm_ce"] = rate["lm_ce-min-k"] / rate["lm_ce"]
    if "labels" in rate and "body" in rate:
        out["labels/body"] = rate["labels"] / rate["body"]
    if "limit" in rate:
        out["limit/body"] = rate["limit"] / rate["body"]
    if sm.get("lm_ce") and sm.get("labels"):
        out["lm_ce MB/labels MB"] = sm["lm_ce"]["peak_rss_mb"] / sm["labels"]["peak_rss_mb"]
    peer = entry.get("peer") or {}
    cli, le, base = peer.get("lm_ce_cli"), peer.get("lm_eval"), peer.get("baseline")
    if cli and le and cli["ok"] and le["ok"]:
        out["lm-eval wall/lm_ce wall"] = le["wall_seconds"] / cli["wall_seconds"]
        out["lm-eval MB/lm_ce MB"] = le["ru_maxrss_mb"] / cli["ru_maxrss_mb"]
    if cli and base and cli["ok"] and base["ok"]:
        out["baseline scoring s/lm_ce scoring s"] = base["scoring_seconds"] / cli["scoring_seconds"]
        out["baseline wall/lm_ce wall"] = base["wall_seconds"] / cli["wall_seconds"]
        out["baseline MB/lm_ce MB"] = base["ru_maxrss_mb"] / cli["ru_maxrss_mb"]
    return out


def limit_rate(summary: dict) -> float | None:
    """The measured limit of an exact evaluator: the faster of the two bodies plus the head's matmul alone."""
    rates = [summary[p]["limit_tokens_per_second"] for p in ("body", "plan-body")
             if summary.get(p) and "limit_tokens_per_second" in summary[p]]
    return max(rates) if rates else None


def targets(report: dict) -> list[dict]:
    """Each target of issue 17 with the measured ratio, and whether it holds (None: not measured)."""
    out = []
    for t in TARGETS:
        value = report["cases"].get(t.case, {}).get("ratios", {}).get(t.ratio)
        out.append({"case": t.case, "ratio": t.ratio, "target": t.at_least, "says": t.says, "measured": value,
                    "holds": None if value is None else value >= t.at_least})
    return out


def fmt(x, spec=".1f", none="–") -> str:
    return none if x is None else format(x, spec)


def tables(report: dict) -> str:
    """The run's tables: settings and load, tokens/s per path, ratios, targets, per-path detail, peers."""
    s, m = report["settings"], report["machine"]
    lines = [f"threads {s['threads']}, dtype {s['dtype']}, repeat {s['repeat']} (median tok/s, max peak RSS), "
             f"warm-up {'on' if s['warmup'] else 'OFF'}{', PROFILED (slower)' if s['profile'] else ''}; "
             f"load average (1, 5, 15 min) {m['load_average_start']} at start -> {m['load_average_end']} at end", ""]
    lines += speed_table(report) + [""] + targets_table(report) + [""] + detail_table(report)
    peers = peer_table(report)
    return "\n".join(lines + ([""] + peers if peers else []))


def speed_table(report: dict) -> list[str]:
    paths = ("file-order", "labels", "body", "plan-body", "limit", "lm_ce")
    lines = ["| case | tokens | head % | " + " | ".join(f"{p} tok/s" for p in paths)
             + " | lm_ce/body | lm_ce/labels | lm_ce/limit | lm_ce MB | labels MB | body MB | NLL check |",
             "|---|---:|---:|" + "---:|" * (len(paths) + 6) + "---|"]
    for name, e in report["cases"].items():
        sm, r = e["summary"], e["ratios"]
        rate = {p: sm[p]["tokens_per_second"] if sm.get(p) else None for p in paths if p != "limit"}
        rate["limit"] = limit_rate(sm)
        star = {p: "*" if sm.get(p) and (sm[p]["cpu_utilization"] or 1) < BUSY else "" for p in paths}
        params = next((sm[p]["parameters"] for p in ("labels", "body", "file-order") if sm.get(p)), None)
        tokens = next((x["tokens"] for x in sm.values() if x), None)
        mb = {p: sm[p]["peak_rss_mb"] if sm.get(p) else None for p in ("lm_ce", "labels", "body")}
        ch = e["checks"]
        check = "n/a" if ch["nll_ok"] is None else ("ok" if ch["nll_ok"] else "FAIL")
        if ch["nll_rel_diff"]:
            check += f" (max rel {max(ch['nll_rel_diff'].values()):.0e})"
        if len(set(ch["tokens"].values())) > 1:
            check = "FAIL (token counts)"
        lines.append(
            f"| {name} | {fmt(tokens, 'd')} | {fmt(params and 100 * params['head_share'], '.0f')} | "
            + " | ".join(fmt(rate[p]) + star[p] for p in paths)
            + f" | {fmt(r.get('lm_ce/body'), '.2f')} | {fmt(r.get('lm_ce/labels'), '.2f')} "
            f"| {fmt(r.get('lm_ce/limit'), '.2f')} | {fmt(mb['lm_ce'], '.0f')} | {fmt(mb['labels'], '.0f')} "
            f"| {fmt(mb['body'], '.0f')} | {check} |")
    lines += ["", "plan-body: the body alone on lm_ce's own batches (no mask). limit: the faster body's time plus "
              "the head's matrix multiply alone (in lm_ce's blocks and tiles, measured in that body's process). "
              f"head %: the head's share of the weight-matmul FLOPs per token. * CPU utilization below {BUSY}: "
              "that path waited for the CPU (a busy machine) and its tok/s is low by about that factor."]
    return lines


def targets_table(report: dict) -> list[str]:
    lines = ["| target | ratio | measured | target | holds |", "|---|---|---:|---:|---|"]
    for t in report["targets"]:
        holds = "not measured" if t["holds"] is None else ("yes" if t["holds"] else "NO")
        lines.append(f"| {t['says']} | {t['ratio']} | {fmt(t['measured'], '.2f')} | {t['target']:.2f} | {holds} |")
    return lines


def detail_table(report: dict) -> list[str]:
    lines = ["| case | path | seconds | tok/s | CPU util | load avg (1 min) at end | load s | padded positions "
             "| before scoring MB | peak RSS MB | NLL sum |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, e in report["cases"].items():
        for p, x in e["summary"].items():
            if not x:
                continue
            load = x["load_average"][0] if x["load_average"] else None
            lines.append(
                f"| {name} | {PATH_NAMES[p]} | {x['seconds']:.2f} | {x['tokens_per_second']:.1f} "
                f"| {fmt(x['cpu_utilization'], '.2f')} | {fmt(load, '.2f')} | {x['load_seconds']:.1f} "
                f"| {fmt(x['padded_tokens'], 'd')} | {fmt(x['rss_before_scoring_mb'], '.0f')} | {x['peak_rss_mb']:.0f} "
                f"| {fmt(x['nll_sum'], '.4f')} |")
            if x.get("head_matmul_seconds") is not None:
                lines.append(f"| {name} | head matmul alone (body above + this) | {x['head_matmul_seconds']:.2f} "
                             f"| {x['limit_tokens_per_second']:.1f} | | | | | | | |")
    return lines


def peer_table(report: dict) -> list[str]:
    peers = {n: e["peer"] for n, e in report["cases"].items() if e.get("peer")}
    if not peers:
        return []
    base = (report.get("baseline") or {}).get("rev", "baseline")
    labels = {"lm_ce_cli": "lm_ce CLI", "baseline": f"lm_ce CLI at {base}", "lm_eval": "lm-eval HFLM"}
    lines = ["Whole processes (Python start, imports, model load, scoring, writing): the lm_ce CLI, the CLI at the "
             "baseline commit, lm-eval (median wall and scoring seconds, largest peak):", "",
             "| case | process | wall s | scoring s | peak RSS MB | tokens | NLL sum |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, pr in peers.items():
        for key, label in labels.items():
            r = pr.get(key)
            if r is None:
                continue
            lines.append(f"| {name} | {label} | {r['wall_seconds']:.1f} | {r['scoring_seconds']:.1f} "
                         f"| {r['ru_maxrss_mb']:.0f} | {r['tokens']} | {r['nll_sum']:.4f} |" if r["ok"]
                         else f"| {name} | {label} | failed | | | | |")
        cl = pr["lm_ce_cli"]
        for key in ("baseline", "lm_eval"):
            r = pr.get(key)
            if r and "nll_rel_diff" in r:
                lines.append(f"| {name} | {labels[key]} / lm_ce | {r['wall_seconds'] / cl['wall_seconds']:.2f}x "
                             f"| {r['scoring_seconds'] / cl['scoring_seconds']:.2f}x "
                             f"| {r['ru_maxrss_mb'] / cl['ru_maxrss_mb']:.2f}x "
                             f"| {'equal' if r['tokens_equal'] else 'DIFFER'} | rel {r['nll_rel_diff']:.0e} |")
    return lines
