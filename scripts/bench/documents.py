"""How cost grows with the number of documents: a tiny model scoring 10^3 .. 10^6 short documents.

A byte-level BPE of 512 tokens and a ~43k-parameter Llama keep the model call to about a millisecond, so what
is measured is what a run keeps and does per document: peak RSS, documents/s, the time of one save, the time
after scoring (summary and reports), and how long a resume from a cold page cache takes to reach its first
batch. Each size and variant runs in a fresh process (`benchmark.py --_child docs SPEC`); `root` can point at
another checkout (e.g. main) to compare with it. datasets' Arrow copy of each file is made first, in a process of its own (a
row of its own): its memory grows with the file and it is paid once per file, so the runs measure lm_ce.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

from .processes import Bench, run_child

VARIANTS = {  # name -> lm_ce fields
    "default": {},
    "save-tokens": {"save_tokens": True},
    "checkpoint-1s": {"checkpoint_seconds": 1},
}


def prepare_documents(work: Path, count: int) -> str:
    """A jsonl of `count` documents of 20-60 words drawn from the KJV's vocabulary (seeded, so reruns agree)."""
    path = work / f"documents-{count}.jsonl"
    if path.is_file():
        return str(path)
    from .prepare import kjv_rows

    words = sorted({w for row in kjv_rows() for w in row["text"].split()})
    rng = random.Random(0)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(count):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
            f.write(json.dumps({"text": text, "id": f"doc{i}"}) + "\n")
    os.replace(tmp, path)
    return str(path)


def tiny_model(work: Path) -> str:
    """A byte-level BPE of 512 tokens trained on the KJV, and a random Llama of about 43k parameters."""
    out = work / "documents-model"
    if (out / "config.json").is_file():
        return str(out)
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from .prepare import kjv_rows

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((row["text"] for row in kjv_rows()), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out)
    fast.save_pretrained(out)
    return str(out)


def run_documents_size(spec: dict, _mode: str) -> dict:
    """The child: one run of lm_ce (of the checkout at spec["root"]) on spec["data"], timed from inside."""
    if spec.get("root"):
        sys.path.insert(0, spec["root"])
    from lm_ce import runner
    from lm_ce.config.fields import Config
    from lm_ce.data import reading as data
    from lm_ce.reports import files as report
    from lm_ce.rundir import checkpoint
    from lm_ce.scoring.scorer import Scorer

    if spec.get("arrow_copy_only"):  # datasets' Arrow copy of the file, made once: every later run reads it
        t0 = time.perf_counter()
        rows = data.load_rows(Config(data_files=[spec["data"]]))
        files = getattr(rows, "files", None) or [f["filename"] for f in rows.cache_files]
        return {"documents": len(rows), "seconds": time.perf_counter() - t0, "files": files}

    saves: list[float] = []
    save = checkpoint.save

    def timed_save(*args, **kwargs):
        t0 = time.perf_counter()
        save(*args, **kwargs)
        saves.append(time.perf_counter() - t0)

    checkpoint.save = timed_save
    calls = {"n": 0, "first": None}
    score = Scorer.score

    def counted_score(self, batch, tally):
        calls["n"] += 1
        if calls["first"] is None:
            calls["first"] = time.time()
            calls["read_mb"] = disk_read_mb()
            calls["cached_mb"] = cached_mb(spec.get("evicted", []))
        if calls["n"] == spec.get("stop_after_batches"):
            os.kill(os.getpid(), signal.SIGINT)  # a stop, handled by the run: it saves and reports
        return score(self, batch, tally)

    Scorer.score = counted_score
    cfg = Config(model=spec["model_dir"], data_files=[spec["data"]], id_field="id", max_length=256, batch_size=16,
                 threads=1, output_dir=spec["output_dir"], progress=False, plot=False, **spec["fields"])
    events: dict[str, float] = {}
    # as the command line runs it (its Ctrl-C stops and saves); an older checkout (spec["root"]) always did that
    owner = {"owns_process": True} if "owns_process" in inspect.signature(runner.evaluate).parameters else {}
    results = runner.evaluate(cfg, on_event=lambda name: events.setdefault(name, time.perf_counter()), **owner)
    report.write(results, spec["output_dir"], plot=False)
    done = time.perf_counter()
    s = results.summary
    return {"documents": s["counts"]["documents"], "tokens": s["counts"]["tokens"], "complete": s["complete"],
            "scoring_seconds": s["timing"]["seconds"], "after_scoring_seconds": done - events["scored"],
            "batches": calls["n"], "saves": len(saves), "save_seconds_max": max(saves, default=None),
            "save_seconds_total": sum(saves), "first_batch_after_start": (calls["first"] - spec["spawned_at"])
            if calls["first"] else None, "disk_read_mb_before_first_batch": calls.get("read_mb"),
            "evicted_files_read_mb_before_first_batch": calls.get("cached_mb"), "nll_sum": s["nll_sum"],
            "state_bytes": state_bytes(Path(spec["output_dir"]))}


