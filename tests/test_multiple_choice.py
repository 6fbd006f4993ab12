"""--task multiple-choice against the float64 reference (tests/tasks_reference.py: each choice read whole, full
logits, float64) on tiny models: every protocol's per-choice figures, predictions and accuracies; the shared-prefix
path against whole choices; layouts, labels and bad rows; rows, results.json, resume and lm-ce compare."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lm_ce.config.sources import config_for
from lm_ce.errors import UsageError
from lm_ce.runner import evaluate
from lm_ce.tasks import forward
from lm_ce.tasks.choice import ChoiceScorer
from lm_ce.tasks.items import item_of
from lm_ce.tasks.requests import Request

from . import tasks_reference as ref
from .conftest import make_jsonl
from .reference import as_float64

DATA = Path(__file__).parent / "data" / "tasks"
MC = str(DATA / "mc_items.jsonl")
WINOGRANDE = str(DATA / "winogrande_items.jsonl")
REL = 1e-5  # float32 forward against the float64 one on these tiny models (measured: below 2e-6)


def rows_of(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def run(model_dir: str, data: str, **fields):
    return evaluate(config_for(model=model_dir, data_files=[data], id_field="id", progress=False,
                               **{"task": "multiple-choice", **fields}), owns_process=True)  # as the CLI


def reference_lm(model_dir: str) -> ref.LM:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return ref.LM(as_float64(AutoModelForCausalLM.from_pretrained(model_dir)), AutoTokenizer.from_pretrained(model_dir))


@pytest.fixture(scope="module")
def lms(tiny_llama_dir, tiny_gpt2_dir, bos_adding_llama_dir) -> dict:
    return {d: reference_lm(d) for d in (tiny_llama_dir, tiny_gpt2_dir, bos_adding_llama_dir)}


MODELS = ["tiny_llama_dir", "tiny_gpt2_dir", "bos_adding_llama_dir"]


@pytest.mark.parametrize("model_fixture", MODELS)
def test_lm_eval_protocol_equals_reference(request, model_fixture, lms):
    """Per choice: the log-likelihood (rel 1e-5), scored tokens and is_greedy; per item pred, pred_norm (characters),
    pred_bytes; acc, acc_norm, acc_bytes and lm-eval's stderr exactly. arc2's choices are not ASCII (characters and
    bytes differ), hs3's context ends in a space (moved to the continuation), hs2's choices share a first word."""
    model_dir = request.getfixturevalue(model_fixture)
    res = run(model_dir, MC)
    lm = lms[model_dir]
    expected = [ref.lmeval_item(lm, r["context"], r["choices"], [r["label"]]) for r in rows_of(MC)]
    for d, e in zip(res.documents, expected):
        t = d.task
        assert t.choice_loglikelihoods == pytest.approx(e["loglikelihoods"], rel=REL), d.id
        assert (t.choice_tokens, t.is_greedy) == (e["tokens"], e["is_greedy"]), d.id
        assert (t.pred, t.pred_norm, t.pred_bytes) == (e["pred"], e["pred_norm"], e["pred_bytes"]), d.id
        assert d.tokens == sum(e["tokens"]) and d.nll_sum == pytest.approx(-sum(e["loglikelihoods"]), rel=REL)
    mc = res.summary["multiple_choice"]
    for name in ("acc", "acc_norm", "acc_bytes"):
        values = [e[name] for e in expected]
        assert mc[name] == sum(values) / len(values), name
        assert mc[f"{name}_stderr"] == pytest.approx(ref.mean_stderr(values), rel=1e-12), name
    assert mc["items"] == 6 and mc["choices"] == 24 and mc["scoring"] == "shared prefix"
    assert res.summary["counts"]["tokens"] == sum(sum(e["tokens"]) for e in expected)


@pytest.mark.parametrize("mode", [forward.ONE_BY_ONE, forward.WHOLE])
def test_items_batched_equal_items_one_at_a_time_and_whole_choices(tiny_llama_dir, monkeypatch, mode):
    """Items read together (their prefixes left-padded in one pass, the choices' remainders over the copied caches)
    give what one item at a time, and each choice read whole, give (float32 rounding); a model that fails the probe
    is read as the probe says, and results.json says how."""
    batched = run(tiny_llama_dir, MC, token_budget=1000)  # one group: prefixes padded, remainders in two passes
    from lm_ce.tasks import passes

    monkeypatch.setattr(passes, "probe_cache", lambda body: (mode, "a test said so"))
    other = run(tiny_llama_dir, MC)
    expected = {forward.ONE_BY_ONE: "shared prefix, one item at a time: a test said so",
                forward.WHOLE: "whole sequences: a test said so"}[mode]
    assert other.summary["multiple_choice"]["scoring"] == expected
    for a, b in zip(batched.documents, other.documents):
        assert a.task.choice_loglikelihoods == pytest.approx(b.task.choice_loglikelihoods, rel=2e-6)
        assert (a.task.pred, a.task.pred_norm, a.task.choice_tokens) == (b.task.pred, b.task.pred_norm, b.task.choice_tokens)


@pytest.mark.parametrize("budget", [8, 40, 10_000])
def test_groups_and_passes_do_not_change_the_figures(tiny_gpt2_dir, lms, budget, tmp_path):
    """Whatever the token budget cuts the items into (a group per item and a pass per remainder; a group per item
    and four passes with copied caches; one group, its prefixes padded, two passes), every choice equals the float64
    reference, Winogrande rows with no common prefix (the blank first) included."""
    res = run(tiny_gpt2_dir, MC, token_budget=budget)
    lm = lms[tiny_gpt2_dir]
    for d, r in zip(res.documents, rows_of(MC)):
        expected = ref.lmeval_item(lm, r["context"], r["choices"], [r["label"]])
        assert d.task.choice_loglikelihoods == pytest.approx(expected["loglikelihoods"], rel=REL), (budget, d.id)
    rows = [*WG_ROWS, {"id": "wg6", "sentence": "_ opened the door when the bell rang.", "option1": "Tom",
                       "option2": "The old woman", "answer": "2"}]
    res = run(tiny_gpt2_dir, make_jsonl(tmp_path / "wg.jsonl", rows), layout="winogrande", token_budget=budget)
    for d, r in zip(res.documents, rows):
        expected = ref.lmeval_winogrande(lm, r["sentence"], r["option1"], r["option2"])
        assert d.task.choice_loglikelihoods == pytest.approx(expected["loglikelihoods"], rel=REL), (budget, d.id)


def test_groups_read_prefixes_of_similar_length_within_the_budget(monkeypatch):
    """Items are grouped by their common prefix's length, longest first, each group's tokens and padded prefixes
    within the budget, a group closed before a prefix it would pad by more than 1/8 once it reads MIN_TOKENS; one
    item per group where the model's cache cannot be padded across items."""
    def request(prefix: int, rest: int) -> Request:
        sequences = [list(range(prefix)) + [100 + k] * rest for k in range(2)]
        return Request(sequences, [[(s[-1], k, len(s) - 2)] for k, s in enumerate(sequences)])

    requests = [request(2, 3), request(9, 1), request(4, 2), request(9, 2), request(3, 3)]
    scorer = ChoiceScorer(None, None, None, None, forward.BATCHED, 100, budget=24)
    assert scorer.groups(requests) == [[3, 1], [2, 4, 0]]
    monkeypatch.setattr(forward, "MIN_TOKENS", 8)
    assert scorer.groups(requests) == [[3, 1], [2, 4], [0]]  # 2 tokens padded to 4
    scorer.mode = forward.ONE_BY_ONE
    assert scorer.groups(requests) == [[3], [1], [2], [4], [0]]


def test_probe_refuses_a_cache_that_changes_the_figures(tiny_llama_dir):
    """A model whose cache is ignored (each continuation read without its context) is read whole; one that ignores
    the attention mask and positions of padded prefixes is read one item at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    body = forward.Body(model, None, torch.device("cpu"))
    assert forward.probe_cache(body) == (forward.BATCHED, None)
    real = body.states

    def unmasked(ids, cache=None, keep_cache=False, padding=None):
        return real(ids, cache, keep_cache)

    body.states = unmasked
    mode, why = forward.probe_cache(body)
    assert mode == forward.ONE_BY_ONE and "with prefixes padded across items its cache gives other" in why

    def forgetful(ids, cache=None, keep_cache=False, padding=None):
        return real(ids, None, keep_cache, padding if cache is None else None)

    body.states = forgetful
    mode, why = forward.probe_cache(body)
    assert mode == forward.WHOLE and "other log-probabilities" in why


@pytest.mark.parametrize("model_fixture", MODELS)
def test_llama_cpp_hellaswag_equals_reference(request, model_fixture, lms):
    """llama-perplexity's --hellaswag/--multiple-choice: the mean log p after the choices' common prefix (BOS where the
    tokenizer adds it), the first maximum; acc_norm is acc (the score is already a mean per token)."""
    model_dir = request.getfixturevalue(model_fixture)
    res = run(model_dir, MC, protocol="llama-cpp-hellaswag")
    for d, r in zip(res.documents, rows_of(MC)):
        e = ref.llama_hellaswag(lms[model_dir], r["context"], r["choices"])
        t = d.task
        assert t.choice_tokens == e["counts"], d.id
        assert [a / n for a, n in zip(t.choice_loglikelihoods, t.choice_tokens)] == pytest.approx(e["means"], rel=REL)
        assert t.pred == t.pred_norm == t.pred_bytes == e["pred"]
    mc = res.summary["multiple_choice"]
    assert mc["acc"] == mc["acc_norm"] and mc["protocol"] == "llama-cpp-hellaswag"
    correct = sum(d.task.pred == d.task.label[0] for d in res.documents)
    assert mc["acc_wilson95"] == pytest.approx(list(ref.wilson(correct, 6)), rel=1e-12)


WG_ROWS = [*rows_of(WINOGRANDE),
           {"id": "wg3", "sentence": "Anna gave Mary the book because _ had finished it.", "option1": "Anna",
            "option2": "Mary", "answer": "1"},
           {"id": "wg4", "sentence": "The dog chased the cat until _ got tired.", "option1": "the dog",
            "option2": "the cat", "answer": "1"},
           {"id": "wg5", "sentence": "She picked the first of A and B: _.", "option1": "A", "option2": "B",
            "answer": "1"}]  # a tail of one token: the options are scored too


@pytest.mark.parametrize("quirk", [True, False], ids=["quirk", "corrected"])
@pytest.mark.parametrize("model_fixture", MODELS)
def test_llama_cpp_winogrande_equals_reference(request, model_fixture, quirk, lms, tmp_path):
    """llama-perplexity's --winogrande: after the option with a long tail, after the common prefix with a short one
    (the last token left out); ties to option 2; the quirk (second option's first token from the first's logits)
    reproduced by default and corrected with --no-llama-cpp-quirk."""
    model_dir = request.getfixturevalue(model_fixture)
    data = make_jsonl(tmp_path / "wg.jsonl", WG_ROWS)
    res = run(model_dir, data, protocol="llama-cpp-winogrande", layout="winogrande", llama_cpp_quirk=quirk)
    short = 0
    for d, r in zip(res.documents, WG_ROWS):
        e = ref.llama_winogrande(lms[model_dir], r["sentence"], r["option1"], r["option2"], quirk=quirk)
        short += not e["skip_choice"]
        assert d.task.choice_tokens == e["counts"], d.id
        means = [a / n for a, n in zip(d.task.choice_loglikelihoods, d.task.choice_tokens)]
        assert means == pytest.approx(e["means"], rel=REL), d.id
        assert d.task.pred == e["pred"] and d.task.label == [int(r["answer"]) - 1]
    assert short, "no item exercised the short-tail rule"


def test_llama_cpp_winogrande_quirk_changes_the_short_tail_score(tiny_llama_dir, lms, tmp_path):
    data = make_jsonl(tmp_path / "wg.jsonl", WG_ROWS)
    on, off = (run(tiny_llama_dir, data, protocol="llama-cpp-winogrande", layout="winogrande", llama_cpp_quirk=q)
               for q in (True, False))
    changed = [a.id for a, b in zip(on.documents, off.documents)
               if a.task.choice_loglikelihoods[1] != pytest.approx(b.task.choice_loglikelihoods[1], rel=1e-6)]
    assert changed and all(not ref.llama_winogrande(lms[tiny_llama_dir], r["sentence"], r["option1"], r["option2"])[
        "skip_choice"] for r in WG_ROWS if r["id"] in changed)


def test_ties():
    """lm-eval and llama.cpp's HellaSwag: the first maximum (numpy's argmax); llama.cpp's Winogrande: option 2."""
    from lm_ce.tasks.choice import predictions

    tie = ([-4.0, -4.0, -6.0], [2, 2, 2], [3, 3, 3], [3, 3, 3])
    assert predictions("lm-eval", *tie) == (0, 0, 0)
    assert predictions("llama-cpp-hellaswag", *tie) == (0, 0, 0)
    assert predictions("llama-cpp-winogrande", [-4.0, -2.0], [2, 1], [1, 1], [1, 1]) == (1, 1, 1)  # equal means
    assert predictions("llama-cpp-winogrande", [-3.9, -2.0], [2, 1], [1, 1], [1, 1]) == (0, 0, 0)
    assert predictions("lm-eval", [-4.0, -3.0], [1, 1], [8, 2], [8, 2]) == (1, 0, 0)  # per character: the long one


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "bos_adding_llama_dir"])
def test_lm_eval_winogrande_layout_equals_reference(request, model_fixture, lms, tmp_path):
    """lm-eval's Winogrande (partial scoring): one context per option, the same continuation after the blank."""
    model_dir = request.getfixturevalue(model_fixture)
    data = make_jsonl(tmp_path / "wg.jsonl", WG_ROWS)
    res = run(model_dir, data, layout="winogrande")
    for d, r in zip(res.documents, WG_ROWS):
        e = ref.lmeval_winogrande(lms[model_dir], r["sentence"], r["option1"], r["option2"])
        assert d.task.choice_loglikelihoods == pytest.approx(e["loglikelihoods"], rel=REL)
        assert d.task.pred == e["pred"] and d.task.pred_norm == e["pred_norm"]


