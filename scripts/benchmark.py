"""Benchmark lm_ce against the peers a careful user would run: see docs/benchmark.md for the methodology.

    python scripts/benchmark.py                                   # every case, the scaling case, the targets
    python scripts/benchmark.py --cases smollm2-short --tokens 3000 --no-scaling   # a quick run
    python scripts/benchmark.py --documents-scaling --documents-top 100000        # documents 10^3..10^5 only
    python scripts/benchmark.py --state-io                        # one save and load of a large run's state
    python scripts/benchmark.py --multiple-choice --threads 1 --repeat 2          # lm_ce against lm-eval's CLI, 300 items
    python scripts/benchmark.py --multiple-choice --context-verses 1 ...         # the same with contexts a verse longer

This file is the parent: it starts one child process per path (scripts/bench/), so that each path's peak
memory is its own, and imports only the standard library.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.choices import choices_table, run_choices  # noqa: E402
from bench.documents import documents_table, plot_documents, run_documents_scaling  # noqa: E402
from bench.processes import ROOT, Bench, baseline_checkout, load_average, run_child, run_cli  # noqa: E402
from bench.scaling import plot, run_scaling, scaling_table  # noqa: E402
from bench.spec import BASELINE, CASES, PATH_NAMES, CaseSpec  # noqa: E402
from bench.tables import check_case, check_peer, ratios, summarize, summarize_peer, tables, targets  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:
        from bench.child import child_main

        return child_main(argv[1], argv[2])
    args = parse_args(argv)
    output = Path(args.output).resolve()
    work = output.parent / (output.stem + "_work")
    (work / "logs").mkdir(parents=True, exist_ok=True)
    if args.documents_scaling:
        return documents_main(args, output, work)
    if args.state_io:  # in this process: a timing of lm_ce's own code, no peer and no memory measured
        from bench.state_io import state_io, state_io_table

        text = "\n".join(state_io_table(state_io(args.repeat)))
        print(text)
        output.with_suffix(".state_io.md").write_text(text + "\n")
        return 0
    if args.multiple_choice:
        return choices_main(args, output, work)
    report = {"settings": settings(args), "cases": {},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "load_average_start": load_average()}}
    failures: list[str] = []
    started = time.perf_counter()
    report["baseline"] = baseline(args, work)
    for name in args.cases:
        entry = run_case(CASES[name], args, work, report, failures)
        if entry:
            report["cases"][name] = entry
    if args.scaling:
        print("== scaling: 10^3 .. 10^6 tokens, tiny random model", flush=True)
        report["scaling"] = run_scaling(child_settings(args), work, args.timeout, failures)
    report["total_seconds"] = time.perf_counter() - started
    report["machine"]["load_average_end"] = load_average()
    report["targets"] = targets(report)
    report["failures"] = failures
    text = tables(report) + "\n\n" + "\n".join(scaling_table(report.get("scaling", {})))
    if report.get("scaling"):
        report["scaling"]["plot"] = plot(report["scaling"], output.parent / "scaling.png")
    print("\n" + text)
    output.write_text(json.dumps(report, indent=2, default=str))
    (output.with_suffix(".md")).write_text(text + "\n")
    print(f"\nwrote {output} and {output.with_suffix('.md')} (child logs and data under {work})")
    for f in failures:
        print(f"FAIL: {f}")
    return 1 if failures else 0


def documents_main(args, output: Path, work: Path) -> int:
    """The documents-scaling case alone: this checkout, then (with --documents-against) another one."""
    failures: list[str] = []
    settings = {"threads": 1}
    variants = tuple(v for v in args.documents_variants.split(",") if v)
    print(f"== documents scaling: 10^3 .. {args.documents_top:,} documents, tiny model, one thread", flush=True)
    report = {"documents_scaling": run_documents_scaling(settings, Bench(work, args.timeout, failures), top=args.documents_top,
                                                         variants=variants)}
    lines = documents_table(report["documents_scaling"])
    if args.documents_against:
        print(f"== the same on {args.documents_against}", flush=True)
        other = run_documents_scaling(settings, Bench(work, args.timeout, failures), top=args.documents_against_top,
                                      root=args.documents_against, variants=("default",), resume=False)
        report["documents_scaling_against"] = other
        lines += ["", f"The same, lm_ce of {args.documents_against}:", ""] + documents_table(other)[2:]
    report["documents_scaling"]["plot"] = plot_documents(report["documents_scaling"], ROOT / "docs" / "documents_scaling.png")
    report["failures"] = failures
    return written(report, "\n".join(lines), output, failures)


def choices_main(args, output: Path, work: Path) -> int:
    """The multiple-choice case alone: lm_ce --task multiple-choice against lm-eval's command line."""
    failures: list[str] = []
    batches = tuple(int(b) for b in args.lm_eval_batches.split(",") if b)
    print(f"== multiple choice: {args.items} items ({args.context_verses} preceding verses in each context), SmolLM2-135M, "
          f"{args.threads} thread(s), lm-eval batch sizes {', '.join(map(str, batches))}", flush=True)
    report = {"settings": {"threads": args.threads, "items": args.items, "repeat": args.repeat,
                           "context_verses": args.context_verses},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_start": load_average()},
              "multiple_choice": run_choices(args.threads, args.items, args.repeat, batches,
                                             Bench(work, args.timeout, failures), args.context_verses)}
    report["machine"]["load_average_end"] = load_average()
    report["failures"] = failures
    return written(report, "\n".join(choices_table(report["multiple_choice"])), output, failures)


