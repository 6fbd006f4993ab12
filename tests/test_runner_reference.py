"""The tool against the plain float64 reference (full logits, one window at a time), both modes."""
from __future__ import annotations

import math

import pytest

from lm_ce.config.fields import Config
from lm_ce.runner import evaluate

from .conftest import make_jsonl
from .reference import reference_document, reference_stream, reference_transformers_recipe

REL = 2e-5  # float32 model and head against a float64 reference


def run(model_dir: str, data: str, **fields):
    cfg = Config(model=model_dir, data_files=[data], progress=False, **fields)
    return evaluate(cfg)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, texts):
    return make_jsonl(tmp_path_factory.mktemp("data") / "docs.jsonl", [{"text": t, "title": f"doc{i}"} for i, t in enumerate(texts)])


@pytest.fixture(scope="module")
def models(tiny_llama_dir, tiny_gpt2_dir, tiny_llama, tiny_gpt2, llama_tokenizer, gpt2_tokenizer):
    return {"llama": (tiny_llama_dir, tiny_llama, llama_tokenizer), "gpt2": (tiny_gpt2_dir, tiny_gpt2, gpt2_tokenizer)}


def close(x: float, y: float, rel: float = REL) -> bool:
    return math.isclose(x, y, rel_tol=rel, abs_tol=1e-6)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "max_length,stride,batch_size",
    [(16, 16, 1), (16, 16, 5), (32, 8, 3), (64, 64, 8), (64, 17, 2), (8, 1, 16)],
)
def test_document_mode_matches_reference(models, data_file, texts, name, max_length, stride, batch_size):
    model_dir, model, tokenizer = models[name]
    res = run(model_dir, data_file, max_length=max_length, stride=stride, batch_size=batch_size, id_field="title")
    prefix = res.summary["settings"]["prefix_token_id"]
    assert prefix == (tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)
    by_index = {d.index: d for d in res.documents}
    assert sorted(by_index) == list(range(len(texts)))
    total_nll, total_tokens, total_bytes, total_words = 0.0, 0, 0, 0
    for i, text in enumerate(texts):
        nll, count = reference_document(model, tokenizer, text, prefix, max_length, stride)
        if not text.strip():  # whitespace only: an empty document, its tokens not scored
            nll, count = 0.0, 0
        doc = by_index[i]
        assert doc.id == f"doc{i}"
        assert doc.tokens == count, (i, text[:30])
        assert close(doc.nll_sum, nll), (i, doc.nll_sum, nll)
        if count == 0:
            assert doc.skipped == "empty"
        else:
            assert doc.skipped is None
            total_nll, total_tokens = total_nll + nll, total_tokens + count
            total_bytes += len(text.encode("utf-8"))
            total_words += len(__import__("re").split(r"\s+", text))
    counts = res.summary["counts"]
    assert counts["tokens"] == total_tokens
    assert counts["documents"] == sum(1 for t in texts if t.strip()) and counts["skipped_documents"] == 2
    assert counts["bytes"] == total_bytes and counts["words"] == total_words
    assert close(res.summary["nll_sum"], total_nll)
    m = res.summary["metrics"]
    assert close(m["mean_loss"], total_nll / total_tokens)
    assert close(m["perplexity"], math.exp(total_nll / total_tokens))
    assert close(m["bits_per_token"], total_nll / total_tokens / math.log(2))
    assert close(m["bits_per_byte"], total_nll / total_bytes / math.log(2))
    assert close(m["byte_perplexity"], math.exp(total_nll / total_bytes))
    assert close(m["word_perplexity"], math.exp(total_nll / total_words))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("max_length,stride,batch_size", [(16, 16, 1), (32, 8, 4), (64, 32, 3), (20, 7, 9)])
def test_stream_mode_matches_reference(models, data_file, texts, name, max_length, stride, batch_size):
    model_dir, model, tokenizer = models[name]
    res = run(model_dir, data_file, mode="stream", max_length=max_length, stride=stride, batch_size=batch_size)
    nll, count = reference_stream(model, tokenizer, texts, max_length, stride)
    assert res.summary["settings"]["prefix_token_id"] is None
    assert res.summary["counts"]["tokens"] == count
    assert close(res.summary["nll_sum"], nll)
    assert res.summary["counts"]["bytes"] == len("\n\n".join(texts).encode("utf-8"))


