"""--longppl-evaluator: LongPPL equals a float64 reference of the paper's definition, for the model itself as the
evaluator, another model with the same tokenizer, and one with another tokenizer (mapped through character
offsets); it does not depend on batches, padding or chunks, survives a stop and a resume, and 2 processes equal 1.
"""
from __future__ import annotations

import json
import math

import pytest

from lm_ce.analysis.longppl import Tokens, key_targets, mapped, short_spans
from lm_ce.cli import main as cli
from lm_ce.config.fields import Config
from lm_ce.reports import files as report
from lm_ce.runner import evaluate

from .conftest import make_jsonl, perturbed_copy, whole_and_resumed
from .reference import reference_longppl

# Short settings, so that the tiny models have candidates: windows of 24 tokens advancing by 8 (full context: 17 to
# 24 tokens), a short context of 4 to 6 tokens. Thresholds where the tiny random models have key tokens.
SETTINGS = dict(max_length=24, stride=8, longppl_short=4, longppl_step=3, longppl_alpha=0.1, longppl_beta=6.0)
ROW = ("longppl", "longppl_key_tokens", "longppl_nll_sum")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, texts):
    rows = [{"text": t, "id": f"d{i}", "group": "ab"[i % 2]} for i, t in enumerate(texts[:11])] + [{"text": None, "id": "x"}]
    return make_jsonl(tmp_path_factory.mktemp("longppl") / "docs.jsonl", rows)


def run(model_dir: str, data: str, owns_process: bool = False, **fields):
    return evaluate(Config(model=model_dir, data_files=[data], id_field="id", progress=False, **{**SETTINGS, **fields}),
                    owns_process=owns_process)


def rows_of(res) -> list[tuple]:
    return [(d.id, d.longppl.key_tokens, d.longppl.nll_sum) if d.longppl else (d.id, None) for d in res.documents]


@pytest.mark.parametrize("n_seq,first_target,short,step", [(1, 1, 4, 3), (5, 1, 4, 3), (30, 1, 4, 3), (30, 7, 4, 1),
                                                           (30, 1, 8, 8), (9, 1, 8, 5)])
def test_short_spans_give_each_candidate_short_to_short_plus_step_tokens(n_seq, first_target, short, step):
    spans = short_spans(n_seq, first_target, short, step)
    targets = [t for _, a, b in spans for t in range(a + 1, b + 1)]
    assert targets == list(range(max(first_target, short, 1), n_seq))
    for start, a, b in spans:
        assert a - start == short - 1 and b - a <= step
        for t in range(a + 1, b + 1):
            assert short <= t - start <= short + step - 1
            assert start == t - short - (t - short) % step  # the reference's formula


def test_key_targets_are_those_past_both_thresholds():
    import torch

    full = torch.tensor([9.0, 1.0, 1.0, 3.0, 0.5])  # targets 2..6
    short = torch.tensor([1.5, 3.5, 3.5, 0.5])  # candidates 3..6
    assert key_targets(full, short, first=2, candidate=3, alpha=2.0, beta=2.0) == [4]  # 3: gain 0.5; 5: full 3.0
    assert key_targets(full, short, first=2, candidate=3, alpha=0.0, beta=4.0) == [3, 4, 5]


def test_mapping_keeps_tokens_within_merged_key_spans():
    evaluator = Tokens([0, 1, 2, 3, 4], 1, [(0, 2), (2, 5), (5, 6), (7, 9)])  # targets 1..4
    run_seq = Tokens([0, 1, 2, 3, 4, 5], 1, [(0, 1), (1, 3), (3, 6), (6, 7), (7, 9)])
    assert mapped([2, 3], evaluator, run_seq) == [3]  # (2,5) and (5,6) merge into (2,6): (3,6) lies within, (1,3) not
    assert mapped([1, 2, 3], evaluator, run_seq) == [1, 2, 3]
    assert mapped([4], evaluator, run_seq) == [5]
    assert mapped([], evaluator, run_seq) == []


@pytest.fixture(scope="module")
def same_tokenizer_evaluator(tmp_path_factory, tiny_llama_dir):
    return perturbed_copy(tiny_llama_dir, tmp_path_factory.mktemp("evaluator"), seed=5, scale=0.3)


