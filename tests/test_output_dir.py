"""An output directory belongs to one run: a finished or interrupted run is never replaced without
--overwrite, two live runs never share a directory, an unusable directory is refused before the model
loads, and the console names exactly the files this run wrote."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lm_ce.cli import main as cli
from lm_ce.config.fields import Config
from lm_ce.model import load as model_lib
from lm_ce.rundir import claims as outdir
from lm_ce.runner import evaluate
from lm_ce.scoring.scorer import Scorer

from .conftest import SENTENCES, make_jsonl

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def data(tmp_path) -> str:
    return make_jsonl(tmp_path / "docs.jsonl", [{"text": s} for s in SENTENCES[:6]])


def args(model: str, data: str, out: Path, *extra: str) -> list[str]:
    return ["--model", model, "--data-files", data, "--max-length", "32", "--batch-size", "1", "--no-progress",
            "--output-dir", str(out), *extra]


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("lm_ce: error: "), err
    return err[0]


def run_files(out: Path) -> dict[str, bytes]:
    """The files of a run in `out` (the saved records' file under its name of the moment)."""
    names = [name for name in outdir.RUN_FILES if (out / name).exists()] + [p.name for p in out.glob("state-*")]
    return {name: (out / name).read_bytes() for name in names}


def test_a_finished_run_is_kept(tiny_llama_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(args(tiny_llama_dir, data, out)) == 0
    before = run_files(out)
    capsys.readouterr()
    assert cli.main(args(tiny_llama_dir, data, out, "--mode", "stream")) == 2
    line = one_error_line(capsys)
    assert "holds a finished run (results.json" in line and "--overwrite" in line and "another --output-dir" in line
    assert run_files(out) == before
    assert not (out / outdir.LOCK).exists()


def stop_at_second_batch(monkeypatch) -> None:
    """Make the next run get a Ctrl-C (a real SIGINT) while it scores its second batch."""
    score, calls = Scorer.score, {"n": 0}

    def score_then_signal(self, batch, tally):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return score(self, batch, tally)

    monkeypatch.setattr(Scorer, "score", score_then_signal)


def test_an_interrupted_run_is_kept_and_resumable(tiny_llama_dir, data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    stop_at_second_batch(monkeypatch)
    assert cli.main(args(tiny_llama_dir, data, out)) == 130
    monkeypatch.undo()
    before = run_files(out)
    assert "state.json" in before
    capsys.readouterr()
    assert cli.main(args(tiny_llama_dir, data, out)) == 2
    line = one_error_line(capsys)
    assert "holds an interrupted run (" in line and "--resume" in line and "--overwrite" in line
    scored = int(line.split("holds an interrupted run (")[1].split(" tokens scored")[0].replace(",", ""))
    assert scored > 0  # the batch scored before the stop, from the saved state
    assert run_files(out) == before
    assert cli.main(args(tiny_llama_dir, data, out, "--resume")) == 0
    assert json.loads((out / "results.json").read_text())["complete"] is True


def test_overwrite_clears_only_the_old_runs_files_and_the_console_lists_what_was_written(
        tiny_llama_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(args(tiny_llama_dir, data, out, "--save-tokens")) == 0
    assert (out / "tokens.parquet").exists() and (out / "documents.jsonl").exists()
    (out / "notes.txt").write_text("the researcher's own notes")
    capsys.readouterr()
    assert cli.main(args(tiny_llama_dir, data, out, "--mode", "stream", "--overwrite")) == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    listed = printed.split(": ", 1)[1].split(", ")
    assert printed.startswith(f"wrote {out}/")
    assert "documents.jsonl" not in listed and "tokens.parquet" not in listed  # stream mode, no --save-tokens
    assert sorted(listed) == sorted(run_files(out))  # everything listed is there, everything there is listed
    assert (out / "notes.txt").read_text() == "the researcher's own notes"
    assert json.loads((out / "results.json").read_text())["settings"]["mode"] == "stream"


def test_overwrite_and_resume_are_refused_together(tiny_llama_dir, data, tmp_path, capsys):
    assert cli.main(args(tiny_llama_dir, data, tmp_path / "x", "--resume", "--overwrite")) == 2
    assert "choose one" in one_error_line(capsys)
    assert cli.main(["--model", tiny_llama_dir, "--data-files", data, "--overwrite"]) == 2
    assert "--overwrite needs --output-dir" in one_error_line(capsys)


HOLDER = """
import sys, time
from lm_ce.config.fields import Config
from lm_ce.rundir import claims
claims.claim(Config(output_dir=sys.argv[1]))
print("held", flush=True)
time.sleep(300)
"""


def test_a_live_run_locks_the_directory_and_a_dead_ones_lock_is_taken_over(tiny_llama_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli.main(args(tiny_llama_dir, data, out)) == 2
        line = one_error_line(capsys)
        assert f"is in use by another run (pid {holder.pid} on" in line and "another --output-dir" in line
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, as after a crash
        holder.wait()
    assert json.loads((out / outdir.LOCK).read_text())["pid"] == holder.pid
    assert cli.main(args(tiny_llama_dir, data, out)) == 0
    assert f"a lock left by pid {holder.pid}" in capsys.readouterr().err
    assert not (out / outdir.LOCK).exists()  # released at the end of the run


def test_without_os_locks_the_lock_files_pid_decides(tmp_path, monkeypatch, caplog):
    """On a file system without file locks (flock fails with ENOLCK) a live pid keeps the directory, a dead one not."""
    import errno
    import fcntl
    import socket

    from lm_ce.errors import UsageError

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        lock = {"pid": sleeper.pid, "host": socket.gethostname(), "started": "earlier"}
        (out / outdir.LOCK).write_text(json.dumps(lock))
        with pytest.raises(UsageError, match=f"in use by another run \\(pid {sleeper.pid} on"):
            outdir.claim(Config(output_dir=str(out)))
    finally:
        sleeper.kill()
        sleeper.wait()
    with outdir.claim(Config(output_dir=str(out))):
        assert json.loads((out / outdir.LOCK).read_text())["pid"] == os.getpid()
    assert f"a lock left by pid {sleeper.pid}" in caplog.text
    assert not (out / outdir.LOCK).exists()


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load a model fails the test: what is checked here must be checked before."""
    def load(*a, **k):
        raise AssertionError("the model was loaded before the output directory was checked")

    monkeypatch.setattr(model_lib, "load", load)


def test_a_file_as_output_dir_is_refused_before_the_model_loads(tiny_llama_dir, data, tmp_path, capsys, no_model_load):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a directory")
    assert cli.main(args(tiny_llama_dir, data, a_file)) == 2
    assert f"--output-dir {a_file} is a file, not a directory" in one_error_line(capsys)
    assert cli.main(args(tiny_llama_dir, data, a_file / "run")) == 2
    assert f"cannot be created: {a_file} is a file" in one_error_line(capsys)
    assert a_file.read_text() == "not a directory"


def test_an_unwritable_output_dir_is_refused_before_the_model_loads(tiny_llama_dir, data, capsys, no_model_load):
    unwritable = Path("/sys")  # read-only even for root (tests may run as root, where permissions do not hold)
    try:
        os.close(os.open(unwritable / outdir.LOCK, os.O_RDWR | os.O_CREAT))
        os.unlink(unwritable / outdir.LOCK)
        pytest.skip("/sys is writable here")
    except OSError:
        pass
    assert cli.main(args(tiny_llama_dir, data, unwritable)) == 2
    assert "--output-dir /sys is not writable" in one_error_line(capsys)


def test_evaluate_claims_the_directory_and_releases_it_on_error(tiny_llama_dir, data, tmp_path):
    """From Python too: evaluate refuses a directory holding a run, and an error inside leaves no lock behind."""
    from lm_ce.errors import UsageError

    out = tmp_path / "run"
    cfg = Config(model=tiny_llama_dir, data_files=[data], max_length=32, progress=False, output_dir=str(out))
    evaluate(cfg)
    with pytest.raises(UsageError, match="holds a finished run"):
        evaluate(cfg)
    with pytest.raises(UsageError, match="no_such_model does not exist"):
        evaluate(Config(**{**cfg.__dict__, "model": str(tmp_path / "no_such_model"), "overwrite": True}))
    assert not (out / outdir.LOCK).exists()


INTERRUPTED_LOADING = """
import signal, sys, time
# A terminal's Ctrl-C raises KeyboardInterrupt; a test runner started in the background (`cmd &`, nohup)
# passes SIGINT on ignored, and Python then keeps it ignored: restore what a user at a terminal has.
signal.signal(signal.SIGINT, signal.default_int_handler)
from lm_ce.cli import main as cli
from lm_ce.model import load as model
def slow_load(*a, **k):
    print("loading", flush=True)
    time.sleep(120)
model.load = slow_load
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ctrl_c_while_the_model_loads_ends_in_one_line(tiny_llama_dir, data, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED_LOADING, *args(tiny_llama_dir, data, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "loading"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 130, stderr
    assert lines == ["lm_ce: interrupted (Ctrl-C) before scoring started: nothing was scored"], stderr
    assert not (out / outdir.LOCK).exists()


@pytest.mark.slow  # a real 2-process launch
def test_two_processes_get_the_same_answer(tiny_llama_dir, data, tmp_path):
    """Under torchrun the main process claims and every process is told: a refused directory ends all of
    them together with one line from the main process, and a free one is written by the main process only."""
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              str(ROOT / "scripts" / "evaluate.py"), *args(tiny_llama_dir, data, out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count(f"wrote {out}/") == 1 and not (out / outdir.LOCK).exists()
    again = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300)
    refusals = [line for line in again.stderr.splitlines() if line.startswith("lm_ce: error: ")]
    assert again.returncode != 0 and len(refusals) == 1, again.stderr
    assert "holds a finished run" in refusals[0]


def test_the_python_api_holds_the_directory_and_a_callback_replaces_only_its_own_report(
        tiny_llama, llama_tokenizer, tmp_path):
    """lm_ce.evaluate refuses another run's directory; a PerplexityCallback's later evaluations replace its
    own earlier report (a new callback into that directory is refused like any other run)."""
    from transformers import TrainerControl, TrainerState

    import lm_ce
    from lm_ce.errors import UsageError

    texts = ["Hello world.", "Good morning!"]
    out = tmp_path / "api"
    lm_ce.evaluate(tiny_llama, llama_tokenizer, texts, output_dir=str(out), max_length=32, progress=False)
    with pytest.raises(UsageError, match="holds a finished run"):
        lm_ce.evaluate(tiny_llama, llama_tokenizer, texts, output_dir=str(out), max_length=32, progress=False)
    out = tmp_path / "callback"
    callback = lm_ce.PerplexityCallback(texts, tokenizer=llama_tokenizer, output_dir=str(out), max_length=32)
    for step in (10, 20):
        callback.on_evaluate(None, TrainerState(global_step=step), TrainerControl(), model=tiny_llama, metrics={})
        assert json.loads((out / "results.json").read_text())["nll_sum"] == callback.results.summary["nll_sum"]
    with pytest.raises(UsageError, match="holds a finished run"):
        lm_ce.PerplexityCallback(texts, tokenizer=llama_tokenizer, output_dir=str(out), max_length=32).on_evaluate(
            None, TrainerState(global_step=30), TrainerControl(), model=tiny_llama, metrics={})


@pytest.mark.parametrize("extra", [[], ["--overwrite"], ["--resume"]])
def test_the_users_own_files_are_not_a_run_and_never_replaced(tiny_llama_dir, data, tmp_path, capsys, no_model_load,
                                                              extra):
    """A directory holding only the user's config.yaml, documents.jsonl or a results.json of another tool is no
    finished run: refused (with --overwrite too), naming the files, and nothing is deleted."""
    out = tmp_path / "mine"
    out.mkdir()
    mine = {"config.yaml": "model: my-model\n", "documents.jsonl": '{"text": "my data"}\n',
            "results.json": '{"accuracy": 0.9}\n'}
    for name, text in mine.items():
        (out / name).write_text(text)
    assert cli.main(args(tiny_llama_dir, data, out, *extra)) == 2
    line = one_error_line(capsys)
    assert "holds results.json, config.yaml, documents.jsonl, not written by lm_ce" in line, line
    assert "finished run" not in line and "move them elsewhere" in line, line
    assert {p.name: p.read_text() for p in out.iterdir()} == mine
    (out / "results.json").unlink()
    assert cli.main(args(tiny_llama_dir, data, out, "--overwrite")) == 2
    assert "holds config.yaml, documents.jsonl, not written by lm_ce" in one_error_line(capsys)


def test_a_run_is_known_by_its_state_alone(tiny_llama_dir, data, tmp_path, capsys, monkeypatch):
    """An interrupted run before its first report (state.json only) is still a run: kept, resumable."""
    out = tmp_path / "run"
    stop_at_second_batch(monkeypatch)
    assert cli.main(args(tiny_llama_dir, data, out)) == 130
    monkeypatch.undo()
    for name in outdir.REPORTS:
        (out / name).unlink(missing_ok=True)
    found = outdir.previous_run(out)
    assert found.resumable and not found.foreign and found.words.startswith("an interrupted run")