def test_stream_mode_close_to_transformers_recipe(models, data_file, texts):
    """The docs recipe weights each window's mean by (targets - 1): close to, not equal to, the exact mean."""
    model_dir, model, tokenizer = models["llama"]
    res = run(model_dir, data_file, mode="stream", max_length=64, stride=32)
    recipe = reference_transformers_recipe(model, tokenizer, [t for t in texts if t], 64, 32)
    assert abs(math.log(res.summary["metrics"]["perplexity"]) - math.log(recipe)) < 0.01


@pytest.mark.parametrize(
    "fields",
    [
        dict(batch_size=1),
        dict(batch_size=7),
        dict(batch_size=7, padding_side="left"),
        dict(batch_size=3, padding_side="left", token_budget=70),
        dict(batch_size=16, chunk_documents=3),
    ],
)
def test_batching_and_padding_do_not_change_the_result(models, data_file, fields):
    model_dir = models["llama"][0]
    base = run(model_dir, data_file, max_length=48, stride=20, batch_size=2)
    other = run(model_dir, data_file, max_length=48, stride=20, **fields)
    assert other.summary["counts"]["tokens"] == base.summary["counts"]["tokens"]
    assert close(other.summary["nll_sum"], base.summary["nll_sum"], 1e-6)
    for a, b in zip(base.documents, other.documents):
        assert a.index == b.index and a.tokens == b.tokens and close(a.nll_sum, b.nll_sum, 1e-5)


def test_padding_is_counted(models, data_file):
    res = run(models["llama"][0], data_file, max_length=64, batch_size=8)
    c = res.summary["counts"]
    assert c["padding_tokens"] > 0
    assert c["input_tokens"] >= c["tokens"]


def test_prompt_field_scores_only_the_text(models, tmp_path):
    model_dir, model, tokenizer = models["llama"]
    rows = [
        {"q": "Question: what is two plus two?\nAnswer:", "a": " four, of course."},
        {"q": "Translate to French: cat ", "a": "chat"},
        {"q": "A long preamble. " * 12, "a": "The end of a long conditional text, " * 3},
    ]
    path = make_jsonl(tmp_path / "qa.jsonl", rows)
    res = run(model_dir, path, text_field="a", prompt_field="q", max_length=32, stride=32)
    prefix = res.summary["settings"]["prefix_token_id"]
    for doc, row in zip(res.documents, rows):
        nll, count = reference_document(model, tokenizer, row["a"], prefix, 32, 32, prompt=row["q"])
        assert doc.tokens == count and close(doc.nll_sum, nll)
    assert res.summary["counts"]["bytes"] == sum(len(r["a"].encode()) for r in rows)


def test_prefix_token_none_skips_one_token_documents(models, tmp_path):
    model_dir, model, tokenizer = models["llama"]
    path = make_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "Hello world, hello again."}])
    res = run(model_dir, path, prefix_token="none", max_length=16)
    assert res.documents[0].skipped == "empty"
    nll, count = reference_document(model, tokenizer, "Hello world, hello again.", None, 16, 16)
    assert res.documents[1].tokens == count and close(res.documents[1].nll_sum, nll)


def test_join_by_and_limit(models, tmp_path):
    model_dir, model, tokenizer = models["llama"]
    rows = [{"book": "A", "ch": 1, "text": "one"}, {"book": "A", "ch": 1, "text": "two"}, {"book": "A", "ch": 2, "text": "three"},
            {"book": "B", "ch": 1, "text": "four"}]
    path = make_jsonl(tmp_path / "v.jsonl", rows)
    res = run(model_dir, path, join_by=["book", "ch"], limit=2, group_field="book")
    assert [d.id for d in res.documents] == ["A 1", "A 2"]
    prefix = res.summary["settings"]["prefix_token_id"]
    nll, count = reference_document(model, tokenizer, "one two", prefix, 256, 256)
    assert res.documents[0].tokens == count and close(res.documents[0].nll_sum, nll)


def test_batches_hold_every_window_once_with_little_padding():
    import random

    import torch

    from lm_ce.scoring.windows import MAX_PADDING, Window, plan_batches

    rng = random.Random(0)
    seq = torch.zeros(600, dtype=torch.long)
    windows = [Window(i, seq, 0, 0, rng.randint(1, 512), 0) for i in range(300)]
    batches = plan_batches(windows, batch_size=8, token_budget=2048)
    assert sorted(w.doc for b in batches for w in b) == list(range(300))
    for b in batches:
        width = max(w.length for w in b)
        assert len(b) <= 8 and len(b) * width <= 2048
        assert len(b) * width - sum(w.length for w in b) <= MAX_PADDING * len(b) * width