@pytest.mark.parametrize("which", ["self", "same tokenizer", "other tokenizer"])
def test_longppl_equals_the_float64_reference(which, data_file, texts, tiny_llama_dir, tiny_llama, llama_tokenizer,
                                              tiny_gpt2_dir, tiny_gpt2, gpt2_tokenizer, same_tokenizer_evaluator):
    evaluator_dir, evaluator, evaluator_tokenizer = {
        "self": ("self", tiny_llama, llama_tokenizer),
        "same tokenizer": (same_tokenizer_evaluator[0], same_tokenizer_evaluator[1], llama_tokenizer),
        "other tokenizer": (tiny_gpt2_dir, tiny_gpt2, gpt2_tokenizer),
    }[which]
    res = run(tiny_llama_dir, data_file, longppl_evaluator=evaluator_dir, group_field="group")
    total_nll, total_keys, tokens = 0.0, 0, 0
    for d, text in zip(res.documents, texts[:11]):
        if d.skipped:
            assert d.longppl is None
            continue
        nll, keys = reference_longppl(
            tiny_llama, llama_tokenizer, evaluator, evaluator_tokenizer, text, prefix_id=llama_tokenizer.bos_token_id,
            evaluator_prefix_id=evaluator_tokenizer.bos_token_id, max_length=24, stride=8, short=4, step=3,
            alpha=0.1, beta=6.0)
        assert d.longppl.key_tokens == keys, d.id
        assert d.longppl.nll_sum == pytest.approx(nll, rel=2e-5, abs=1e-5), d.id
        total_nll, total_keys, tokens = total_nll + nll, total_keys + keys, tokens + d.tokens
    assert total_keys > 20  # the test has something to compare
    figures = res.summary["longppl"]
    assert figures["key_tokens"] == total_keys and figures["tokens"] == tokens == res.summary["counts"]["tokens"]
    assert figures["key_fraction"] == total_keys / tokens
    assert figures["perplexity"] == pytest.approx(math.exp(total_nll / total_keys), rel=2e-5)
    assert figures["evaluator"] == evaluator_dir and figures["context"] == [4, 6]
    groups = res.summary["groups"]
    assert sum(g["longppl_key_tokens"] for g in groups.values()) == total_keys


def test_the_thresholds_decide_which_tokens_are_key(data_file, tiny_llama_dir):
    loose = run(tiny_llama_dir, data_file, longppl_evaluator="self")
    strict = run(tiny_llama_dir, data_file, longppl_evaluator="self", longppl_alpha=0.5, longppl_beta=4.0)
    assert 0 < strict.summary["longppl"]["key_tokens"] < loose.summary["longppl"]["key_tokens"]
    plain = evaluate(Config(model=tiny_llama_dir, data_files=[data_file], id_field="id", progress=False,
                            max_length=24, stride=8))
    assert "longppl" not in plain.summary and plain.summary["nll_sum"] == loose.summary["nll_sum"]


@pytest.fixture(scope="module")
def baseline(tiny_llama_dir, data_file):
    return run(tiny_llama_dir, data_file, longppl_evaluator="self", batch_size=4)


@pytest.mark.parametrize("change", [dict(batch_size=1), dict(batch_size=7, padding_side="left"),
                                    dict(chunk_documents=2), dict(token_budget=40)])
def test_longppl_does_not_depend_on_batches_padding_or_chunks(tiny_llama_dir, data_file, baseline, change):
    res = run(tiny_llama_dir, data_file, longppl_evaluator="self", **{"batch_size": 4, **change})
    for a, b in zip(rows_of(res), rows_of(baseline)):
        assert a[:2] == b[:2] and (len(a) == 2 or a[2] == pytest.approx(b[2], rel=1e-5, abs=1e-5)), (a, b)