def written(report: dict, text: str, output: Path, failures: list[str]) -> int:
    """Print the tables, write the report (JSON) and the tables (Markdown) beside it; the exit code."""
    print("\n" + text)
    output.write_text(json.dumps(report, indent=2, default=str))
    output.with_suffix(".md").write_text(text + "\n")
    print(f"\nwrote {output} and {output.with_suffix('.md')}")
    for f in failures:
        print(f"FAIL: {f}")
    return 1 if failures else 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="benchmark.py", description=__doc__.split("\n\n")[0],
                                 epilog="cases: " + ", ".join(f"{c.name} ({c.title})" for c in CASES.values()))
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated cases (default: all)")
    ap.add_argument("--tokens", type=int, default=None, help="cap of scored tokens per case (default: per case)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every path")
    ap.add_argument("--batch-size", type=int, default=None, help="override the cases' batch size for every path")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each path, interleaved; median tok/s reported")
    ap.add_argument("--paths", default=None, help=f"subset of {','.join(PATH_NAMES)} (default: each case's own)")
    ap.add_argument("--no-peer", dest="peer", action="store_false", help="skip the whole-process peers")
    ap.add_argument("--baseline", default=BASELINE, metavar="REV",
                    help=f"commit whose lm_ce CLI runs beside the peers (default {BASELINE}, the version before the speed work; none: skip)")
    ap.add_argument("--no-scaling", dest="scaling", action="store_false", help="skip the 10^3..10^6 scaling case")
    ap.add_argument("--documents-scaling", action="store_true",
                    help="run only the documents-scaling case (10^3 documents up to --documents-top)")
    ap.add_argument("--state-io", action="store_true",
                    help="only time a save and a load of a large run's state, this format against a pickle (--repeat)")
    ap.add_argument("--documents-top", type=int, default=10**6, help="the largest size of the documents-scaling case")
    ap.add_argument("--documents-variants", default="save-tokens,checkpoint-1s",
                    help="besides the default run: save-tokens (up to 10^5), checkpoint-1s (at 10^5); empty: none")
    ap.add_argument("--documents-against", default=None, metavar="CHECKOUT",
                    help="also run the default variant with the lm_ce of this checkout (e.g. main), for documents/s")
    ap.add_argument("--documents-against-top", type=int, default=10**5, help="the largest size run against CHECKOUT")
    ap.add_argument("--multiple-choice", action="store_true",
                    help="run only the multiple-choice case: lm_ce --task multiple-choice against lm-eval's command line")
    ap.add_argument("--items", type=int, default=300, help="the multiple-choice case's items (4 choices each)")
    ap.add_argument("--context-verses", type=int, default=0,
                    help="the multiple-choice case's contexts start with this many preceding verses (HellaSwag-like: 1)")
    ap.add_argument("--lm-eval-batches", default="1,8", help="the multiple-choice case's lm-eval --batch_size values")
    ap.add_argument("--lm-ce", default=None, metavar="JSON", help='extra lm_ce Config fields, e.g. \'{"token_budget": 2048}\'')
    ap.add_argument("--rtol", type=float, default=None, help="NLL agreement with lm_ce (default 1e-4 for float32)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU (default: known cards)")
    ap.add_argument("--output", default=str(ROOT / "runs" / "benchmark" / "benchmark.json"), help="JSON results")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
    ap.add_argument("--no-warmup", action="store_true", help="diagnostics: skip the warm-up window")
    ap.add_argument("--profile", action="store_true", help="torch.profiler over each timed span (slower)")
    args = ap.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if set(args.cases) - set(CASES):
        ap.error(f"unknown case(s) {', '.join(sorted(set(args.cases) - set(CASES)))}; choose from {', '.join(CASES)}")
    if args.paths is not None:
        args.paths = [p.strip() for p in args.paths.split(",")]
        if not args.paths or set(args.paths) - set(PATH_NAMES):
            ap.error(f"--paths takes a comma-separated subset of {','.join(PATH_NAMES)}")
    if args.threads < 1 or args.repeat < 1 or (args.tokens is not None and args.tokens < 1):
        ap.error("--threads, --repeat and --tokens must be at least 1")
    args.lm_ce = json.loads(args.lm_ce) if args.lm_ce else {}
    args.rtol = args.rtol if args.rtol is not None else (1e-4 if args.dtype == "float32" else 2e-2)
    return args


