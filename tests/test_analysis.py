"""Reports beyond the mean: uncertainty, per-document and per-group rows, token file, loss by position,
model against model. Each checked against the float64 reference."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from lm_ce.config.fields import Config
from lm_ce.reports import files as report
from lm_ce.runner import evaluate

from .conftest import make_jsonl, perturbed_copy
from .reference import document_sequence, document_windows, reference_tokens

MAX_LEN, STRIDE = 32, 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, texts):
    rows = [{"text": t, "title": f"t{i}", "domain": "short" if len(t) < 60 else "long"} for i, t in enumerate(texts)]
    return rows, make_jsonl(tmp_path_factory.mktemp("analysis") / "docs.jsonl", rows)


@pytest.fixture(scope="module")
def reference(corpus, tiny_llama, llama_tokenizer):
    """Per document: the reference's scored tokens (float64)."""
    rows, _ = corpus
    out = []
    for row in rows:
        text = row["text"] if row["text"].strip() else ""  # whitespace only: an empty document, not scored
        seq, first = document_sequence(llama_tokenizer, text, llama_tokenizer.bos_token_id)
        out.append(reference_tokens(tiny_llama, seq, document_windows(len(seq), first, MAX_LEN, STRIDE)))
    return out


@pytest.fixture(scope="module")
def run(corpus, tiny_llama_dir, tmp_path_factory):
    _, path = corpus
    out = tmp_path_factory.mktemp("out")
    cfg = Config(model=tiny_llama_dir, data_files=[path], id_field="title", group_field="domain", max_length=MAX_LEN,
                 stride=STRIDE, batch_size=5, save_tokens=True, progress=False, output_dir=str(out))
    res = evaluate(cfg)
    report.write(res, str(out))
    return res, out


def test_uncertainty_is_clustered_by_document(run, reference):
    res, _ = run
    sums = np.array([sum(t["nll"] for t in doc) for doc in reference if doc])
    counts = np.array([len(doc) for doc in reference if doc])
    mean = sums.sum() / counts.sum()
    c = len(sums)
    se = math.sqrt(c / (c - 1) * ((sums - mean * counts) ** 2).sum()) / counts.sum()
    u = res.summary["uncertainty"]
    assert u["unit"] == "documents" and u["clusters"] == c
    assert math.isclose(u["mean_loss_stderr"], se, rel_tol=1e-4)
    assert math.isclose(u["perplexity_ci95"][0], math.exp(mean - 1.959964 * se), rel_tol=1e-4)
    assert math.isclose(u["perplexity_ci95"][1], math.exp(mean + 1.959964 * se), rel_tol=1e-4)
    per_token = np.array([t["nll"] for doc in reference for t in doc])
    assert math.isclose(u["mean_loss_stderr_iid"], per_token.std(ddof=1) / math.sqrt(len(per_token)), rel_tol=1e-4)