def test_layouts_read_as_lm_eval_builds_them(tmp_path):
    """HellaSwag's and ARC's own rows to {context, choices, label}, as lm-eval's hellaswag and arc tasks do."""
    hs = {"activity_label": "Baking", "ctx_a": "A man [title] mixes  flour.", "ctx_b": "he THEN adds water",
          "endings": [" bakes it [header] well.", "eats it."], "label": "1"}
    item = item_of(config_for(task="multiple-choice", layout="hellaswag"), 0, hs, "f")
    assert item.context == "Baking: A man. mixes flour. He then adds water"
    assert item.choices == ["bakes it well.", "eats it."] and item.labels == [1]
    arc = {"question": "Which?", "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]}, "answerKey": "C"}
    item = item_of(config_for(task="multiple-choice", layout="arc"), 0, arc, "f")
    assert (item.context, item.choices, item.labels) == ("Question: Which?\nAnswer:", ["a", "b", "c"], [2])
    wg = {"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "2"}
    item = item_of(config_for(task="multiple-choice", layout="winogrande"), 0, wg, "f")
    assert (item.blank.before, item.blank.after, item.labels) == ("A ", " b.", [1])


@pytest.mark.parametrize("label,labels", [(2, [2]), ("2", [2]), ("b", [1]), ([0, 2], [0, 2]), (1.0, [1])])
def test_labels(label, labels):
    row = {"context": "x", "choices": ["a", "b", "c"], "label": label}
    assert item_of(config_for(task="multiple-choice"), 0, row, "f").labels == labels


BAD_ROWS = [
    ({"context": "x", "choices": ["a", "b"], "label": 2}, "row 0: field 'label' is 2"),
    ({"context": "x", "choices": ["a", "b"], "label": None}, "field 'label' is None"),
    ({"context": "x", "choices": "ab", "label": 0}, "field 'choices' is a str"),
    ({"context": "x", "choices": ["a", ""], "label": 0}, "has an empty choice"),
    ({"context": 3, "choices": ["a", "b"], "label": 0}, "field 'context' is a int, not a string"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS)
def test_bad_rows_are_refused_in_one_line(row, message):
    with pytest.raises(UsageError, match=message):
        item_of(config_for(task="multiple-choice"), 0, row, "f")


def test_an_item_longer_than_max_length_is_refused(tiny_llama_dir):
    with pytest.raises(UsageError, match="more than --max-length 8; give a larger --max-length"):
        run(tiny_llama_dir, MC, max_length=8)


def test_bad_winogrande_rows_are_refused():
    cfg = config_for(task="multiple-choice", layout="winogrande")
    with pytest.raises(UsageError, match="answer '' is not 1 or 2"):
        item_of(cfg, 3, {"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": ""}, "f")
    with pytest.raises(UsageError, match="has 0 blanks"):
        item_of(cfg, 3, {"sentence": "A b.", "option1": "x", "option2": "y", "answer": "1"}, "f")


@pytest.mark.parametrize("settings,message", [
    ({"protocol": "llama-cpp-winogrande"}, "llama-cpp-winogrande scores Winogrande rows"),
    ({"task": "multiple-choice", "protocol": "gptq"}, "choose one of lm-eval, llama-cpp-hellaswag"),
    ({"task": "multiple-choice", "save_tokens": True}, "does not take save_tokens"),  # in Python's words
    ({"task": "multiple-choice", "compare_to": ["x"]}, "lm-ce compare pairs them item by item"),
    ({"task": "perplexity", "protocol": "llama-cpp-hellaswag"}, "give task='multiple-choice'"),
])
def test_settings_that_cannot_work_are_refused(settings, message):
    with pytest.raises(UsageError, match=message):
        config_for(**settings)


def test_rows_and_results_on_disk(tiny_gpt2_dir, tmp_path):
    """documents.jsonl: one row per item with the per-choice lists, pred, pred_norm, label and 0/1 accuracies;
    results.json's multiple_choice; results.md names the accuracies. Read back, the rows are the same records."""
    out = tmp_path / "run"
    res = run(tiny_gpt2_dir, MC, output_dir=str(out))
    from lm_ce.reports import files

    files.write(res, str(out))
    lines = [json.loads(x) for x in (out / "documents.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["id"] for x in lines] == ["hs1", "hs2", "hs3", "arc1", "arc2", "arc3"]
    first = lines[0]
    for key in ("choice_loglikelihoods", "choice_tokens", "choice_bytes", "choice_chars", "pred", "pred_norm", "label",
                "acc", "acc_norm", "acc_bytes", "is_greedy"):
        assert key in first, key
    assert first["label"] == 0 and first["choice_bytes"] == [len(c.encode()) for c in rows_of(MC)[0]["choices"]]
    assert lines[4]["choice_chars"] == [len(c) for c in rows_of(MC)[4]["choices"]] != lines[4]["choice_bytes"]
    summary = json.loads((out / "results.json").read_text())
    assert summary["multiple_choice"]["items"] == 6 and summary["settings"]["task"] == "multiple-choice"
    assert "acc_norm" in (out / "results.md").read_text()
    assert [d.task for d in res.documents] == [d.task for d in run(tiny_gpt2_dir, MC).documents]


def test_stop_and_resume_equals_one_run(tiny_llama_dir, tmp_path, monkeypatch):
    """Stopped by Ctrl-C inside the second chunk and resumed: the same rows and figures as one whole run (a token
    budget that reads one item per group: two groups per chunk)."""
    from lm_ce.tasks import choice

    calls = {"n": 0}
    score = choice.ChoiceScorer.score

    def stop_at_third(self, items, requests):
        calls["n"] += 1
        if calls["n"] == 3:  # the first group of the second chunk: the stop comes before its second
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)
        return score(self, items, requests)

    settings = dict(chunk_documents=2, token_budget=8)
    whole = run(tiny_llama_dir, MC, output_dir=str(tmp_path / "whole"), **settings)
    monkeypatch.setattr(choice.ChoiceScorer, "score", stop_at_third)
    stopped = run(tiny_llama_dir, MC, output_dir=str(tmp_path / "run"), **settings)
    assert stopped.summary["complete"] is False and stopped.summary["multiple_choice"]["items"] == 2
    monkeypatch.undo()
    resumed = run(tiny_llama_dir, MC, output_dir=str(tmp_path / "run"), resume=True, **settings)
    assert resumed.summary["complete"] is True
    assert [d.task for d in resumed.documents] == [d.task for d in whole.documents]
    for key in ("acc", "acc_norm", "acc_bytes", "items"):
        assert resumed.summary["multiple_choice"][key] == whole.summary["multiple_choice"][key]
    assert resumed.summary["nll_sum"] == whole.summary["nll_sum"]


def test_python_api_with_rows_in_memory(tiny_llama, llama_tokenizer, tiny_llama_dir):
    """lm_ce.evaluate(model, tokenizer, rows, task=...): the rows as dicts, the same figures as from the file."""
    import lm_ce

    res = lm_ce.evaluate(tiny_llama, llama_tokenizer, rows_of(MC), task="multiple-choice", id_field="id", progress=False)
    from_file = run(tiny_llama_dir, MC)
    assert [d.task.pred for d in res.documents] == [d.task.pred for d in from_file.documents]
    for a, b in zip(res.documents, from_file.documents):
        assert a.task.choice_loglikelihoods == pytest.approx(b.task.choice_loglikelihoods, rel=1e-6)


def test_compare_pairs_two_runs_item_by_item(tiny_llama_dir, tmp_path):
    """lm-ce compare on two multiple-choice runs: the usual paired deltas, and the item-level agreement."""
    from lm_ce.reports import files, paired

    from .conftest import perturbed_copy

    other, _ = perturbed_copy(tiny_llama_dir, tmp_path / "other", seed=3, scale=0.05)
    a, b = run(tiny_llama_dir, MC, output_dir=str(tmp_path / "a")), run(other, MC, output_dir=str(tmp_path / "b"))
    files.write(a, str(tmp_path / "a"))
    files.write(b, str(tmp_path / "b"))
    c = paired.compare_runs(str(tmp_path / "a"), str(tmp_path / "b"))
    agree = c["multiple_choice"]
    preds = [(x.task.pred, y.task.pred) for x, y in zip(a.documents, b.documents)]
    assert agree["items"] == 6
    assert agree["same_pred"] == sum(x == y for x, y in preds) / 6
    assert agree["acc_a"] == a.summary["multiple_choice"]["acc"] and agree["acc_b"] == b.summary["multiple_choice"]["acc"]
    assert agree["delta_acc"]["value"] == pytest.approx(agree["acc_b"] - agree["acc_a"])
    assert "same prediction" in paired.markdown(c)


def test_accuracy_stderr_is_lm_evals_and_wilson_is_llama_cpps():
    from lm_ce.sums.tasks import accuracy

    a = accuracy(2, 3)
    assert a["stderr"] == pytest.approx(ref.mean_stderr([1.0, 1.0, 0.0]), rel=1e-12)
    assert a["wilson95"] == pytest.approx([0.207660, 0.938508], abs=1e-6)  # what llama-perplexity printed for 2 of 3
    assert accuracy(1, 1)["stderr"] is None and math.isclose(accuracy(5, 6)["stderr"], 1 / 6)