def settings(args) -> dict:
    return {"cases": args.cases, "paths": args.paths, "tokens": args.tokens, "dtype": args.dtype,
            "threads": args.threads, "repeat": args.repeat, "batch_size": args.batch_size, "rtol": args.rtol,
            "peer": args.peer, "baseline": args.baseline, "scaling": args.scaling, "lm_ce_options": args.lm_ce, "warmup": not args.no_warmup,
            "profile": args.profile}


def child_settings(args) -> dict:
    """What every child of a run shares."""
    return {"dtype": args.dtype, "threads": args.threads, "warmup": not args.no_warmup, "lm_ce_options": args.lm_ce,
            "peak_tflops": args.peak_tflops}


def run_case(case: CaseSpec, args, work: Path, report: dict, failures: list[str]) -> dict | None:
    """Prepare the case, run each of its paths (interleaved when repeated) and the whole-process peers."""
    spec = {**case.to_dict(), "case": case.name, **child_settings(args), "tokens": args.tokens or case.tokens,
            "batch_size": args.batch_size or case.batch_size, "data": str(work / f"{case.name}.jsonl"),
            "warmup_data": str(work / f"{case.name}.warmup.jsonl"),
            "profile": str(work / "profiles") if args.profile else None}
    print(f"== {case.name}: {case.title}; preparing (caches, texts up to {spec['tokens']} tokens)", flush=True)
    meta = run_child("prepare", spec, work, f"{case.name}.prepare", args.timeout)
    if not meta["ok"]:
        failures.append(f"{case.name}: preparation failed ({meta['error']})")
        print("FAIL: " + failures[-1], flush=True)
        return None
    meta = meta["result"]
    spec.update(gguf=meta["gguf"], model_dir=meta["model_dir"])
    print(f"   {meta['documents']} documents, {meta['tokens']} scored tokens, {meta['windows']} windows of at most "
          f"{case.max_length}, batch {spec['batch_size']}, prefix token {meta['prefix_id']}", flush=True)
    paths = [p for p in case.paths if args.paths is None or p in args.paths]
    runs: dict[str, list[dict]] = {p: [] for p in paths}
    for r in range(args.repeat):
        for p in paths:
            out = run_child(p, spec, work, f"{case.name}.{p}" + (f".{r}" if args.repeat > 1 else ""), args.timeout)
            runs[p].append(out)
            report_run(case.name, p, out, failures)
    entry = {"meta": meta, "case": spec, "runs": runs, "summary": {p: summarize(rs) for p, rs in runs.items()}}
    entry["checks"] = check_case(case.name, entry["summary"], args.rtol, failures)
    if case.peer and args.peer:
        entry["peer"] = run_peer(spec, work, args, report, failures)
    entry["ratios"] = ratios(entry)
    print("   " + "  ".join(f"{k} {v:.2f}" for k, v in entry["ratios"].items()), flush=True)
    return entry


