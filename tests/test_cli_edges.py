"""The command line's edges a new user meets first: --version, output cut off by a pipe, and a run that fails
before writing anything (no empty output directory left behind)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lm_ce
from lm_ce.cli import main as cli

from .conftest import SENTENCES, make_jsonl

ROOT = Path(__file__).resolve().parent.parent


def test_version_prints_the_package_version(capsys):
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == f"lm_ce {lm_ce.__version__}" and not out.err


def test_help_into_a_closed_pipe_ends_without_a_traceback():
    """`lm-ce --help | head`: the reader is gone before the help is written (a pipe whose read end is closed)."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "lm_ce.cli", "--help"], stdout=write, stderr=subprocess.PIPE,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 141, done.stderr.decode()
    assert b"Traceback" not in done.stderr and b"BrokenPipe" not in done.stderr, done.stderr.decode()


def test_a_run_whose_model_is_missing_leaves_no_directory(tmp_path, capsys):
    data = make_jsonl(tmp_path / "docs.jsonl", [{"text": s} for s in SENTENCES[:2]])
    out = tmp_path / "runs" / "first"
    code = cli.main(["--model", str(tmp_path / "no_such_model"), "--data-files", data, "--no-progress",
                     "--output-dir", str(out)])
    assert code == 2 and "no_such_model" in capsys.readouterr().err
    assert not out.exists() and not out.parent.exists()  # both created by the claim, both removed


def test_a_failed_run_keeps_a_directory_that_was_there(tmp_path, capsys):
    data = make_jsonl(tmp_path / "docs.jsonl", [{"text": s} for s in SENTENCES[:2]])
    out = tmp_path / "mine"
    out.mkdir()
    assert cli.main(["--model", str(tmp_path / "no_such_model"), "--data-files", data, "--no-progress",
                     "--output-dir", str(out)]) == 2
    assert out.is_dir() and not list(out.iterdir())