def state_bytes(directory: Path) -> int:
    """The saved state's size: state.json and its records' file (state.pt of the versions before them)."""
    return sum(p.stat().st_size for p in [directory / "state.pt", directory / "state.json",
                                          *directory.glob("state-*.safetensors")] if p.is_file())


def disk_read_mb() -> float | None:
    """MB this process has read from the storage device so far (page-cache hits not counted; Linux only): what
    a start-up costs on a cold, slow disk, whatever this machine's disk speed."""
    try:
        counters = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    except (OSError, ValueError):
        return None
    return int(counters["read_bytes"]) / 2**20


def run_documents_scaling(settings: dict, bench: Bench, *, top: int, root: str | None = None,
                          variants: tuple[str, ...] = tuple(VARIANTS), resume: bool = True) -> dict:
    """Each size from 10^3 to `top` with the default settings; --save-tokens up to 10^5, --checkpoint-seconds 1 at
    min(top, 10^5); a stopped and resumed run at `top`. The rows of the documents-scaling table."""
    import shutil

    work, timeout, failures = bench.work, bench.timeout, bench.failures
    model_dir = tiny_model(work)
    sizes = [10**k for k in range(3, 7) if 10**k <= top]
    plan = [(n, "default") for n in sizes]
    plan += [(n, "save-tokens") for n in sizes if n <= 10**5 and "save-tokens" in variants]
    plan += [(min(top, 10**5), "checkpoint-1s")] if "checkpoint-1s" in variants else []
    rows = []
    for n, variant in plan:
        tag = f"documents-{n}-{variant}" + ("-" + Path(root).name if root else "")
        out_dir = work / tag
        shutil.rmtree(out_dir, ignore_errors=True)
        spec = {**settings, "data": prepare_documents(work, n), "model_dir": model_dir, "output_dir": str(out_dir),
                "fields": VARIANTS[variant], "root": root, "spawned_at": time.time()}
        if variant == "default" and not root:
            copy = arrow_copy(spec, bench, n)
            rows += copy
            spec["arrow_files"] = copy[0]["arrow_files"] if copy else []
        out = run_child("docs", spec, work, tag, timeout)
        if not out["ok"]:
            failures.append(f"documents {n} {variant}: {out['error']}")
            continue
        row = {"documents": n, "variant": variant, "peak_rss_mb": out["ru_maxrss_mb"], **out["result"]}
        row["documents_per_second"] = n / row["scoring_seconds"]
        rows.append(row)
        print(f"   documents {n:>8} {variant:<14}: {row['documents_per_second']:7.0f} docs/s  peak {row['peak_rss_mb']:6.0f} MB"
              f"  save max {row['save_seconds_max'] or 0:.3f} s  after scoring {row['after_scoring_seconds']:.2f} s",
              flush=True)
        if resume and n == top and variant == "default":
            rows += resumed_run(spec, row, bench, tag)
    return {"rows": rows, "root": root}


def arrow_copy(spec: dict, bench: Bench, n: int) -> list[dict]:
    """datasets' Arrow copy of the data file, made in a child of its own before the runs: its cost grows with the
    file (datasets' JSON conversion), is paid once per file, and is not lm_ce's; the runs then find the copy."""
    out = run_child("docs", {**spec, "arrow_copy_only": True}, bench.work, f"documents-{n}-arrow-copy", bench.timeout)
    if not out["ok"]:
        bench.failures.append(f"documents {n} arrow copy: {out['error']}")
        return []
    print(f"   documents {n:>8} arrow copy    : {out['result']['seconds']:.1f} s  peak {out['ru_maxrss_mb']:6.0f} MB "
          "(datasets' JSON to Arrow, once per file)", flush=True)
    return [{"documents": n, "variant": "arrow-copy", "peak_rss_mb": out["ru_maxrss_mb"], "saves": 0, "state_bytes": 0,
             "save_seconds_max": None, "after_scoring_seconds": 0.0, "documents_per_second": None,
             "arrow_copy_seconds": out["result"]["seconds"], "arrow_files": out["result"]["files"]}]


