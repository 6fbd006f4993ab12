"""The cross-entropy tutorial this project grew from (shared/seeds/000_*.txt), as tests of lm_ce.loss.

With Head(weight=eye(C)) the hidden states are the logits, so the tutorial's numbers go straight
through token_losses. Then the same definitions are checked on real (tiny) causal LMs.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lm_ce.scoring.head import (
    CHUNK_BYTES,
    COLUMN_ALIGN,
    Head,
    chunk_rows,
    head_of,
    logits_losses,
    tile_columns,
    token_losses,
)

TUTORIAL_LOGITS = [[2.0, 0.5, 0.1], [0.1, 0.2, 0.9]]
TUTORIAL_TARGETS = [0, 2]
TUTORIAL_SOFTMAX = [[0.7285, 0.1625, 0.1090], [0.2309, 0.2552, 0.5139]]
TUTORIAL_LOG_SOFTMAX = [[-0.3168, -1.8168, -2.2168], [-1.4657, -1.3657, -0.6657]]
TUTORIAL_NLL = [0.3168, 0.6657]
TUTORIAL_MEAN = 0.4913


def identity_losses(logits, targets, **kwargs):
    """token_losses with the identity head: hidden == logits."""
    logits = torch.as_tensor(logits, dtype=torch.float32)
    targets = torch.as_tensor(targets, dtype=torch.long)
    return token_losses(logits, targets, Head(weight=torch.eye(logits.shape[1])), **kwargs)


def assert_4dp(actual, expected):
    """Equal after rounding to the tutorial's 4 decimals."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert torch.equal(torch.round(actual, decimals=4), expected), (actual, expected)


# --- the worked example (代码讲解) ---------------------------------------------------------------


def test_worked_example_per_token_and_mean():
    out = identity_losses(TUTORIAL_LOGITS, TUTORIAL_TARGETS, want_top1=True)
    assert out.nll.dtype == torch.float32 and out.nll.shape == (2,)
    assert_4dp(out.nll, TUTORIAL_NLL)
    assert_4dp(out.nll.mean(), TUTORIAL_MEAN)
    assert out.top1.tolist() == [0, 2]
    # and PyTorch's own cross_entropy, which the tutorial decomposes
    expected = F.cross_entropy(torch.tensor(TUTORIAL_LOGITS), torch.tensor(TUTORIAL_TARGETS), reduction="none")
    torch.testing.assert_close(out.nll, expected, rtol=1e-6, atol=1e-6)


def test_worked_example_intermediate_steps():
    """Steps 1-3: softmax, log_softmax, and -log_softmax[target], recovered from our nll of every class."""
    logits = torch.tensor(TUTORIAL_LOGITS).repeat_interleave(3, dim=0)  # each row once per class
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    nll = identity_losses(logits, targets).nll.view(2, 3)
    assert_4dp(-nll, TUTORIAL_LOG_SOFTMAX)  # step 2
    assert_4dp(torch.exp(-nll.double()), TUTORIAL_SOFTMAX)  # step 1
    assert torch.exp(-nll.double()).sum(dim=1).sub(1).abs().max() < 1e-6  # a distribution per row
    step3 = -(-nll)[range(2), TUTORIAL_TARGETS]
    assert_4dp(step3, TUTORIAL_NLL)
    torch.testing.assert_close(-nll, F.log_softmax(torch.tensor(TUTORIAL_LOGITS), dim=1), rtol=0, atol=1e-6)


def test_worked_example_logits_losses():
    out = logits_losses(torch.tensor(TUTORIAL_LOGITS), torch.tensor(TUTORIAL_TARGETS), want_top1=True)
    assert_4dp(out.nll, TUTORIAL_NLL)
    assert out.top1.tolist() == [0, 2]
    assert logits_losses(torch.tensor(TUTORIAL_LOGITS), torch.tensor(TUTORIAL_TARGETS)).top1 is None


# --- the formulas (定义) ---------------------------------------------------------------------------


