"""Interrupted runs lose nothing: a stopped run saves its exact progress and --resume finishes it
with the same result as an uninterrupted run; a resume of a different run is refused."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lm_ce.cli import main as cli
from lm_ce.config.fields import Config
from lm_ce.runner import evaluate
from lm_ce.scoring.scorer import Scorer

from .conftest import SENTENCES, make_jsonl

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rows = [{"text": " ".join(SENTENCES[(i * 7 + k) % len(SENTENCES)] for k in range(1 + i % 9)), "id": f"d{i}"}
            for i in range(60)]
    return make_jsonl(tmp_path_factory.mktemp("resume") / "docs.jsonl", rows)


def settings(model_dir: str, data: str, out: Path) -> Config:
    return Config(model=model_dir, data_files=[data], id_field="id", max_length=24, stride=12, batch_size=2,
                  chunk_documents=16, output_dir=str(out), progress=False)


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama_dir, corpus, tmp_path_factory):
    return evaluate(settings(tiny_llama_dir, corpus, tmp_path_factory.mktemp("whole")))


def same_result(a: dict, b: dict) -> None:
    assert a["counts"]["tokens"] == b["counts"]["tokens"]
    assert a["counts"]["documents"] == b["counts"]["documents"]
    assert a["counts"]["windows"] == b["counts"]["windows"]
    assert a["counts"]["bytes"] == b["counts"]["bytes"]
    assert math.isclose(a["nll_sum"], b["nll_sum"], rel_tol=1e-9)
    assert math.isclose(a["uncertainty"]["mean_loss_stderr"], b["uncertainty"]["mean_loss_stderr"], rel_tol=1e-6)


@pytest.mark.parametrize("stop_after", [3, 40, 90])  # inside the first chunk, in a later one, near the end
def test_stop_and_resume_equals_uninterrupted(tiny_llama_dir, corpus, tmp_path, uninterrupted, monkeypatch, stop_after):
    calls = {"n": 0}
    score = Scorer.score

    def score_then_signal(self, batch, tally):
        calls["n"] += 1
        if calls["n"] == stop_after:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does: handled by the run, which saves and stops
        return score(self, batch, tally)

    monkeypatch.setattr(Scorer, "score", score_then_signal)
    cfg = settings(tiny_llama_dir, corpus, tmp_path)
    first = evaluate(cfg, owns_process=True)  # as the command line runs it: Ctrl-C stops and saves
    assert first.summary["complete"] is False
    assert (tmp_path / "state.json").is_file()
    assert first.summary["counts"]["tokens"] < uninterrupted.summary["counts"]["tokens"]
    monkeypatch.setattr(Scorer, "score", score)
    resumed = evaluate(Config(**{**cfg.__dict__, "resume": True}))
    assert resumed.summary["complete"] is True
    same_result(resumed.summary, uninterrupted.summary)
    assert [(d.id, d.tokens) for d in resumed.documents] == [(d.id, d.tokens) for d in uninterrupted.documents]
    for a, b in zip(resumed.documents, uninterrupted.documents):
        assert math.isclose(a.nll_sum, b.nll_sum, rel_tol=1e-9, abs_tol=1e-9)


def test_resume_refuses_a_different_run(tiny_llama_dir, corpus, tmp_path, capsys):
    args = ["--model", tiny_llama_dir, "--data-files", corpus, "--max-length", "24", "--output-dir", str(tmp_path),
            "--no-progress", "--limit", "5"]
    assert cli.main(args) == 0
    assert cli.main(args + ["--resume", "--stride", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "changed: stride" in err[0]
    assert cli.main(args + ["--resume"]) == 0  # the same run: reported again from its saved state


def test_resume_knows_a_local_model_by_its_resolved_path(tiny_llama_dir, corpus, tmp_path, monkeypatch):
    """./tiny/ and /abs/path/tiny are one model: a resume with the other spelling is the same run."""
    out = tmp_path / "run"
    monkeypatch.chdir(Path(tiny_llama_dir).parent)
    relative = f"./{Path(tiny_llama_dir).name}/"
    args = ["--data-files", corpus, "--max-length", "24", "--output-dir", str(out), "--no-progress", "--limit", "5"]
    assert cli.main(["--model", relative, *args]) == 0
    assert cli.main(["--model", str(Path(tiny_llama_dir).resolve()), *args, "--resume"]) == 0


def test_sigterm_on_a_real_process_then_resume(tiny_llama_dir, corpus, tmp_path, uninterrupted):
    """A real run in its own process, signalled midway, resumed by a second process."""
    big = make_jsonl(tmp_path / "big.jsonl", [json.loads(line) for line in Path(corpus).read_text().splitlines()] * 8)
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", tiny_llama_dir, "--data-files", big,
            "--max-length", "24", "--stride", "12", "--batch-size", "1", "--chunk-documents", "16",
            "--output-dir", str(out), "--no-progress", "--checkpoint-seconds", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "state.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # the first periodic save: the run is scoring
    assert proc.poll() is None, "the run finished before it could be signalled; give it more data"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    partial = json.loads((out / "results.json").read_text())
    assert partial["complete"] is False
    done = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    final = json.loads((out / "results.json").read_text())
    whole = evaluate(Config(model=tiny_llama_dir, data_files=[big], max_length=24, stride=12, batch_size=1,
                            chunk_documents=16, progress=False))
    assert final["complete"] is True
    same_result(final, whole.summary)


def test_kill_before_the_first_periodic_save_then_resume(tiny_llama_dir, corpus, tmp_path):
    """Rows are appended to documents.jsonl as chunks finish, long before the first periodic save: a run killed
    then still holds lm_ce's marker (the state saved at its start), so it resumes instead of being refused."""
    big = make_jsonl(tmp_path / "big.jsonl", [json.loads(line) for line in Path(corpus).read_text().splitlines()] * 8)
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", tiny_llama_dir, "--data-files", big,
            "--max-length", "24", "--stride", "12", "--batch-size", "1", "--chunk-documents", "16",
            "--output-dir", str(out), "--no-progress"]  # the default 300 s between saves: none before the kill
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rows = out / "documents.jsonl"
    deadline = time.monotonic() + 120
    while not (rows.exists() and rows.stat().st_size) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the first chunk's rows are on disk
    assert proc.poll() is None, "the run finished before it could be killed; give it more data"
    proc.kill()
    proc.communicate(timeout=60)
    done = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    final = json.loads((out / "results.json").read_text())
    whole = evaluate(Config(model=tiny_llama_dir, data_files=[big], max_length=24, stride=12, batch_size=1,
                            chunk_documents=16, progress=False))
    assert final["complete"] is True
    same_result(final, whole.summary)
    assert len(rows.read_text().splitlines()) == whole.summary["counts"]["documents"]
