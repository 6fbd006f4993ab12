"""lm_ce --mode document with stride == max_length against lm-evaluation-harness's loglikelihood_rolling.

lm-eval is an optional peer (`pip install -e .[peer]`): without it this module is skipped. Its own
code does its side: HFLM.tok_encode, utils.get_rolling_token_windows / make_disjoint_window and
HFLM.loglikelihood_rolling on the same tiny local models (float32, CPU). Per document the token
counts must be equal and lm-eval's summed log-likelihood must be -nll_sum up to float32 rounding.
Nothing is downloaded: the models and tokenizers are conftest's, saved to temporary directories.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # conftest sets it too; never reach the Hub

import pytest

pytest.importorskip("lm_eval")

from lm_eval import utils as lm_eval_utils  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from lm_ce.config.fields import Config  # noqa: E402
from lm_ce.runner import evaluate  # noqa: E402
from lm_ce.scoring.windows import document_spans  # noqa: E402

# Sums of up to ~1800 float32 token losses over windows batched differently on each side.
REL, ABS = 1e-5, 1e-4


def lm_eval_rolling(model_dir: str, texts: list[str], max_length: int, batch_size: int, **hflm_kwargs) -> dict:
    """lm-eval's side: per-document log-likelihoods, scored token counts and window counts, and its prefix token."""
    lm = HFLM(
        pretrained=model_dir, backend="causal", max_length=max_length, batch_size=batch_size,
        device="cpu", dtype="float32", **hflm_kwargs,
    )
    assert lm.max_length == max_length
    requests = [
        Instance(request_type="loglikelihood_rolling", doc={"text": t}, arguments=(t,), idx=i)
        for i, t in enumerate(texts)
    ]
    loglikelihoods = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    tokens, windows = [], []
    for t in texts:
        ids = lm.tok_encode(t) if t else []
        pairs = list(map(lm_eval_utils.make_disjoint_window,
                         lm_eval_utils.get_rolling_token_windows(ids, lm.prefix_token_id, lm.max_length, 1)))
        tokens.append(sum(len(cont) for _, cont in pairs))
        assert tokens[-1] == len(ids)  # every token of the document is predicted exactly once
        windows.append(len(pairs))
    return {"loglikelihoods": loglikelihoods, "tokens": tokens, "windows": windows, "prefix_token_id": lm.prefix_token_id}


def lm_ce_document(model_dir: str, data_file: str, max_length: int, **cfg_kwargs):
    cfg = dict(model=model_dir, data_files=[data_file], text_field="text", max_length=max_length,
               mode="document", batch_size=4, progress=False)
    return evaluate(Config(**{**cfg, **cfg_kwargs}))


def assert_parity(peer: dict, res) -> None:
    docs = res.documents
    assert len(docs) == len(peer["loglikelihoods"])
    for i, (d, ll, n, w) in enumerate(zip(docs, peer["loglikelihoods"], peer["tokens"], peer["windows"])):
        assert d.index == i
        assert d.tokens == n, f"document {i}: lm_ce scored {d.tokens} tokens, lm-eval {n}"
        assert d.windows == w, f"document {i}: lm_ce used {d.windows} windows, lm-eval {w}"
        assert (d.skipped == "empty") == (n == 0), f"document {i}: skipped={d.skipped!r} with {n} lm-eval tokens"
        assert d.nll_sum == pytest.approx(-ll, rel=REL, abs=ABS), f"document {i} ({n} tokens)"
    assert res.summary["counts"]["tokens"] == sum(peer["tokens"])
    assert res.summary["counts"]["windows"] == sum(peer["windows"])
    assert res.summary["nll_sum"] == pytest.approx(-sum(peer["loglikelihoods"]), rel=REL, abs=ABS)
    assert res.summary["settings"]["prefix_token_id"] == peer["prefix_token_id"]
    assert res.summary["settings"]["stride"] == res.summary["settings"]["max_length"]