def test_documents_jsonl_and_groups(run, reference, corpus):
    res, out = run
    rows, _ = corpus
    lines = [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == [r["title"] for r in rows]
    groups: dict = {}
    for line, row, ref in zip(lines, rows, reference):
        nll = sum(t["nll"] for t in ref)
        assert line["tokens"] == len(ref)
        assert math.isclose(line["nll_sum"], nll, rel_tol=2e-5, abs_tol=1e-6)
        if ref:
            assert math.isclose(line["perplexity"], math.exp(nll / len(ref)), rel_tol=2e-5)
            n_bytes = len(row["text"].encode())
            assert math.isclose(line["bits_per_byte"], nll / n_bytes / math.log(2), rel_tol=2e-5)
            g = groups.setdefault(row["domain"], [0.0, 0])
            g[0] += nll
            g[1] += len(ref)
    assert set(res.summary["groups"]) == set(groups)
    for name, (nll, n) in groups.items():
        assert res.summary["groups"][name]["tokens"] == n
        assert math.isclose(res.summary["groups"][name]["mean_loss"], nll / n, rel_tol=2e-5)
    md = (out / "results.md").read_text()
    assert "## By group" in md and "| long |" in md


def test_token_file_matches_reference(run, reference, llama_tokenizer):
    _, out = run
    frame = pd.read_parquet(out / "tokens.parquet")
    expected = [(i, k, t) for i, doc in enumerate(reference) for k, t in enumerate(doc)]
    assert len(frame) == len(expected)
    assert list(frame["doc"]) == [i for i, _, _ in expected]
    assert list(frame["position"]) == [k for _, k, _ in expected]
    assert np.allclose(frame["nll"], [t["nll"] for _, _, t in expected], rtol=1e-4, atol=1e-4)
    assert list(frame["window_position"]) == [t["window_position"] for _, _, t in expected]
    agree = np.mean(frame["top1_id"].to_numpy() == np.array([t["top1"] for _, _, t in expected]))
    assert agree > 0.999  # float32 vs float64 may flip an exact near-tie
    row = frame.iloc[5]
    assert row["token"] == llama_tokenizer.decode([row["token_id"]])
    import datasets

    loaded = datasets.load_dataset("parquet", data_files=str(out / "tokens.parquet"), split="train")
    assert loaded.num_rows == len(frame)


def test_loss_by_position(run, reference):
    res, out = run
    by_pos: dict = {}
    for doc in reference:
        for t in doc:
            by_pos.setdefault(t["window_position"], []).append(t["nll"])
    for bucket in res.summary["by_position"]:
        lo, hi = bucket["positions"]
        values = [v for p in range(lo, hi + 1) for v in by_pos.get(p, [])]
        assert bucket["tokens"] == len(values)
        assert math.isclose(bucket["mean_loss"], sum(values) / len(values), rel_tol=2e-5)
    assert (out / "position_loss.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def perturbed_dir(tiny_llama_dir, tmp_path_factory):
    return perturbed_copy(tiny_llama_dir, tmp_path_factory.mktemp("perturbed"), seed=1, scale=0.05)


def test_compare_with_itself_is_zero(corpus, tiny_llama_dir):
    _, path = corpus
    res = evaluate(Config(model=tiny_llama_dir, data_files=[path], compare_to=[tiny_llama_dir], max_length=MAX_LEN,
                          progress=False))
    c = res.summary["compare"][tiny_llama_dir]
    assert c["kl_mean"] < 1e-6 and c["kl_p99"] < 1e-5
    assert c["top1_agreement"] == 1.0
    assert abs(c["delta_perplexity"]) < 1e-6 * res.summary["metrics"]["perplexity"]


def test_compare_with_perturbed_copy_matches_direct_kl(corpus, reference, tiny_llama, tiny_llama_dir, perturbed_dir, llama_tokenizer):
    rows, path = corpus
    other_dir, other = perturbed_dir
    res = evaluate(Config(model=tiny_llama_dir, data_files=[path], compare_to=[other_dir], max_length=MAX_LEN, stride=STRIDE,
                          batch_size=4, progress=False))
    kls, agree, other_nll = [], [], 0.0
    for row in rows:
        text = row["text"] if row["text"].strip() else ""  # whitespace only: an empty document, not scored
        seq, first = document_sequence(llama_tokenizer, text, llama_tokenizer.bos_token_id)
        windows = document_windows(len(seq), first, MAX_LEN, STRIDE)
        for p, q in zip(reference_tokens(tiny_llama, seq, windows), reference_tokens(other, seq, windows)):
            kls.append(float((p["logprobs"].exp() * (p["logprobs"] - q["logprobs"])).sum()))
            agree.append(p["top1"] == q["top1"])
            other_nll += q["nll"]
    c = res.summary["compare"][other_dir]
    assert c["tokens"] == len(kls)
    assert math.isclose(c["kl_mean"], np.mean(kls), rel_tol=1e-3)
    assert math.isclose(c["kl_p99"], np.quantile(kls, 0.99), rel_tol=1e-2)
    assert abs(c["top1_agreement"] - np.mean(agree)) <= 2 / len(kls)
    assert math.isclose(c["nll_sum"], other_nll, rel_tol=2e-5)
    assert c["kl_mean"] > 1e-3  # the perturbation is visible


def test_compare_with_another_tokenizer_uses_bits_per_byte(corpus, tiny_llama_dir, tiny_gpt2_dir):
    _, path = corpus
    res = evaluate(Config(model=tiny_llama_dir, data_files=[path], compare_to=[tiny_gpt2_dir], max_length=MAX_LEN,
                          progress=False))
    c = res.summary["compare"][tiny_gpt2_dir]
    assert "bits per byte only" in c["note"]
    alone = evaluate(Config(model=tiny_gpt2_dir, data_files=[path], max_length=MAX_LEN, progress=False))
    assert math.isclose(c["bits_per_byte"], alone.summary["metrics"]["bits_per_byte"], rel_tol=1e-9)
    assert "kl_mean" not in c
