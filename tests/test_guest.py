"""lm_ce is a guest in the caller's process: lm_ce.evaluate, PerplexityCallback in a Trainer and the datatrove step
install no signal handler (also while they score), let a Ctrl-C reach the caller as KeyboardInterrupt, and leave the
plotting backend, pyplot's figures, the libraries' loggers and progress bars, accelerate's process-wide state and
glibc's allocator settings as they found them. Only the command line owns its process (tests/test_output_dir.py,
tests/test_resume.py: its Ctrl-C saves and stops)."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lm_ce
from lm_ce.rundir import state
from lm_ce.scoring.scorer import Scorer

from .conftest import corpus_rows, make_jsonl, stop_at_batch

ROOT = Path(__file__).resolve().parent.parent
LOGGERS = ("datasets", "transformers", "huggingface_hub", "accelerate", "lm_ce", "torch")
SETTINGS = {"max_length": 24, "stride": 12, "batch_size": 2, "chunk_documents": 8, "id_field": "id"}
CALLER_LEVEL = 35  # between WARNING and ERROR: a level no library sets by itself


def callers_sigint(signum, frame):
    """The caller's own Ctrl-C handler (a notebook's, a Trainer script's): Python's behaviour, under another name."""
    raise KeyboardInterrupt


def callers_sigterm(signum, frame):
    raise SystemExit(143)


def snapshot() -> dict:
    """What lm_ce must leave as it found it, as far as Python can read it."""
    import datasets
    import huggingface_hub.utils as hub
    import matplotlib
    import transformers
    from accelerate.state import AcceleratorState, GradientState, PartialState

    pyplot = sys.modules.get("matplotlib.pyplot")
    return {
        "signals": (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)),
        "backend": matplotlib.get_backend(),
        "pyplot figures": pyplot.get_fignums() if pyplot else None,
        "loggers": {name: logging.getLogger(name).level for name in LOGGERS},
        "progress bars": (transformers.utils.logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled(),
                          hub.are_progress_bars_disabled()),
        "accelerate": [dict(cls._shared_state) for cls in (PartialState, AcceleratorState, GradientState)],
        "threads": torch.get_num_threads(),
    }


@pytest.fixture
def caller():
    """A caller's process: its own signal handlers, a plotting backend other than Agg (a notebook's inline one, in
    spirit), its own logger levels, and no accelerate state yet (a fresh notebook). Put back afterwards."""
    import matplotlib
    from accelerate.state import AcceleratorState, GradientState, PartialState

    states = [(cls._shared_state, dict(cls._shared_state)) for cls in (PartialState, AcceleratorState, GradientState)]
    backend = matplotlib.get_backend()
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    levels = {name: logging.getLogger(name).level for name in LOGGERS}
    for shared, _ in states:
        shared.clear()
    matplotlib.use("svg")
    signal.signal(signal.SIGINT, callers_sigint)
    signal.signal(signal.SIGTERM, callers_sigterm)
    for name in LOGGERS:
        logging.getLogger(name).setLevel(CALLER_LEVEL)
    try:
        yield snapshot()
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
        matplotlib.use(backend)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for shared, before in states:
            shared.clear()
            shared.update(before)


def watch_scoring(monkeypatch) -> list[dict]:
    """The snapshots taken while lm_ce scores (at each batch)."""
    seen, score = [], Scorer.score

    def watched(self, batch, tally):
        seen.append(snapshot())
        return score(self, batch, tally)

    monkeypatch.setattr(Scorer, "score", watched)
    return seen


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return make_jsonl(tmp_path_factory.mktemp("guest") / "docs.jsonl", corpus_rows(30))


def test_evaluate_leaves_the_process_as_it_found_it(caller, tiny_llama, llama_tokenizer, corpus, tmp_path, monkeypatch):
    seen = watch_scoring(monkeypatch)
    results = lm_ce.evaluate(tiny_llama, llama_tokenizer, corpus, output_dir=str(tmp_path), **SETTINGS)
    assert results.summary["complete"] and (tmp_path / "position_loss.png").stat().st_size > 0
    assert seen and all(s["signals"] == caller["signals"] for s in seen)  # no handler while scoring either
    assert snapshot() == caller


def test_ctrl_c_reaches_the_caller_after_progress_is_saved(caller, tiny_llama, llama_tokenizer, corpus, tmp_path,
                                                           monkeypatch):
    whole = lm_ce.evaluate(tiny_llama, llama_tokenizer, corpus, **SETTINGS)
    stop_at_batch(monkeypatch, 60)  # a SIGINT in a later chunk (about 26 batches a chunk)
    with pytest.raises(KeyboardInterrupt) as stopped:
        lm_ce.evaluate(tiny_llama, llama_tokenizer, corpus, output_dir=str(tmp_path), **SETTINGS)
    monkeypatch.undo()
    # a notebook keeps the last exception and its traceback's frames (sys.last_value): nothing may hang on to them
    assert stopped.value is not None and snapshot() == caller
    saved = state.load(tmp_path)
    assert saved["complete"] is False and saved["run"].chunks_done >= 1  # the chunks finished before the stop
    resumed = lm_ce.evaluate(tiny_llama, llama_tokenizer, corpus, output_dir=str(tmp_path), resume=True, **SETTINGS)
    assert resumed.summary["nll_sum"] == whole.summary["nll_sum"]
    assert list(resumed.documents) == list(whole.documents)


def test_a_ctrl_c_while_a_chunk_is_added_leaves_the_last_save(caller, tiny_llama, llama_tokenizer, corpus, tmp_path,
                                                               monkeypatch):
    """A KeyboardInterrupt arrives between any two bytecodes: between a chunk's sums and its rows, what the run holds
    is not a state to resume from (its sums would count the chunk twice); the last save is kept instead."""
    from lm_ce.rundir.outputs import Outputs

    whole = lm_ce.evaluate(tiny_llama, llama_tokenizer, corpus, **SETTINGS)
    add, calls = Outputs.add_chunk, {"n": 0}

    def interrupted(self, run, rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the second chunk's sums are in the run, its rows and count are not
        return add(self, run, rows)

    monkeypatch.setattr(Outputs, "add_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lm_ce.evaluate(tiny_llama, llama_tokenizer, corpus, output_dir=str(tmp_path), **SETTINGS)
    monkeypatch.undo()
    resumed = lm_ce.evaluate(tiny_llama, llama_tokenizer, corpus, output_dir=str(tmp_path), resume=True, **SETTINGS)
    assert resumed.summary["nll_sum"] == whole.summary["nll_sum"]
    assert resumed.summary["counts"] == whole.summary["counts"]


def test_the_callback_in_a_trainer(caller, tiny_llama_dir, llama_tokenizer, texts, tmp_path, monkeypatch):
    """A Trainer's evaluation with the callback leaves the process as it found it; a Ctrl-C while the callback scores
    ends trainer.train() with KeyboardInterrupt, and no figure of the stopped evaluation is logged."""
    from .test_callback import NAMES, train_two_steps

    data = texts[3:9]
    trainer = train_two_steps(tiny_llama_dir, llama_tokenizer, tmp_path,
                              lambda t: lm_ce.PerplexityCallback(data, trainer=t, max_length=24, stride=12))
    before = snapshot()  # the Trainer's own accelerate state is the caller's now
    seen = watch_scoring(monkeypatch)
    metrics = trainer.evaluate()
    assert NAMES[0] in metrics and seen and all(s["signals"] == caller["signals"] for s in seen)
    assert snapshot() == before
    monkeypatch.undo()
    stop_at_batch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not [entry for entry in trainer.state.log_history if NAMES[0] in entry]
    after = snapshot()
    after.pop("accelerate"), before.pop("accelerate")  # training moved the Trainer's own GradientState
    assert after == before


def test_the_datatrove_step(caller, tiny_llama_dir, monkeypatch):
    pytest.importorskip("datatrove")
    from datatrove.data import Document

    from lm_ce.integrations.datatrove import PerplexityStats

    step = PerplexityStats(model=tiny_llama_dir, documents_per_call=4, max_length=24, stride=12)
    docs = [Document(text=row["text"], id=row["id"]) for row in corpus_rows(12) if row["text"]]
    seen = watch_scoring(monkeypatch)
    out = list(step.run(iter(docs)))
    assert len(out) == len(docs) and seen and all(s["signals"] == caller["signals"] for s in seen)
    assert snapshot() == caller
    monkeypatch.undo()
    stop_at_batch(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        list(step.run(iter(docs)))
    assert snapshot() == caller


ALLOCATOR = """
import ctypes, json, sys
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                        "fsmblks", "uordblks", "fordblks", "keepcost")]