@pytest.fixture(scope="module")
def parity_texts(texts) -> list[str]:
    """conftest's documents (empty, 1 char, whitespace, short, non-English, ~100 to ~1800 tokens) and two duplicates."""
    return [*texts, texts[3], texts[-3]]


# (max_length, lm-eval batch size): the batch size changes which windows are padded together on lm-eval's side.
LENGTHS = [(16, 4), (32, 1), (64, 4)]


@pytest.mark.parametrize("max_length,peer_batch", LENGTHS, ids=[f"L{L}-bs{b}" for L, b in LENGTHS])
@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_gpt2_dir"], ids=["llama", "gpt2"])
def test_document_mode_matches_loglikelihood_rolling(request, model_fixture, max_length, peer_batch, parity_texts, write_jsonl):
    """llama: <s> bos is the prefix; gpt2: <|endoftext|> is bos and eos at once."""
    model_dir = request.getfixturevalue(model_fixture)
    # lm-eval scores a whitespace-only document's tokens; lm_ce counts it as an empty document (skipped), as lm-eval
    # counts "": compared on "" there
    peer = lm_eval_rolling(model_dir, [t if t.strip() else "" for t in parity_texts], max_length, peer_batch)
    res = lm_ce_document(model_dir, write_jsonl([{"text": t} for t in parity_texts]), max_length)
    assert_parity(peer, res)


def test_prefix_token_choice(tiny_llama_dir, tiny_gpt2_dir, llama_tokenizer, gpt2_tokenizer, write_jsonl):
    """lm-eval's prefix_token_id (bos, else eos) is what lm_ce's --prefix-token auto picks in document mode."""
    path = write_jsonl([{"text": "Hello world."}])
    for model_dir, tok in ((tiny_llama_dir, llama_tokenizer), (tiny_gpt2_dir, gpt2_tokenizer)):
        lm = HFLM(pretrained=model_dir, backend="causal", max_length=16, batch_size=1, device="cpu", dtype="float32")
        res = lm_ce_document(model_dir, path, 16)
        assert lm.prefix_token_id == tok.bos_token_id == res.summary["settings"]["prefix_token_id"]
    assert llama_tokenizer.bos_token_id != llama_tokenizer.eos_token_id
    assert gpt2_tokenizer.bos_token_id == gpt2_tokenizer.eos_token_id


@pytest.mark.parametrize("max_length", [1, 2, 3, 5, 16, 33, 64])
def test_window_rule_matches_get_rolling_token_windows(max_length):
    """document_spans(stride=max_length) builds exactly lm-eval's disjoint rolling windows, every length 0..300."""
    prefix = 0
    for n in range(0, 301):
        tokens = list(range(1, n + 1))
        theirs = [
            (list(ctx), list(cont))
            for ctx, cont in map(lm_eval_utils.make_disjoint_window,
                                 lm_eval_utils.get_rolling_token_windows(tokens, prefix, max_length, 1))
        ]
        seq = [prefix, *tokens]
        ours = [(seq[start : a + 1], seq[a + 1 : b + 1]) for start, a, b in document_spans(len(seq), 1, max_length, max_length)]
        assert ours == theirs, (n, max_length)
        for ctx, cont in ours:  # what lm-eval feeds the model is never truncated
            assert len(ctx) + len(cont) - 1 <= max_length


def test_bos_adding_tokenizer_with_add_bos_token_false(bos_adding_llama_dir, parity_texts, write_jsonl):
    """A tokenizer that adds <s> by itself: lm_ce never lets it (one <s>, as the prefix); lm-eval matches with
    add_bos_token=False. (With lm-eval's default, add_bos_token=None, its tok_encode keeps the tokenizer's <s>
    and prefixes another, so it also scores P(<s> | <s>) and counts one more token per non-empty document.)"""
    peer = lm_eval_rolling(bos_adding_llama_dir, [t if t.strip() else "" for t in parity_texts], 32, 4,
                           add_bos_token=False)  # whitespace only: compared on "", as above
    res = lm_ce_document(bos_adding_llama_dir, write_jsonl([{"text": t} for t in parity_texts]), 32)
    assert_parity(peer, res)