def report_run(name: str, path: str, out: dict, failures: list[str]) -> None:
    if not out["ok"]:
        failures.append(f"{name} {PATH_NAMES[path]}: {out['error']}; see {out['log']}")
        print("   FAIL: " + failures[-1], flush=True)
        return
    res = out["result"]
    util = res["cpu_seconds"] / (res["seconds"] * res["threads"]) if res.get("cpu_seconds") else None
    extra = f"  + head matmul {res['head_matmul']['seconds']:.2f} s" if res.get("head_matmul") else ""
    if res.get("gpu"):  # lm_ce on a GPU: the card, its peak memory and the model FLOPs utilisation
        g = res["gpu"]
        mfu = f"{100 * g['mfu']:.1f}%" if g["mfu"] is not None else "n/a (give --peak-tflops)"
        extra += f"  {g['card']}: MFU {mfu}, GPU peak {g['peak_memory_mb']:.0f} MB"
    print(f"   {PATH_NAMES[path]:<42} {res['tokens']:>7} tok  {res['seconds']:7.2f} s  "
          f"{res['tokens'] / res['seconds']:7.1f} tok/s  peak {out['ru_maxrss_mb']:6.0f} MB  "
          f"CPU util {util or 0:.2f}  load {out['load_average'][0] if out['load_average'] else '?'}{extra}", flush=True)


def baseline(args, work: Path) -> dict | None:
    """The baseline commit's files, for its CLI to run beside the peers; None with --baseline none."""
    if args.baseline.lower() == "none":
        return None
    try:
        root = baseline_checkout(args.baseline, work)
    except (RuntimeError, OSError) as e:
        print(f"baseline {args.baseline}: {e}; its targets are not measured", flush=True)
        return {"rev": args.baseline, "error": str(e)}
    return {"rev": args.baseline, "root": str(root)}


PEERS = {"lm_ce_cli": "lm_ce CLI", "baseline": "baseline CLI", "lm_eval": "lm-eval"}


def run_peer(spec: dict, work: Path, args, report: dict, failures: list[str]) -> dict:
    """Whole processes on the same texts, interleaved when repeated: the lm_ce CLI, the baseline commit's CLI
    and an lm-eval loglikelihood_rolling script (median wall and scoring time, largest peak memory)."""
    base = report["baseline"] if report["baseline"] and "root" in report["baseline"] else None
    print(f"   peer: {', '.join(PEERS[k] for k in PEERS if k != 'baseline' or base)}, whole processes ...", flush=True)
    if base:  # the baseline's own first-time work (its GGUF cache) off the clock
        run_cli(spec, work, args.timeout, root=Path(base["root"]), tag="baseline", limit=1)
    runs: dict[str, list[dict]] = {k: [] for k in PEERS if k != "baseline" or base}
    for r in range(args.repeat):
        tag = f".{r}" if args.repeat > 1 else ""
        runs["lm_ce_cli"].append(run_cli(spec, work, args.timeout, tag=f"cli{tag}"))
        if base:
            runs["baseline"].append(run_cli(spec, work, args.timeout, root=Path(base["root"]), tag=f"baseline{tag}"))
        le = run_child("lmeval", spec, work, f"{spec['case']}.lmeval{tag}", args.timeout)
        if le["ok"]:
            le.update({k: le["result"][k] for k in ("tokens", "nll_sum", "load_seconds")}, scoring_seconds=le["result"]["seconds"])
        runs["lm_eval"].append(le)
    peer = {k: summarize_peer(rs) for k, rs in runs.items()}
    for key, r in peer.items():
        if r["ok"]:
            print(f"   peer: {PEERS[key]:<12} wall {r['wall_seconds']:7.1f} s (scoring {r['scoring_seconds']:.1f} s)  "
                  f"peak {r['ru_maxrss_mb']:7.0f} MB  {r['tokens']} tok  load {r['load_average'][0]}", flush=True)
        else:
            failures.append(f"{spec['case']} peer {PEERS[key]}: {r['error']}")
    check_peer(spec["case"], peer, args.rtol, failures)
    return peer


if __name__ == "__main__":
    sys.exit(main())
