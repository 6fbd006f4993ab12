"""Tests that make tests/reference.py trustworthy: window properties, the spec's rules, hand computations."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from .reference import (
    as_float64,
    document_sequence,
    document_windows,
    encode,
    reference_document,
    reference_nll,
    reference_stream,
    reference_transformers_recipe,
    stream_windows,
    transformers_recipe_steps,
)

N_SEQS = [0, 1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 32, 33, 63, 64, 65, 100, 257]
MAX_LENGTHS = [1, 2, 3, 4, 8, 32, 64]


def document_cases():
    """(n_seq, first_target, max_length, stride) with 1 <= stride <= max_length, prompts short and long."""
    for n_seq, max_length in itertools.product(N_SEQS, MAX_LENGTHS):
        strides = sorted({s for s in (1, 2, max_length // 2, max_length - 1, max_length) if 1 <= s <= max_length})
        firsts = sorted({1, 2, 3, max_length, max_length + 1, 2 * max_length + 3, n_seq - 1, n_seq, n_seq + 2} - {0, -1})
        for stride, first_target in itertools.product(strides, firsts):
            yield n_seq, first_target, max_length, stride


def spec_document_windows(n_seq, first_target, max_length, stride):
    """The document-mode rule exactly as the specification words it (iterative)."""
    a = first_target - 1
    if n_seq - 1 < first_target:
        return []
    b = min(n_seq - 1, max_length) if a < max_length else min(n_seq - 1, a + stride)
    windows = [(max(0, b - max_length), a, b)]
    while b != n_seq - 1:
        a, b = b, min(n_seq - 1, b + stride)
        windows.append((max(0, b - max_length), a, b))
    return windows


def scored_targets(windows):
    return [j for _, a, b in windows for j in range(a + 1, b + 1)]


def check_window_shape(windows, max_length):
    for start, a, b in windows:
        assert 0 <= start <= a < b, (start, a, b)
        assert b - start <= max_length  # the input S[start:b] fits
    # windows are ordered and do not overlap in targets
    for (_, _, b_prev), (_, a, _) in zip(windows, windows[1:]):
        assert a >= b_prev


def test_document_windows_properties():
    n_cases = 0
    for n_seq, first_target, max_length, stride in document_cases():
        n_cases += 1
        windows = document_windows(n_seq, first_target, max_length, stride)
        case = (n_seq, first_target, max_length, stride, windows)
        # every target first_target .. n_seq-1 exactly once, in order
        assert scored_targets(windows) == list(range(first_target, n_seq)), case
        check_window_shape(windows, max_length)
        assert windows == spec_document_windows(n_seq, first_target, max_length, stride), case
        for i, (start, a, b) in enumerate(windows):
            # every window's input is as long as allowed: the most context there is
            assert start == max(0, b - max_length), case
            if i > 0:
                assert b - a <= stride, case
                assert a == windows[i - 1][2]
                if b - start == max_length:
                    # input positions whose prediction is not scored (pure context)
                    assert a - start == max_length - (b - a), case
            else:
                assert a == first_target - 1
            if 0 < i < len(windows) - 1:
                assert b - a == stride, case  # only the last window is cut short
    assert n_cases > 1000


def test_document_windows_examples():
    # lm-eval loglikelihood_rolling with a prefix token: S = [bos] + 10 tokens, max_length 4
    assert document_windows(11, 1, 4, 4) == [(0, 0, 4), (4, 4, 8), (6, 8, 10)]
    assert document_windows(11, 1, 4, 2) == [(0, 0, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]
    # prompt longer than a window: the first window ends stride past the prompt
    assert document_windows(12, 7, 4, 2) == [(4, 6, 8), (6, 8, 10), (7, 10, 11)]
    assert document_windows(0, 1, 4, 4) == []
    assert document_windows(1, 1, 4, 4) == []
    assert document_windows(2, 1, 4, 4) == [(0, 0, 1)]
    assert document_windows(5, 5, 4, 4) == []
    with pytest.raises(ValueError):
        document_windows(10, 1, 4, 5)  # stride > max_length would leave targets without context
    with pytest.raises(ValueError):
        document_windows(10, 0, 4, 4)


def recipe_label_targets(n_seq, max_length, stride):
    """Targets whose label survives the docs recipe's -100 mask and the model's internal shift."""
    scored = []
    prev_end = 0
    for begin in range(0, n_seq, stride):
        end = min(begin + max_length, n_seq)
        trg_len = end - prev_end
        labels = list(range(begin, end))
        valid = labels[len(labels) - trg_len:] if trg_len < len(labels) else labels
        scored += [j for j in valid if j != begin]  # the label shift drops the window's first position
        prev_end = end
        if end == n_seq:
            break
    return scored


@pytest.mark.parametrize("max_length", MAX_LENGTHS)
def test_stream_windows_properties(max_length):
    strides = sorted({1, 2, 3, max(1, max_length // 2), max(1, max_length - 1), max_length, max_length + 1, 1000})
    for n_seq, stride in itertools.product(N_SEQS, strides):
        windows = stream_windows(n_seq, max_length, stride)
        case = (n_seq, max_length, stride, windows)
        check_window_shape(windows, max_length)
        targets = scored_targets(windows)
        assert targets == recipe_label_targets(n_seq, max_length, stride), case
        if stride < max_length:
            assert targets == list(range(1, n_seq)), case  # overlapping windows score every token once
        else:
            # disjoint windows: each window's first token has no context and is skipped
            assert targets == [j for j in range(1, n_seq) if j % stride and j % stride < max_length], case
        for i, (start, a, b) in enumerate(windows):
            if stride < max_length:
                assert start == i * stride, case  # no window is dropped
            if i > 0 and stride < max_length and b - start == max_length:
                assert a - start == max_length - (b - a), case


def test_stream_windows_examples():
    assert stream_windows(10, 4, 2) == [(0, 0, 3), (2, 3, 5), (4, 5, 7), (6, 7, 9)]
    assert stream_windows(10, 4, 4) == [(0, 0, 3), (4, 4, 7), (8, 8, 9)]
    assert stream_windows(0, 4, 2) == []
    assert stream_windows(1, 4, 2) == []
    assert stream_windows(2, 4, 2) == [(0, 0, 1)]
    assert stream_windows(3, 4, 100) == [(0, 0, 2)]


def test_tiny_models_depend_on_context(tiny_llama, tiny_gpt2, llama_tokenizer, texts):
    """The fixtures must be sensitive to the context a window gives, or window bugs would go unseen."""
    ids = torch.tensor([encode(llama_tokenizer, texts[9])[:48]])
    for model in (tiny_llama, tiny_gpt2):
        with torch.no_grad():
            full = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
            cut = torch.log_softmax(model(ids[:, 24:]).logits[0, -1].double(), -1)
            lp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(1, ids[0, 1:, None])
        assert (full - cut).abs().max() > 0.1, type(model).__name__
        assert lp.std() > 0.5  # per-token losses vary: distributions far from uniform


def test_tokenizers_add_no_specials(llama_tokenizer, gpt2_tokenizer, texts):
    for tok in (llama_tokenizer, gpt2_tokenizer):
        for text in texts:
            ids = tok(text).input_ids
            assert ids == tok(text, add_special_tokens=False).input_ids
            assert tok.decode(ids) == text  # byte-level: lossless, non-ASCII and emoji included
    assert llama_tokenizer.bos_token == "<s>" and llama_tokenizer.eos_token == "</s>"
    assert llama_tokenizer.pad_token == "<pad>"
    assert gpt2_tokenizer.bos_token_id == gpt2_tokenizer.eos_token_id
    assert gpt2_tokenizer.convert_ids_to_tokens(gpt2_tokenizer.eos_token_id) == "<|endoftext|>"
    assert gpt2_tokenizer.pad_token is None


def test_texts_fixture(texts, llama_tokenizer):
    lengths = [len(encode(llama_tokenizer, t)) for t in texts]
    assert lengths[:2] == [0, 1]
    assert max(lengths) >= 1500 and sum(300 <= n <= 2000 for n in lengths) >= 3
    assert texts == sorted(set(texts), key=texts.index)  # all distinct


def test_reference_nll_single_window_matches_model_loss(tiny_llama, llama_tokenizer):
    seq = [llama_tokenizer.bos_token_id] + encode(llama_tokenizer, "Hello café, 42 times!")
    n = len(seq)
    nll_sum, n_tokens = reference_nll(tiny_llama, seq, [(0, 0, n - 1)])
    assert n_tokens == n - 1
    model64 = as_float64(tiny_llama)
    assert next(model64.parameters()).dtype == torch.float64
    ids = torch.tensor([seq])
    with torch.no_grad():
        loss = model64(ids, labels=ids).loss.item()  # transformers computes this loss in float32
        logp = torch.log_softmax(model64(ids).logits[0].double(), -1)
    assert nll_sum == pytest.approx(loss * (n - 1), rel=2e-6)
    by_hand = -sum(logp[j - 1, seq[j]].item() for j in range(1, n))
    assert nll_sum == pytest.approx(by_hand, rel=1e-12)
    # the float32 model agrees to float32 precision
    with torch.no_grad():
        loss32 = tiny_llama(ids, labels=ids).loss.item()
    assert nll_sum == pytest.approx(loss32 * (n - 1), rel=1e-5)


def test_reference_nll_windows_are_independent_passes(tiny_llama, llama_tokenizer, texts):
    """Scoring targets with a window equals scoring them from a forward pass on exactly that input."""
    seq = encode(llama_tokenizer, texts[9])[:40]
    model64 = as_float64(tiny_llama)
    windows = [(0, 0, 10), (5, 10, 20), (20, 20, 39)]
    nll_sum, n_tokens = reference_nll(tiny_llama, seq, windows)
    assert n_tokens == 10 + 10 + 19
    expected = 0.0
    for start, a, b in windows:
        for j in range(a + 1, b + 1):  # one pass per target: the prediction of S[j] from S[start:j]
            with torch.no_grad():
                logits = model64(torch.tensor([seq[start:j]])).logits[0, -1]
            expected -= torch.log_softmax(logits, -1)[seq[j]].item()
    assert nll_sum == pytest.approx(expected, rel=1e-10)
    # and context matters: the same targets with more context give another value
    longer, n_longer = reference_nll(tiny_llama, seq, [(0, 0, 10), (0, 10, 20), (0, 20, 39)])
    assert n_longer == n_tokens
    assert abs(longer - nll_sum) > 1e-2
    with pytest.raises(ValueError):
        reference_nll(tiny_llama, seq, [(3, 2, 5)])  # start > a: a target without context


def test_as_float64_cache_tracks_weights(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    first = as_float64(model)
    assert as_float64(model) is first
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    second = as_float64(model)
    assert second is not first
    assert torch.equal(second.lm_head.weight, model.lm_head.weight.double())
    assert as_float64(second) is second


def test_document_sequence_prompt_split(llama_tokenizer):
    tok = llama_tokenizer
    text = "the lazy dog."
    seq, first = document_sequence(tok, text, None)
    assert (seq, first) == (encode(tok, text), 1)
    seq, first = document_sequence(tok, text, 0)
    assert (seq, first) == ([0] + encode(tok, text), 1)
    # trailing whitespace of the prompt moves to the text, as lm-eval's _encode_pair does
    seq, first = document_sequence(tok, text, 0, prompt="The quick brown fox jumps over ")
    assert seq == [0] + encode(tok, "The quick brown fox jumps over the lazy dog.")
    assert first == 1 + len(encode(tok, "The quick brown fox jumps over"))
    assert tok.decode(seq[first:]) == " the lazy dog."


def test_reference_document_matches_one_pass_when_it_fits(tiny_llama, llama_tokenizer, texts):
    tok = llama_tokenizer
    text = texts[8]
    seq = [tok.bos_token_id] + encode(tok, text)
    assert 64 < len(seq) < 256
    one_pass, n = reference_nll(tiny_llama, seq, [(0, 0, len(seq) - 1)])
    got, n_got = reference_document(tiny_llama, tok, text, tok.bos_token_id, max_length=256, stride=256)
    assert n_got == n == len(seq) - 1
    assert got == pytest.approx(one_pass, rel=1e-12)
    # with windows shorter than the text, every token is still scored once but with less context
    windowed, n_w = reference_document(tiny_llama, tok, text, tok.bos_token_id, max_length=16, stride=8)
    assert n_w == n
    assert abs(windowed - one_pass) > 1e-2
    # empty documents score nothing
    assert reference_document(tiny_llama, tok, "", tok.bos_token_id, 16, 8) == (0.0, 0)
    assert reference_document(tiny_llama, tok, "a", None, 16, 8) == (0.0, 0)


@pytest.mark.parametrize("max_length, stride", [(16, 16), (16, 8), (16, 5), (16, 1), (8, 12)])
def test_stream_matches_transformers_recipe(tiny_gpt2, gpt2_tokenizer, texts, max_length, stride):
    docs = texts[3:9]
    nll_sum, n_tokens = reference_stream(tiny_gpt2, gpt2_tokenizer, docs, max_length, stride)
    steps = transformers_recipe_steps(tiny_gpt2, gpt2_tokenizer, docs, max_length, stride)
    # the recipe's losses weighted by the tokens each really averaged give the stream sum exactly
    assert sum(n_avg for _, _, n_avg in steps) == n_tokens
    assert sum(loss * n_avg for loss, _, n_avg in steps) == pytest.approx(nll_sum, rel=2e-6)
    ppl = reference_transformers_recipe(tiny_gpt2, gpt2_tokenizer, docs, max_length, stride)
    docs_tokens = sum(k for _, k, _ in steps)
    if stride >= max_length:
        # disjoint windows: the docs' num_loss_tokens is right and the perplexities agree
        assert docs_tokens == n_tokens
        assert ppl == pytest.approx(math.exp(nll_sum / n_tokens), rel=2e-6)
    else:
        # overlapping windows: the docs count each window after the first one token short
        assert docs_tokens == n_tokens - (len(steps) - 1)
        assert ppl != pytest.approx(math.exp(nll_sum / n_tokens), rel=1e-9)