libc.mallinfo2.restype = Info

def mapped(size):  # whether glibc serves a block of this size by mmap: its threshold is below it
    before = libc.mallinfo2().hblks
    block = libc.malloc(size)
    after = libc.mallinfo2().hblks
    libc.free(block)
    return after > before

model_dir, data, how = sys.argv[1:4]
if how == "api":
    import lm_ce
    from transformers import AutoModelForCausalLM, AutoTokenizer
    lm_ce.evaluate(AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir), data,
                   max_length=24, progress=False)
else:
    from lm_ce.cli.main import main
    assert main(["--model", model_dir, "--data-files", data, "--max-length", "24", "--no-progress"]) == 0
print(json.dumps({"1 MB mapped": mapped(1 << 20)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.parametrize("how", ["api", "cli"])
def test_allocator_settings(how, tiny_llama_dir, corpus):
    """Where readable (glibc 2.33's mallinfo2): the mmap threshold a caller set (here MALLOC_MMAP_THRESHOLD_, as
    mallopt would) holds after lm_ce.evaluate; the command line, which owns its process, still has glibc keep freed
    blocks of up to 32 MB (the threshold raised past 1 MB, by glibc itself)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    if how == "api":
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 << 10)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(ALLOCATOR), tiny_llama_dir, corpus, how],
                          capture_output=True, text=True, env=env, timeout=300)
    if "mallinfo2" in proc.stderr:
        pytest.skip("glibc before 2.33: mallinfo2 unavailable")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {"1 MB mapped": how == "api"}
