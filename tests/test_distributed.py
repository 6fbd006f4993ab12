"""Several processes give the same numbers as one: real `torch.distributed.run` launches (gloo on CPU).

Each case runs the CLI twice on the same config: once in this process (1 process) and once as
`python -m torch.distributed.run --standalone --nproc_per_node 2 scripts/evaluate.py ...`. Every
process plans all batches and scores its share, and every document's float64 sum is added up in
target order whichever process scored a window; when a chunk has few windows for the processes, its
batches are made smaller so that none is idle, which changes batch composition and so float
rounding (the token counts stay exact). Both
runs use the same number of threads (the 2-process run its default, cores // 2; the 1-process
run is told that number) so that the kernels, and their rounding, are the same.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm_ce.cli.main import main
from lm_ce.scoring import parallel
from lm_ce.sums.records import DocSums, Tally, WindowSums

from .conftest import make_jsonl

ROOT = Path(__file__).resolve().parent.parent
NPROC = 2
TIMEOUT = 240  # seconds: a hang (a collective one process never reaches) fails instead of blocking the suite


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


THREADS = max(1, _cores() // NPROC)  # what the runner gives each of NPROC processes on this machine


def _env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def run_distributed(args: list[str], out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(NPROC),
           str(ROOT / "scripts" / "evaluate.py"), *args, "--output-dir", str(out), "--no-progress"]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{NPROC} processes did not finish in {TIMEOUT} s (a hang?): {e.stderr!r}")
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


def run_single(args: list[str], out: Path, capsys) -> str:
    previous = torch.get_num_threads()
    try:
        code = main([*args, "--output-dir", str(out), "--no-progress", "--threads", str(THREADS)])
    finally:
        torch.set_num_threads(previous)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def read(out: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((out / "results.json").read_text())
    docs = out / "documents.jsonl"
    rows = [json.loads(line) for line in docs.read_text().splitlines()] if docs.exists() else []
    return summary, rows


def compare(args: list[str], tmp_path: Path, capsys) -> tuple[dict, dict, subprocess.CompletedProcess]:
    """(1-process results.json, NPROC-process results.json, the launch): equal sums, counts and documents."""
    run_single(args, tmp_path / "one", capsys)
    launch = run_distributed(args, tmp_path / "many")
    one, one_docs = read(tmp_path / "one")
    many, many_docs = read(tmp_path / "many")

    for key in ("tokens", "windows", "documents", "skipped_documents", "bytes", "words", "input_tokens"):
        assert many["counts"][key] == one["counts"][key], key
    # Float rounding only: with few windows per process the batches are made smaller (none idle), which
    # changes batch composition; otherwise the sums are bit-identical (see the module docstring).
    assert many["nll_sum"] == pytest.approx(one["nll_sum"], rel=1e-6)
    assert many["metrics"] == pytest.approx(one["metrics"], rel=1e-6)
    assert [(d["index"], d["id"], d["tokens"], d["windows"], d["skipped"]) for d in many_docs] == [
        (d["index"], d["id"], d["tokens"], d["windows"], d["skipped"]) for d in one_docs
    ]
    assert [d["nll_sum"] for d in many_docs] == pytest.approx([d["nll_sum"] for d in one_docs], rel=1e-6, abs=1e-6)

    env = many["environment"]
    assert env["processes"] == NPROC and one["environment"]["processes"] == 1
    assert env["threads_per_process"] == THREADS
    per_process = many["counts"]["tokens_per_process"]
    assert len(per_process) == NPROC and sum(per_process) == many["counts"]["tokens"]
    assert one["counts"]["tokens_per_process"] == [one["counts"]["tokens"]]

    # Only the main process prints the table and writes the files.
    assert launch.stdout.count("NLL sum (nats)") == 1, launch.stdout
    assert launch.stdout.count("wrote ") == 1, launch.stdout
    assert "Traceback" not in launch.stderr, launch.stderr
    assert not [p.name for p in (tmp_path / "many").iterdir() if ".tmp" in p.name]
    return one, many, launch


@pytest.fixture
def texts_file(tmp_path, texts) -> str:
    """The shared documents (empty, tiny, non-English, ~100 to ~2000 tokens) plus a row with no text."""
    rows = [{"text": t, "id": f"d{i}"} for i, t in enumerate(texts)] + [{"text": None, "id": "none"}]
    return make_jsonl(tmp_path / "texts.jsonl", rows)


@pytest.mark.slow  # a real 2-process launch: ~10 s unloaded, ~20 s on a busy 2-core machine
def test_uneven_windows(tiny_llama_dir, texts_file, tmp_path, capsys):
    """(a) Windows and batches that do not divide evenly: one process takes an empty step at the end."""
    rows = [json.loads(line) for line in Path(texts_file).read_text().splitlines()] + [{"text": "Hello world.", "id": "x"}]
    data = make_jsonl(tmp_path / "uneven.jsonl", rows)
    args = ["--model", tiny_llama_dir, "--data-files", data, "--id-field", "id", "--max-length", "32",
            "--batch-size", "4"]  # 107 windows in 27 batches
    one, many, _ = compare(args, tmp_path, capsys)
    assert one["counts"]["windows"] % NPROC == 1
    assert one["counts"]["skipped_documents"] == 3  # "" and "   \n" (empty documents) and the row with no text
    assert all(n > 0 for n in many["counts"]["tokens_per_process"])


@pytest.mark.slow  # a real 2-process launch: ~10 s unloaded, ~20 s on a busy 2-core machine
def test_one_long_document_is_shared(tiny_gpt2_dir, texts, tmp_path, capsys):
    """(b) One document far longer than the rest: its windows are spread, the processes' work balanced."""
    rows = [{"text": texts[-1]}] + [{"text": t} for t in texts[3:8]]  # ~2000 tokens, then short ones
    data = make_jsonl(tmp_path / "long.jsonl", rows)
    batch, length = 4, 64
    args = ["--model", tiny_gpt2_dir, "--data-files", data, "--max-length", str(length), "--batch-size", str(batch)]
    one, many, _ = compare(args, tmp_path, capsys)
    per_process = many["counts"]["tokens_per_process"]
    assert max(per_process) - min(per_process) <= batch * length  # at most one batch apart
    assert min(per_process) >= 0.4 * many["counts"]["tokens"]