def test_single_sample_one_hot_formula():
    """H(P, Q) = -sum_i P(i) log Q(i) with one-hot P is our nll of the true class."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        c = int(torch.randint(2, 40, (1,), generator=gen))
        logits = torch.randn(1, c, generator=gen, dtype=torch.float64) * 4
        target = int(torch.randint(0, c, (1,), generator=gen))
        p = torch.zeros(c, dtype=torch.float64)
        p[target] = 1.0
        q = torch.softmax(logits[0], dim=0)
        h = -(p * torch.log(q)).sum().item()
        nll = identity_losses(logits.float(), [target]).nll.item()
        assert nll == pytest.approx(h, rel=1e-5, abs=1e-6)


def test_single_sample_guess_a_word():
    """猜一个单词: Q = {cat: 0.7, dog: 0.2, bird: 0.1}, the target cat costs -log(0.7)."""
    q = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    logits = torch.log(q).float()  # softmax(log q) = q
    for target, prob in enumerate([0.7, 0.2, 0.1]):
        assert identity_losses(logits, [target]).nll.item() == pytest.approx(-math.log(prob), rel=1e-6)
    assert identity_losses(logits, [0]).nll.item() == pytest.approx(0.35667494, rel=1e-6)


def test_single_sample_soft_target_distribution():
    """With a hand-made (non one-hot) P, H(P, Q) = sum_i P(i) nll(i): the formula is linear in P."""
    logits = torch.tensor([[1.5, -0.3, 0.0, 2.2]], dtype=torch.float64)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    h = -(p * torch.log_softmax(logits[0], dim=0)).sum().item()
    nll = identity_losses(logits.repeat(4, 1).float(), [0, 1, 2, 3]).nll.double()
    assert (p * nll).sum().item() == pytest.approx(h, rel=1e-6)
    # cross-entropy is smallest when Q equals P: then it is the entropy of P
    entropy = -(p * torch.log(p)).sum().item()
    nll_pp = identity_losses(torch.log(p).repeat(4, 1).float(), [0, 1, 2, 3]).nll.double()
    assert (p * nll_pp).sum().item() == pytest.approx(entropy, rel=1e-6)
    assert h > entropy


@pytest.mark.parametrize("z", [-30.0, -5.0, -1.0, -0.25, 0.0, 0.3, 2.0, 10.0, 30.0])
@pytest.mark.parametrize("y", [0, 1])
def test_binary_formula(z, y):
    """-[y log(ŷ) + (1-y) log(1-ŷ)] with ŷ = sigmoid(z) is our 2-class nll with logits [0, z]."""
    y_hat = 1.0 / (1.0 + math.exp(-z))
    if y == 1:
        expected = -math.log(y_hat)
    else:
        expected = -math.log1p(-y_hat) if y_hat < 0.5 else z + math.log1p(math.exp(-z))  # -log(1-ŷ), stably
    nll = identity_losses([[0.0, z]], [y]).nll.item()
    assert nll == pytest.approx(expected, rel=1e-6, abs=1e-6)
    bce = F.binary_cross_entropy_with_logits(torch.tensor(z, dtype=torch.float64), torch.tensor(float(y), dtype=torch.float64))
    assert nll == pytest.approx(bce.item(), rel=1e-6, abs=1e-6)


def test_batch_mean_formula():
    """L = -(1/N) sum_j sum_i y_ji log ŷ_ji = (1/N) sum_j H(P_j, Q_j) = mean of our per-row nll."""
    gen = torch.Generator().manual_seed(1)
    n, c = 64, 50
    logits = torch.randn(n, c, generator=gen) * 3
    targets = torch.randint(0, c, (n,), generator=gen)
    nll = identity_losses(logits, targets).nll
    one_hot = F.one_hot(targets, c).double()
    log_q = torch.log_softmax(logits.double(), dim=1)
    per_row = -(one_hot * log_q).sum(dim=1)
    torch.testing.assert_close(nll.double(), per_row, rtol=1e-5, atol=1e-5)
    batch = per_row.mean().item()
    assert batch == pytest.approx(F.cross_entropy(logits.double(), targets).item(), rel=1e-12)
    assert nll.mean().item() == pytest.approx(batch, rel=1e-5)


def test_generative_lm_formula(tiny_llama, llama_tokenizer, texts):
    """H = -(1/N) sum_i log P(w_i | w_<i): our head + token_losses on the final hidden states."""
    model, tok = tiny_llama, llama_tokenizer
    ids = torch.tensor([[tok.bos_token_id] + tok(texts[8]).input_ids[:60]])
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state[0, :-1]
        logits = model(ids).logits
        hf_loss = model(ids, labels=ids).loss.item()
    out = token_losses(hidden, ids[0, 1:], head_of(model), want_top1=True)
    log_p = torch.log_softmax(logits[0, :-1].double(), dim=-1).gather(1, ids[0, 1:, None]).squeeze(1)
    torch.testing.assert_close(out.nll.double(), -log_p, rtol=1e-5, atol=1e-5)
    assert out.nll.mean().item() == pytest.approx(-log_p.mean().item(), rel=1e-5)
    assert out.nll.mean().item() == pytest.approx(hf_loss, rel=1e-5)
    assert torch.equal(out.top1, logits[0, :-1].argmax(-1))
    assert out.nll.std() > 0.5  # the fixture is far from uniform: a wrong target would show


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_head_of_reproduces_model_logits(request, fixture, llama_tokenizer, texts):
    model = request.getfixturevalue(fixture)
    ids = torch.tensor([llama_tokenizer(texts[9]).input_ids[:50]])
    assert_head_reproduces(model, ids)


# --- the implementation: chunking and head transforms ------------------------------------------


def random_problem(n=37, h=16, v=101, seed=2):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * 0.7
    targets = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, targets


def test_chunking_invariance():
    hidden, weight, targets = random_problem()
    head = Head(weight)
    full = hidden.double() @ weight.double().t()
    expected = torch.logsumexp(full, -1) - full.gather(1, targets[:, None]).squeeze(1)
    results = {rows: token_losses(hidden, targets, head, rows=rows, want_top1=True) for rows in (1, 3, 16, 36, 37, 500, None)}
    for rows, out in results.items():
        assert out.nll.shape == (37,) and out.nll.dtype == torch.float32
        torch.testing.assert_close(out.nll, results[None].nll, rtol=1e-6, atol=1e-6, msg=f"rows={rows}")
        torch.testing.assert_close(out.nll.double(), expected, rtol=1e-5, atol=1e-5, msg=f"rows={rows}")
        assert torch.equal(out.top1, full.argmax(-1)), rows
    assert token_losses(hidden, targets, head).top1 is None
    # vocabulary slices: log-sum-exps combined across slices, the target and top-1 found in their slice
    for rows, cols in ((1, 1), (3, 7), (16, 50), (37, 99), (None, 1000)):
        out = token_losses(hidden, targets, head, rows=rows, want_top1=True, vocab_block=cols)
        torch.testing.assert_close(out.nll.double(), expected, rtol=1e-5, atol=1e-5, msg=f"rows={rows} cols={cols}")
        assert torch.equal(out.top1, full.argmax(-1)), (rows, cols)
    torch.testing.assert_close(logits_losses(hidden @ weight.t(), targets).nll, results[None].nll, rtol=1e-6, atol=1e-6)


def test_slice_of_masked_vocabulary():
    """A vocabulary slice whose logits are all -inf (a bias masking tokens) adds nothing, and is no NaN."""
    hidden, weight, targets = random_problem(seed=6)
    bias = torch.zeros(weight.shape[0])
    bias[:40] = float("-inf")  # the first slices of 13 and 20 logits are masked whole
    targets = targets.clamp(min=40)
    head = Head(weight, bias=bias)
    ref = head_reference_logits(hidden, weight, bias)
    expected = torch.logsumexp(ref, -1) - ref.gather(1, targets[:, None]).squeeze(1)
    for cols in (13, 20, None):
        out = token_losses(hidden, targets, head, rows=5, want_top1=cols == 13, vocab_block=cols)
        assert torch.isfinite(out.nll).all(), cols
        torch.testing.assert_close(out.nll.double(), expected, rtol=1e-5, atol=1e-5, msg=f"cols={cols}")


def test_empty_input():
    hidden, weight, targets = random_problem(n=0)
    out = token_losses(hidden, targets, Head(weight), rows=4, want_top1=True)
    assert out.nll.shape == (0,) and out.top1.shape == (0,)


def test_chunk_rows():
    assert chunk_rows(50_000) * 4 * 50_000 <= CHUNK_BYTES
    assert chunk_rows(50_000) == CHUNK_BYTES // (4 * 50_000)
    assert chunk_rows(32_000, chunk_bytes=4 * 32_000 * 100) == 100
    assert chunk_rows(10**9) == 16  # never fewer than 16 rows


def head_reference_logits(hidden, weight, bias=None, scale=1.0, softcap=None):
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bias": True},
        {"scale": 0.0625},
        {"scale": 1 / 4.0},
        {"scale": 3.0},
        {"softcap": 2.0},
        {"softcap": 30.0},
        {"bias": True, "scale": 2.0, "softcap": 3.0},
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_head_transforms(kwargs):
    hidden, weight, targets = random_problem(seed=3)
    weight = weight * 3  # logits well past small caps
    bias = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(4)) if kwargs.get("bias") else None
    scale, softcap = kwargs.get("scale", 1.0), kwargs.get("softcap")
    head = Head(weight, bias=bias, scale=scale, softcap=softcap)
    ref = head_reference_logits(hidden, weight, bias, scale, softcap)
    torch.testing.assert_close(head.logits(hidden).double(), ref, rtol=1e-5, atol=1e-5)
    expected = torch.logsumexp(ref, -1) - ref.gather(1, targets[:, None]).squeeze(1)
    out = token_losses(hidden, targets, head, rows=5, want_top1=True)
    torch.testing.assert_close(out.nll.double(), expected, rtol=1e-5, atol=1e-5)
    sliced = token_losses(hidden, targets, head, rows=5, vocab_block=13)  # bias, scale and cap per slice
    torch.testing.assert_close(sliced.nll.double(), expected, rtol=1e-5, atol=1e-5)
    # a saturated cap makes float32 ties (tanh == 1): top1 must be a maximum, not a particular one
    assert (ref.gather(1, out.top1[:, None]).squeeze(1) >= ref.max(-1).values - 1e-5).all()
    # the transform matters: a plain head gives other losses
    plain = token_losses(hidden, targets, Head(weight)).nll
    assert (plain - out.nll).abs().max() > 1e-2
    # the head must not modify its inputs
    assert torch.equal(hidden, random_problem(seed=3)[0])


def test_head_half_precision_hidden_uses_float32_logits():
    hidden, weight, targets = random_problem(seed=5, h=64)
    hidden, weight = hidden.bfloat16(), (weight * 3).bfloat16()
    head = Head(weight)
    logits = head.logits(hidden)
    assert logits.dtype == torch.float32
    ref = hidden.double() @ weight.double().t()  # exact products of the bfloat16 values
    torch.testing.assert_close(logits.double(), ref, rtol=1e-5, atol=1e-5)
    expected = torch.logsumexp(ref, -1) - ref.gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(token_losses(hidden, targets, head, rows=7).nll.double(), expected, rtol=1e-5, atol=1e-5)


def assert_head_reproduces(model, ids):
    """head_of(model) applied to the final hidden states gives the model's log_softmax at every position."""
    head = head_of(model)
    assert head is not None
    with torch.no_grad():
        hidden = model.base_model(ids).last_hidden_state[0]
        model_logits = model(ids).logits[0]
    ref = torch.log_softmax(model_logits.double(), dim=-1)
    mine = torch.log_softmax(head.logits(hidden).double(), dim=-1)
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
    out = token_losses(hidden[:-1], ids[0, 1:], head, rows=7)
    torch.testing.assert_close(out.nll.double(), -ref[:-1].gather(1, ids[0, 1:, None]).squeeze(1), rtol=1e-5, atol=1e-5)
    return head, hidden, model_logits