def test_rows_are_written_and_read_back(tiny_llama_dir, data_file, tmp_path):
    res = run(tiny_llama_dir, data_file, longppl_evaluator="self", output_dir=str(tmp_path))
    lines = [json.loads(x) for x in (tmp_path / "documents.jsonl").read_text().splitlines()]
    scored = [row for row in lines if not row["skipped"]]
    assert scored and all(set(ROW) <= set(row) for row in scored)
    assert all(not set(ROW) & set(row) for row in lines if row["skipped"])
    for row in scored:
        expected = math.exp(row["longppl_nll_sum"] / row["longppl_key_tokens"]) if row["longppl_key_tokens"] else None
        assert row["longppl"] == expected
    assert rows_of(res) == [(r["id"], r["longppl_key_tokens"], r["longppl_nll_sum"]) if "longppl" in r else (r["id"], None)
                            for r in lines]
    report.write(res, str(tmp_path), plot=False)
    assert json.loads((tmp_path / "results.json").read_text())["longppl"] == res.summary["longppl"]


@pytest.mark.parametrize("stop_after", [2, 11, 30])  # in a chunk's LongPPL passes; in its own scoring; a later chunk
def test_a_stop_resumes_to_the_same_figures(tiny_llama_dir, data_file, tmp_path, monkeypatch, stop_after):
    whole, resumed = whole_and_resumed(lambda **f: run(tiny_llama_dir, data_file, **f), monkeypatch, stop_after,
                                       tmp_path, longppl_evaluator="self", batch_size=2, chunk_documents=5)
    assert rows_of(resumed) == rows_of(whole)
    assert resumed.summary["longppl"] == whole.summary["longppl"]
    assert resumed.summary["nll_sum"] == whole.summary["nll_sum"]


@pytest.mark.parametrize("args,says", [
    (["--longppl-evaluator", "self", "--mode", "stream"], "--mode document"),
    (["--longppl-evaluator", "self", "--longppl-short", "0"], "--longppl-short must be at least 1"),
    (["--longppl-evaluator", "self", "--longppl-short", "32", "--max-length", "32"], "not shorter than --max-length"),
    (["--longppl-evaluator", "other", "--prompt-field", "p"], "only self"),
    # the short windows (32 + 1024 - 1 input tokens) against the model's 256 positions, as for any evaluator
    (["--longppl-evaluator", "self", "--longppl-short", "32", "--max-length", "64"],
     "--longppl-evaluator self (the model) has 256 positions, fewer than the 1,055 tokens of its windows"),
    (["--longppl-evaluator", "no/such/evaluator", "--longppl-short", "4", "--longppl-step", "4"], "check --longppl-evaluator"),
    (["--longppl-evaluator", "self", "--longppl-alpha", "nan"], "--longppl-alpha must be a finite number, got 'nan'"),
    (["--longppl-evaluator", "self", "--longppl-beta", "inf"], "--longppl-beta must be a finite number, got 'inf'"),
])
def test_bad_longppl_settings_are_refused_in_one_line(tiny_llama_dir, data_file, capsys, args, says):
    assert cli.main(["--model", tiny_llama_dir, "--data-files", data_file, "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


@pytest.mark.slow  # a real 2-process launch
def test_two_processes_equal_one(tiny_llama_dir, data_file, tmp_path, capsys):
    from .test_distributed import compare

    args = ["--model", tiny_llama_dir, "--data-files", data_file, "--id-field", "id", "--max-length", "24",
            "--stride", "8", "--batch-size", "3", "--chunk-documents", "4", "--longppl-evaluator", "self",
            "--longppl-short", "4", "--longppl-step", "3", "--longppl-alpha", "0.1", "--longppl-beta", "6"]
    one, many, _ = compare(args, tmp_path, capsys)
    rows = [[json.loads(x) for x in (tmp_path / d / "documents.jsonl").read_text().splitlines()] for d in ("one", "many")]
    for a, b in zip(*rows):
        assert a.get("longppl_key_tokens") == b.get("longppl_key_tokens")
        if a.get("longppl_nll_sum") is None:  # a skipped document has no LongPPL (pytest.approx(None) is an error)
            assert b.get("longppl_nll_sum") is None
        else:
            assert a["longppl_nll_sum"] == pytest.approx(b.get("longppl_nll_sum"), rel=1e-5, abs=1e-6)
    assert many["longppl"]["key_tokens"] == one["longppl"]["key_tokens"] > 0
    assert many["longppl"]["perplexity"] == pytest.approx(one["longppl"]["perplexity"], rel=1e-5)
