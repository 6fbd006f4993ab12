"""Tests are hermetic: with the session's environment (tests/conftest.py), a run of the command line writes nothing
under $HOME: no datasets Arrow copy, no sha256 memo or GGUF cache, no matplotlib font cache."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import corpus_rows, make_jsonl

ROOT = Path(__file__).resolve().parent.parent


def test_a_run_in_the_test_environment_writes_nothing_under_home(tiny_llama_dir, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    data = make_jsonl(tmp_path / "docs.jsonl", corpus_rows(12))
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "lm_ce.cli", "--model", tiny_llama_dir, "--data-files", data,
                           "--max-length", "24", "--no-progress", "--output-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "position_loss.png").is_file()  # matplotlib drew, with its caches elsewhere
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []
