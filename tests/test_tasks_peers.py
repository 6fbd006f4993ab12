"""The tasks against the peers themselves, run here on tiny models: lm-evaluation-harness (its hf model, its
multiple_choice task on local JSONL, --log_samples' values), minicons' word_score_tokenized and wordsprobability.
Each is skipped (with the reason) where the peer is not installed; SmolLM2's recorded peer values are checked in
tests/test_tasks_smollm2.py."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from lm_ce.config.sources import config_for
from lm_ce.runner import evaluate

from .conftest import make_jsonl

DATA = Path(__file__).parent / "data" / "tasks"
MC = DATA / "mc_items.jsonl"
WINOGRANDE = DATA / "winogrande_items.jsonl"
DOCS = DATA / "surprisal_docs.jsonl"

MC_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
{layout}
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_bytes
"""
GENERIC = "doc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: label\ntarget_delimiter: \" \""
WINOGRANDE_LAYOUT = ("doc_to_text: !function wg.gold\ndoc_to_target: !function wg.after\n"
                     "doc_to_choice: !function wg.contexts")
WINOGRANDE_UTILS = '''def gold(doc):
    return int(doc["answer"]) - 1


def after(doc):
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def contexts(doc):
    head = doc["sentence"][: doc["sentence"].index("_")]
    return [head + doc["option1"], head + doc["option2"]]
'''


def lm_eval_samples(model_dir: str, tasks: dict[str, str], folder: Path) -> dict:
    """lm-eval's simple_evaluate with log_samples on local tasks {name: layout}: {name: (results, samples by doc)}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wg.py").write_text(WINOGRANDE_UTILS)
    for name, (data, layout) in tasks.items():
        (folder / f"{name}.yaml").write_text(MC_TASK.format(name=name, data=data, layout=layout))
    lm = HFLM(pretrained=model_dir, dtype="float32", device="cpu", batch_size=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=TaskManager(include_path=str(folder)),
                                  log_samples=True)
    return {name: (out["results"][name], sorted(out["samples"][name], key=lambda s: s["doc_id"])) for name in tasks}


@pytest.mark.slow  # lm-eval indexes its whole task registry first: about a minute here
def test_multiple_choice_equals_lm_eval(tiny_llama_dir, tmp_path):
    """Per choice the log-likelihood lm-eval logs (its float32 log-softmax: rel 1e-5), is_greedy, and per item and
    overall acc, acc_norm, acc_bytes and their stderr exactly; its Winogrande (one context per option) too."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e .[test])")
    peer = lm_eval_samples(tiny_llama_dir, {"mc_items": (MC, GENERIC), "wg_items": (WINOGRANDE, WINOGRANDE_LAYOUT)},
                           tmp_path / "tasks")
    for name, data, layout in (("mc_items", MC, "generic"), ("wg_items", WINOGRANDE, "winogrande")):
        res = evaluate(config_for(model=tiny_llama_dir, data_files=[str(data)], task="multiple-choice", layout=layout,
                                  progress=False))
        results, samples = peer[name]
        for d, s in zip(res.documents, samples):
            lls = [float(r[0][0]) for r in s["resps"]]
            assert d.task.choice_loglikelihoods == pytest.approx(lls, rel=1e-5), (name, d.index)
            assert d.task.is_greedy == [r[0][1] in (True, "True") for r in s["resps"]]
            assert (d.task.fields()["acc"], d.task.fields()["acc_norm"], d.task.fields()["acc_bytes"]) == (
                s["acc"], s["acc_norm"], s["acc_bytes"]), (name, d.index)
        mc = res.summary["multiple_choice"]
        for metric in ("acc", "acc_norm", "acc_bytes"):
            assert mc[metric] == results[f"{metric},none"], (name, metric)
            assert mc[f"{metric}_stderr"] == pytest.approx(results[f"{metric}_stderr,none"], rel=1e-12)


def surprisal_rows(folder: Path) -> tuple[str, list[list[str]]]:
    """The surprisal documents as --words-field lists (text split at single spaces): (file, words of each)."""
    rows = [json.loads(line) for line in DOCS.read_text(encoding="utf-8").splitlines()]
    words = [r["words"] if "words" in r else r["text"].split(" ") for r in rows]
    return make_jsonl(folder / "words.jsonl", [{"words": w} for w in words]), words


def lm_ce_words(model_dir: str, data: str, **fields) -> list[float]:
    res = evaluate(config_for(model=model_dir, data_files=[data], task="surprisal", words_field="words",
                              progress=False, **fields))
    return res.tables["words"]["surprisal"]


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_surprisal_equals_minicons(request, model_fixture, tmp_path):
    """minicons' word_score_tokenized (bos_token=True, bits) with and without bow_correction: 1e-5 relative (its
    float32 forward reads the words otherwise batched; measured up to 1.3e-5 bits, 1.2e-7 relative, on an AVX-512
    CPU)."""
    scorer = pytest.importorskip("minicons.scorer", reason="minicons is not installed (pip install -e .[test])")
    model_dir = request.getfixturevalue(model_fixture)
    data, words = surprisal_rows(tmp_path)
    lm = scorer.IncrementalLMScorer(model_dir, device="cpu")
    for correct, style in ((True, "minicons"), (False, "minicons")):
        theirs = [v for w in words for _, v in lm.word_score_tokenized(
            [" ".join(w)], tokenize_function=lambda s: s.split(" "), bow_correction=correct, bos_token=True,
            surprisal=True, base_two=True)[0]]
        ours = lm_ce_words(model_dir, data, bow_style=style, bow_correction=correct)
        assert ours == pytest.approx(theirs, rel=1e-5), correct


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_surprisal_equals_wordsprobability(request, model_fixture, tmp_path):
    """wordsprobability's corrected and plain ("buggy") surprisals (nats, its float32 cross-entropy): 1e-5 bits or
    1e-6 relative on these tiny vocabularies (on SmolLM2's 49k its float32 kernel sets the gap:
    tests/test_tasks_smollm2.py)."""
    pytest.importorskip("wordsprobability", reason="wordsprobability is not installed (pip install -e .[test])")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from wordsprobability import models
    from wordsprobability.main import _get_surprisal_per_word
    from wordsprobability.models.bow_lm import BaseBOWModel

    model_dir = request.getfixturevalue(model_fixture)

    class Local(BaseBOWModel):  # the package's own recipe for a model of its list
        model_cls, tokenizer_cls, model_name = AutoModelForCausalLM, AutoTokenizer, model_dir

        def _get_n_logits(self):
            return self.model.get_output_embeddings().out_features

    models.MODELS["lm-ce-test"] = Local
    data, words = surprisal_rows(tmp_path)
    frame = _get_surprisal_per_word([" ".join(w) for w in words], "lm-ce-test", return_buggy_surprisals=True)
    assert len(frame) == sum(len(w) for w in words)
    for column, correct in (("surprisal", True), ("surprisal_buggy", False)):
        theirs = [v / math.log(2) for v in frame[column]]
        assert lm_ce_words(model_dir, data, bow_correction=correct) == pytest.approx(theirs, rel=1e-6, abs=1e-5), column


def test_peers_data_are_the_research_inputs():
    """The data files the recorded peer values belong to are present and unchanged in shape."""
    peers = json.loads((DATA / "peers.json").read_text(encoding="utf-8"))
    assert set(peers["lm_eval"]["items"]) == {json.loads(x)["id"] for x in MC.read_text().splitlines()}
    assert os.path.getsize(DOCS) > 0 and len(peers["minicons"]) == 5
