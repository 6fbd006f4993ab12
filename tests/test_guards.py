"""Numeric guards and memory pressure: never a silent nan/inf, and an out-of-memory batch is retried in halves."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from lm_ce.cli import main as cli
from lm_ce.config.fields import Config
from lm_ce.runner import evaluate
from lm_ce.scoring.scorer import Scorer

from .conftest import make_jsonl


@pytest.fixture
def data(tmp_path, texts):
    return make_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])


def test_nan_weights_stop_with_the_document_and_window(tmp_path, tiny_llama_dir, data, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(broken)
    capsys.readouterr()
    code = cli.main(["--model", str(broken), "--data-files", data, "--max-length", "32", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1  # a code of its own: 2 says the input is bad (docs/reliability.md)
    assert "non-finite loss in document" in err[0] and "window over tokens" in err[0]


def test_out_of_memory_retries_in_halves(tiny_llama_dir, data, monkeypatch, caplog):
    base = evaluate(Config(model=tiny_llama_dir, data_files=[data], max_length=32, batch_size=8, progress=False))
    real = Scorer.score_batch

    def small_memory(self, batch, tally):
        if len(batch) > 2:
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 123456789 bytes.")
        return real(self, batch, tally)

    monkeypatch.setattr(Scorer, "score_batch", small_memory)
    with caplog.at_level(logging.WARNING, logger="lm_ce"):
        tight = evaluate(Config(model=tiny_llama_dir, data_files=[data], max_length=32, batch_size=8, progress=False))
    assert sum("out of memory" in r.message for r in caplog.records) == 1  # said once
    assert tight.summary["counts"]["tokens"] == base.summary["counts"]["tokens"]
    assert math.isclose(tight.summary["nll_sum"], base.summary["nll_sum"], rel_tol=1e-6)


def test_other_runtime_errors_are_not_swallowed(tiny_llama_dir, data, monkeypatch):
    def broken(self, batch, tally):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(Scorer, "score_batch", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        evaluate(Config(model=tiny_llama_dir, data_files=[data], max_length=32, progress=False))