def test_gemma_softcap_head(tiny_gemma_softcap, llama_tokenizer, texts):
    model = tiny_gemma_softcap
    ids = torch.tensor([[llama_tokenizer.bos_token_id] + llama_tokenizer(texts[9]).input_ids[:50]])
    head, hidden, model_logits = assert_head_reproduces(model, ids)
    assert head.softcap == 5.0
    assert model_logits.abs().max() < 5.0
    raw = Head(head.weight, head.bias, head.scale, None).logits(hidden)
    assert raw.abs().max() > 7.5  # the cap bites: without it the losses differ
    uncapped = token_losses(hidden[:-1], ids[0, 1:], Head(head.weight)).nll
    capped = token_losses(hidden[:-1], ids[0, 1:], head).nll
    assert (uncapped - capped).abs().max() > 0.1


def _tiny(config_cls, model_cls, **kwargs):
    config = config_cls(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **kwargs,
    )
    torch.manual_seed(5)
    return model_cls(config).eval()


@pytest.mark.parametrize("arch", ["cohere", "granite", "gemma3"])
def test_head_of_scaled_and_capped_architectures(arch):
    import transformers

    if arch == "cohere":
        names, kwargs, attr, value = ("CohereConfig", "CohereForCausalLM"), {"logit_scale": 2.5}, "scale", 2.5
    elif arch == "granite":
        names, kwargs, attr, value = ("GraniteConfig", "GraniteForCausalLM"), {"logits_scaling": 4.0}, "scale", 0.25
    else:
        names, kwargs, attr, value = (
            ("Gemma3TextConfig", "Gemma3ForCausalLM"),
            {"final_logit_softcapping": 3.0, "head_dim": 8},
            "softcap",
            3.0,
        )
    if not all(hasattr(transformers, n) for n in names):
        pytest.skip(f"transformers has no {names[1]}")
    model = _tiny(getattr(transformers, names[0]), getattr(transformers, names[1]), **kwargs)
    ids = torch.randint(3, 97, (1, 24), generator=torch.Generator().manual_seed(6))
    head, _, _ = assert_head_reproduces(model, ids)
    assert getattr(head, attr) == pytest.approx(value)


def test_head_of_non_linear_output_is_none():
    class NoLinearHead(torch.nn.Module):
        def get_output_embeddings(self):
            return None

    assert head_of(NoLinearHead()) is None


@pytest.mark.parametrize("rows", [1, 7, 600, 2041, 2048, 5000])
def test_tile_columns_are_aligned_and_within_the_tile(rows):
    cols = tile_columns(rows)
    assert cols % COLUMN_ALIGN == 0 and cols >= 1024
    assert rows * cols * 4 <= max(CHUNK_BYTES, rows * 1024 * 4)  # about one tile of float32 logits, never more
    assert tile_columns(2041) == 1024  # 8 MB / (4 x 2041) is 1027: rounded down to an aligned width


def test_losses_do_not_depend_on_the_tile_width():
    hidden, weight, targets = random_problem(n=300, v=5000)  # several slices at each width
    head = Head(weight)
    base = token_losses(hidden, targets, head, want_top1=True)
    for block in (1027, 4096):
        out = token_losses(hidden, targets, head, want_top1=True, vocab_block=block)
        assert torch.allclose(out.nll, base.nll, rtol=1e-5, atol=1e-5) and torch.equal(out.top1, base.top1)