@pytest.mark.slow  # a real 2-process launch: ~10 s unloaded, ~20 s on a busy 2-core machine
def test_fewer_windows_than_processes(tiny_llama_dir, tmp_path, capsys):
    """(c) One short document, one window, two processes: the idle one takes empty steps, nothing hangs."""
    data = make_jsonl(tmp_path / "one.jsonl", [{"text": "Hello world."}])
    one, many, _ = compare(["--model", tiny_llama_dir, "--data-files", data], tmp_path, capsys)
    assert one["counts"]["windows"] == 1 and one["counts"]["documents"] == 1
    assert sorted(many["counts"]["tokens_per_process"]) == [0, one["counts"]["tokens"]]


@pytest.mark.slow  # a real 2-process launch: ~10 s unloaded, ~20 s on a busy 2-core machine
def test_stream_mode(tiny_gpt2_dir, texts_file, tmp_path, capsys):
    """(d) Stream mode: one joined sequence, its windows spread over the processes."""
    args = ["--model", tiny_gpt2_dir, "--data-files", texts_file, "--mode", "stream", "--max-length", "64",
            "--stride", "32", "--batch-size", "4"]
    one, many, _ = compare(args, tmp_path, capsys)
    assert one["counts"]["windows"] > NPROC
    assert all(n > 0 for n in many["counts"]["tokens_per_process"])


@pytest.mark.slow  # a real 2-process launch: ~10 s unloaded, ~20 s on a busy 2-core machine
def test_many_chunks(tiny_llama_dir, texts_file, tmp_path, capsys):
    """(e) --chunk-documents 2: several chunks, each tokenized in shares and gathered; work stays balanced."""
    args = ["--model", tiny_llama_dir, "--data-files", texts_file, "--id-field", "id", "--max-length", "64",
            "--batch-size", "2", "--chunk-documents", "2"]
    one, many, _ = compare(args, tmp_path, capsys)
    per_process = many["counts"]["tokens_per_process"]
    assert max(per_process) - min(per_process) <= 2 * 64


def test_sums_do_not_depend_on_which_process_scored_a_window():
    """Per-process sums merged in rank order round differently from one process's sums; the runner
    adds each document's window sums in target order instead, whatever the process count."""
    windows = [WindowSums(0, 0, 2.0**53, 1), WindowSums(0, 1, 1.0, 1), WindowSums(0, 2, 1.0, 1),
               WindowSums(0, 3, -(2.0**53), 1)]

    def tally(ws):
        t = Tally()
        for w in ws:
            t.doc(w.doc).add(DocSums(w.nll, w.tokens))
        t.windows = list(ws)
        return t

    single = tally(windows)
    merged = tally([])
    for part in (tally(windows[1::2]), tally(windows[0::2])):  # two processes, merged in rank order
        merged.merge(part)
    assert merged.docs[0].nll != single.docs[0].nll  # the rounding the runner must not depend on
    parallel.canonical_sums(single)
    parallel.canonical_sums(merged)
    assert merged.docs[0] == single.docs[0]
    assert merged.windows == single.windows


def test_heaviest_share_goes_to_the_least_loaded_process():
    class W:
        def __init__(self, n):
            self.n_scored = n

    shares = [[[W(5), W(5)]], [[W(3)], None]]
    assert [parallel.share_of(r, shares, []) for r in (0, 1)] == [0, 1]
    assert [parallel.share_of(r, shares, [100, 10]) for r in (0, 1)] == [1, 0]
    assert [parallel.share_of(r, shares, [7]) for r in (0, 1)] == [0, 1]  # another world size: start afresh


@pytest.mark.slow  # two real 2-process launches
@pytest.mark.parametrize("protocol_args", [["--protocol", "llama-cpp", "--max-length", "16"],
                                           ["--protocol", "hf-docs", "--max-length", "32", "--bos-policy", "every-window"]])
def test_protocols_joined_text(tiny_llama_dir, texts_file, tmp_path, capsys, protocol_args):
    """(f) The joined-text protocols (llama-cpp chunks with their second halves; every-window BOS in stream windows)."""
    args = ["--model", tiny_llama_dir, "--data-files", texts_file, "--batch-size", "4", *protocol_args]
    one, many, _ = compare(args, tmp_path, capsys)
    assert many["settings"]["protocol"] == one["settings"]["protocol"] == protocol_args[1]
    assert all(n > 0 for n in many["counts"]["tokens_per_process"])
