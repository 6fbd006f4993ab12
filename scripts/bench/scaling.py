"""How cost grows: lm_ce on 10^3 .. 10^6 tokens of one corpus (KJV chapters), tokens/s and peak memory by size.

A small random model (1 layer, hidden 32, a 2048-token BPE vocabulary trained on the KJV) keeps 10^6 tokens
within a minute on a 2-core CPU: what is measured is the pipeline (reading, tokenizing, planning, scoring
bookkeeping, the sums it keeps), whose memory must not grow with the data. Each size runs in a fresh process.
"""
from __future__ import annotations

import json
from pathlib import Path

from .processes import run_child
from .spec import SCALING, SCALING_SIZES


def run_scaling(settings: dict, work: Path, timeout: float, failures: list[str]) -> dict:
    """Prepare and score each size in its own process; the rows of the scaling table."""
    rows = []
    for size in SCALING_SIZES:
        spec = {**SCALING.to_dict(), "case": f"scaling-{size}", "tokens": size, **settings,
                "data": str(work / f"scaling-{size}.jsonl"), "warmup_data": str(work / "scaling.warmup.jsonl")}
        meta = run_child("prepare", spec, work, f"scaling-{size}.prepare", timeout)
        if not meta["ok"]:
            failures.append(f"scaling {size}: preparation failed ({meta['error']})")
            continue
        spec.update(gguf=meta["result"]["gguf"], model_dir=meta["result"]["model_dir"])
        out = run_child("scale", spec, work, f"scaling-{size}", timeout)
        if not out["ok"]:
            failures.append(f"scaling {size}: {out['error']}")
            continue
        res = out["result"]
        rows.append({"size": size, "documents": meta["result"]["documents"], "tokens": res["tokens"],
                     "seconds": res["seconds"], "tokens_per_second": res["tokens"] / res["seconds"],
                     "peak_rss_mb": out["ru_maxrss_mb"], "before_scoring_mb": res["memory"]["before_scoring_mb"],
                     "cpu_utilization": res["cpu_seconds"] / (res["seconds"] * res["threads"]),
                     "load_average": out["load_average"]})
        print(f"   scaling {size:>8}: {res['tokens']:>8} tok  {rows[-1]['tokens_per_second']:8.0f} tok/s  "
              f"peak {out['ru_maxrss_mb']:6.0f} MB", flush=True)
    return {"rows": rows}


def run_size(spec: dict, mode: str) -> dict:
    """The lm_ce path on one size (the same child as the cases' lm_ce path)."""
    from .lm_ce_path import run_lm_ce

    return run_lm_ce(spec, mode)


def scaling_table(scaling: dict) -> list[str]:
    rows = scaling.get("rows") or []
    if not rows:
        return []
    lines = ["Scaling (tiny random model, KJV chapters, one process per size):", "",
             "| tokens | documents | seconds | tok/s | peak RSS MB | before scoring MB | peak - before MB | CPU util |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['documents']} | {r['seconds']:.2f} | {r['tokens_per_second']:.0f} "
                     f"| {r['peak_rss_mb']:.0f} | {r['before_scoring_mb']:.0f} "
                     f"| {r['peak_rss_mb'] - r['before_scoring_mb']:.0f} | {r['cpu_utilization']:.2f} |")
    first, last = rows[0], rows[-1]
    lines += ["", f"peak memory at {last['tokens']} tokens / at {first['tokens']}: "
              f"{last['peak_rss_mb'] / first['peak_rss_mb']:.3f}"]
    return lines


def plot(scaling: dict, path: Path) -> str | None:
    """tokens/s and peak memory against size (log x), as a PNG; None without matplotlib or rows."""
    rows = scaling.get("rows") or []
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    if not rows:
        return None
    sizes = [r["tokens"] for r in rows]
    fig = Figure(figsize=(9, 3.4))  # no pyplot: the backend and pyplot's figures stay as they were
    speed, memory = fig.subplots(1, 2)
    speed.plot(sizes, [r["tokens_per_second"] for r in rows], "o-")
    speed.set(xscale="log", xlabel="tokens scored", ylabel="tokens / s", title="speed")
    memory.plot(sizes, [r["peak_rss_mb"] for r in rows], "o-", label="peak RSS")
    memory.plot(sizes, [r["before_scoring_mb"] for r in rows], "s--", label="before scoring")
    memory.set(xscale="log", xlabel="tokens scored", ylabel="MB", title="process memory", ylim=(0, None))
    memory.legend()
    fig.suptitle("lm_ce on 10^3..10^6 tokens (tiny random model, 2-core CPU)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    (path.with_suffix(".json")).write_text(json.dumps(rows, indent=2))
    return str(path)