def resumed_run(spec: dict, whole: dict, bench: Bench, tag: str) -> list[dict]:
    """Stop a run at 90% of its batches, then resume it: the time from the resume's start to its first batch, with
    the data, its Arrow copy and the output directory dropped from the page cache first (a cold start)."""
    import shutil

    shutil.rmtree(spec["output_dir"], ignore_errors=True)
    stopped = run_child("docs", {**spec, "stop_after_batches": int(0.9 * whole["batches"]), "spawned_at": time.time()},
                        bench.work, tag + "-stop", bench.timeout)
    if not stopped["ok"]:
        bench.failures.append(f"documents {whole['documents']} stop: {stopped['error']}")
        return []
    files = [spec["data"], *spec.get("arrow_files", []), *map(str, Path(spec["output_dir"]).iterdir())]
    evicted = evict_from_page_cache(files)
    resumed = run_child("docs", {**spec, "fields": {**spec["fields"], "resume": True}, "spawned_at": time.time(),
                                 "evicted": files},
                        bench.work, tag + "-resume", bench.timeout)
    if not resumed["ok"]:
        bench.failures.append(f"documents {whole['documents']} resume: {resumed['error']}")
        return []
    r = {**resumed["result"], "evicted_from_page_cache_mb": evicted}
    print(f"   documents {whole['documents']:>8} resume: first batch {r['first_batch_after_start']:.1f} s after start, "
          f"{r['disk_read_mb_before_first_batch'] or 0:.0f} MB read from disk before it "
          f"({r['evicted_files_read_mb_before_first_batch'] or 0:.0f} MB of the data, its copy and the output), "
          f"same NLL sum: {r['nll_sum'] == whole['nll_sum']}", flush=True)
    return [{"documents": whole["documents"], "variant": "resume", "peak_rss_mb": resumed["ru_maxrss_mb"], **r,
             "documents_per_second": None, "same_nll_sum": r["nll_sum"] == whole["nll_sum"]}]


def cached_mb(paths: list[str]) -> float | None:
    """MB of these files in the page cache (util-linux's fincore): after they were evicted, what was read of them."""
    import shutil
    import subprocess

    if not paths or not shutil.which("fincore"):
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *paths], capture_output=True, text=True)
    return sum(int(v) for v in out.stdout.split()) / 2**20 if out.returncode == 0 else None


def evict_from_page_cache(paths: list) -> float | None:
    """Drop these files' pages from the page cache (posix_fadvise DONTNEED; Linux), so that the next process reads
    them from disk as after a reboot or on a busy machine: MB that were cached, None where it cannot be done."""
    if not hasattr(os, "posix_fadvise"):
        return None
    os.sync()
    total = 0
    for path in paths:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                total += os.fstat(fd).st_size
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return total / 2**20


def documents_table(scaling: dict) -> list[str]:
    rows = scaling.get("rows") or []
    if not rows:
        return []
    lines = ["Documents scaling (byte-level BPE of 512 tokens, ~43k-parameter Llama, 20-60 words a document, one thread):",
             "", "| documents | variant | docs/s | peak RSS MB | one save max s | saves | state KB | after scoring s "
             "| first batch after start s | disk read before it MB (of the evicted files) |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        dps = f"{r['documents_per_second']:.0f}" if r.get("documents_per_second") else "-"
        first = f"{r['first_batch_after_start']:.1f}" if r.get("first_batch_after_start") else "-"
        read, evicted = r.get("disk_read_mb_before_first_batch"), r.get("evicted_files_read_mb_before_first_batch")
        read = "-" if read is None else f"{read:.0f}" + ("" if evicted is None else f" ({evicted:.0f})")
        lines.append(f"| {r['documents']} | {r['variant']} | {dps} | {r['peak_rss_mb']:.0f} | "
                     f"{r['save_seconds_max'] or 0:.3f} | {r['saves']} | {r['state_bytes'] / 1024:.0f} | "
                     f"{r['after_scoring_seconds']:.2f} | {first} | {read} |")
    return lines


def plot_documents(scaling: dict, path: Path) -> str | None:
    """Peak RSS and documents/s against the number of documents, one line per variant."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    rows = [r for r in scaling.get("rows", []) if r["variant"] not in ("resume", "arrow-copy")]
    if not rows:
        return None
    fig = Figure(figsize=(10, 4))  # no pyplot: the backend and pyplot's figures stay as they were
    mem, speed = fig.subplots(1, 2)
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["documents"])
        x = [r["documents"] for r in mine]
        mem.plot(x, [r["peak_rss_mb"] for r in mine], "o-", label=variant)
        speed.plot(x, [r["documents_per_second"] for r in mine], "o-", label=variant)
    for ax, label in ((mem, "peak RSS (MB)"), (speed, "documents/s")):
        ax.set_xscale("log")
        ax.set_xlabel("documents")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.suptitle("lm_ce on 20-60-word documents (tiny model, one thread)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return str(path)
