"""The multiple-choice case: lm_ce's --task multiple-choice against lm-evaluation-harness's own command line on the
same items, model and threads, each a whole process, alternated; both sides' log-likelihoods and accuracies compared.

Items: HellaSwag-like cloze items built from the King James Bible (the embedded data): a verse's first half as the
context, its second half and the second halves of three other verses as the choices. Standard library only.
"""
from __future__ import annotations

import glob
import json
import random
import shutil
import sys
from pathlib import Path

from .processes import ROOT, Bench, child_env, run_child, spawn

TASK = """task: lm_ce_bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def make_items(kjv: str, n: int, path: Path, seed: int = 0, before: int = 0) -> int:
    """n cloze items from verses of 12 to 40 words: context the `before` verses preceding it and its first half,
    choices the true second half and three others (the correct one at a random place). Returns the number written."""
    with open(kjv, encoding="utf-8") as f:
        verses = [json.loads(line) for line in f if line.strip()]
    rng = random.Random(seed)
    pool = [i for i, v in enumerate(verses) if 12 <= len(v["text"].split()) <= 40 and i >= before]
    picked = rng.sample(pool, n)
    halves = [verses[i]["text"].split() for i in rng.sample(pool, 3 * n)]
    rows = []
    for k, i in enumerate(picked):
        words = verses[i]["text"].split()
        cut = len(words) // 2
        others = [" ".join(h[len(h) // 2:]) for h in halves[3 * k : 3 * k + 3]]
        label = rng.randrange(4)
        choices = others[:label] + [" ".join(words[cut:])] + others[label:]
        context = " ".join([*(verses[j]["text"] for j in range(i - before, i)), *words[:cut]])
        rows.append({"id": verses[i]["citation"], "context": context, "choices": choices, "label": label})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def run_lm_ce(model_dir: str, data: Path, out: Path, threads: int, bench: Bench, tag: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", model_dir, "--dtype", "float32",
           "--task", "multiple-choice", "--data-files", str(data), "--id-field", "id", "--threads", str(threads),
           "--no-progress", "--output-dir", str(out)]
    run = spawn(cmd, child_env(threads), bench.work / "logs" / f"{tag}.log", bench.timeout)
    if run["rc"] == 0:
        s = json.loads((out / "results.json").read_text())
        run.update(acc=s["multiple_choice"]["acc"], acc_norm=s["multiple_choice"]["acc_norm"],
                   own_seconds=s["timing"]["seconds"], scoring=s["multiple_choice"]["scoring"],
                   lls=[json.loads(x)["choice_loglikelihoods"] for x in (out / "documents.jsonl").read_text().splitlines()])
    return run


def run_lm_eval(model_dir: str, tasks: Path, out: Path, threads: int, batch: int, bench: Bench, tag: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
           f"pretrained={model_dir},dtype=float32", "--tasks", "lm_ce_bench_mc", "--include_path", str(tasks),
           "--device", "cpu", "--batch_size", str(batch), "--log_samples", "--output_path", str(out)]
    run = spawn(cmd, child_env(threads), bench.work / "logs" / f"{tag}.log", bench.timeout)
    results = sorted(glob.glob(str(out / "*" / "results_*.json")))
    samples = sorted(glob.glob(str(out / "*" / "samples_lm_ce_bench_mc_*.jsonl")))
    if run["rc"] == 0 and results and samples:
        r = json.loads(Path(results[-1]).read_text())
        lines = sorted((json.loads(x) for x in Path(samples[-1]).read_text().splitlines()), key=lambda s: s["doc_id"])
        run.update(acc=r["results"]["lm_ce_bench_mc"]["acc,none"], acc_norm=r["results"]["lm_ce_bench_mc"]["acc_norm,none"],
                   own_seconds=float(r.get("total_evaluation_time_seconds", "nan")),
                   lls=[[float(x[0][0]) for x in s["resps"]] for s in lines])
    else:
        run["rc"] = run["rc"] or 1
    return run


def run_choices(threads: int, items: int, repeat: int, batches: tuple[int, ...], bench: Bench, before: int = 0) -> dict:
    """The case: prepare the model, write the items (contexts with `before` preceding verses) and lm-eval's task,
    run each side `repeat` times, alternated."""
    from .spec import KJV

    spec = {"model": "smollm2", "docs": "psalms", "tokens": 200, "max_length": 1024, "threads": threads,
            "dtype": "float32", "data": str(bench.work / "mc.prepare.jsonl"),
            "warmup_data": str(bench.work / "mc.prepare.warmup.jsonl")}
    meta = run_child("prepare", spec, bench.work, "mc.prepare", bench.timeout)
    if not meta["ok"]:
        bench.failures.append(f"multiple-choice: preparation failed ({meta['error']})")
        return {}
    model_dir = meta["result"]["model_dir"]
    data, tasks = bench.work / "mc_items.jsonl", bench.work / "mc_tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    kjv = _resolve(KJV)
    count = make_items(kjv, items, data, before=before)
    (tasks / "lm_ce_bench_mc.yaml").write_text(TASK.format(data=data))
    runs: dict[str, list[dict]] = {"lm_ce": [], **{f"lm-eval bs{b}": [] for b in batches}}
    for r in range(repeat):
        print(f"   round {r + 1}/{repeat}: lm_ce", flush=True)
        runs["lm_ce"].append(run_lm_ce(model_dir, data, bench.work / "mc.lm_ce", threads, bench, f"mc.lm_ce.{r}"))
        for b in batches:
            print(f"   round {r + 1}/{repeat}: lm-eval --batch_size {b}", flush=True)
            runs[f"lm-eval bs{b}"].append(run_lm_eval(model_dir, tasks, bench.work / f"mc.lm_eval{b}", threads, b, bench,
                                                      f"mc.lm_eval{b}.{r}"))
    for name, rs in runs.items():
        for x in rs:
            if x["rc"] != 0:
                bench.failures.append(f"multiple-choice {name}: exit code {x['rc']}; see {x['log']}")
    return {"items": count, "choices": 4 * count, "context_verses": before, "threads": threads, "model_dir": model_dir, "runs": runs,
            "summary": summarize(runs)}


def _resolve(spec: str) -> str:
    sys.path.insert(0, str(ROOT))
    from lm_ce.config.fields import resolve_path

    return resolve_path(spec)


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Per side the median wall, CPU and own seconds; lm-eval over lm_ce; agreement of accuracies and log-likelihoods."""
    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if xs else None

    out = {}
    ours = [x for x in runs["lm_ce"] if x["rc"] == 0]
    for name, rs in runs.items():
        ok = [x for x in rs if x["rc"] == 0]
        if not ok:
            continue
        out[name] = {"wall_seconds": median([x["wall_seconds"] for x in ok]),
                     "cpu_seconds": median([x["user_seconds"] + x["system_seconds"] for x in ok]),
                     "own_seconds": median([x["own_seconds"] for x in ok]), "acc": ok[0]["acc"],
                     "acc_norm": ok[0]["acc_norm"], "load_average": [x["load_average"] for x in ok]}
        if name != "lm_ce" and ours:
            a, b = ours[0]["lls"], ok[0]["lls"]
            rel = max(abs(x - y) / abs(y) for u, v in zip(a, b) for x, y in zip(u, v))
            mine = out["lm_ce"]
            out[name].update(
                wall_ratio=out[name]["wall_seconds"] / mine["wall_seconds"],
                cpu_ratio=out[name]["cpu_seconds"] / mine["cpu_seconds"],
                own_ratio=out[name]["own_seconds"] / mine["own_seconds"],
                max_rel_loglikelihood_diff=rel,
                same_acc=(out[name]["acc"], out[name]["acc_norm"]) == (mine["acc"], mine["acc_norm"]))
    return out


def choices_table(report: dict) -> list[str]:
    """The case's lines for the benchmark page."""
    s = report.get("summary", {})
    if "lm_ce" not in s:
        return ["multiple choice: no result"]
    lines = [f"Multiple choice: {report['items']} items x 4 choices, SmolLM2-135M float32, {report['threads']} thread(s), "
             f"each side a whole process (median of {len(report['runs']['lm_ce'])})", "",
             "| | wall s | CPU s | own s | acc | acc_norm | lm-eval / lm_ce (wall, CPU, own) | max rel diff of log-likelihoods |",
             "|---|---|---|---|---|---|---|---|"]
    for name, x in s.items():
        ratio = (f"{x['wall_ratio']:.2f}x, {x['cpu_ratio']:.2f}x, {x['own_ratio']:.2f}x" if "wall_ratio" in x else "-")
        diff = f"{x['max_rel_loglikelihood_diff']:.2g}" if "max_rel_loglikelihood_diff" in x else "-"
        lines.append(f"| {name} | {x['wall_seconds']:.1f} | {x['cpu_seconds']:.1f} | {x['own_seconds']:.1f} | "
                     f"{x['acc']:.4f} | {x['acc_norm']:.4f} | {ratio} | {diff} |")
    return lines
