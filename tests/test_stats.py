"""lm_ce.sums.stats against direct numpy computations: clustered and iid standard errors, position buckets,
groups, model comparisons and the capped exponential."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lm_ce.sums.records import DocumentResult
from lm_ce.sums.stats import NULL_GROUP, Z95, Clustered, PositionLoss, exp_capped, groups, uncertainty


def clustered_sample(seed: int, n_clusters: int):
    """Per-token losses in clusters of random sizes (with a shift per cluster, so clustering matters)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 40, n_clusters)
    losses = [rng.gamma(2.0, 1.0, n) + rng.normal(0, 1.5) ** 2 for n in sizes]
    return losses


@pytest.mark.parametrize("seed, n_clusters", [(0, 2), (1, 3), (2, 17), (3, 200)])
def test_clustered_stderr_matches_numpy(seed, n_clusters):
    losses = clustered_sample(seed, n_clusters)
    nll = np.array([x.sum() for x in losses])
    n = np.array([len(x) for x in losses])
    flat = np.concatenate(losses)
    # the ratio estimator's cluster-robust variance, written out directly
    mean = flat.mean()
    residual = nll - mean * n
    se = np.sqrt(n_clusters / (n_clusters - 1) * np.sum(residual**2)) / flat.size
    clusters = Clustered.of([float(v) for v in nll], [int(v) for v in n])
    out = uncertainty(clusters, float(np.sum(flat**2)), "documents")
    assert out["unit"] == "documents" and out["clusters"] == n_clusters
    assert out["mean_loss_stderr"] == pytest.approx(se, rel=1e-9)
    assert out["mean_loss_ci95"] == pytest.approx([mean - 1.959963984540054 * se, mean + 1.959963984540054 * se], rel=1e-9)
    assert out["perplexity_ci95"] == pytest.approx([math.exp(mean - Z95 * se), math.exp(mean + Z95 * se)], rel=1e-9)
    assert out["mean_loss_stderr_iid"] == pytest.approx(np.std(flat, ddof=1) / np.sqrt(flat.size), rel=1e-9)


def test_clustered_stderr_is_wider_than_iid_when_clusters_differ():
    # two clusters of constant loss, 1 and 3: within-cluster variation is zero, between-cluster large
    out = uncertainty(Clustered.of([10.0, 30.0], [10, 10]), 10 * 1.0 + 10 * 9.0, "documents")
    # mean 2; residuals -10, 10; se = sqrt(2 * 200) / 20 = 1
    assert out["mean_loss_stderr"] == pytest.approx(1.0, rel=1e-12)
    # 20 tokens, 10 of 1.0 and 10 of 3.0: sample variance 20/19, iid se sqrt(20/19/20)
    assert out["mean_loss_stderr_iid"] == pytest.approx(math.sqrt(1 / 19), rel=1e-12)


def test_empty_clusters_do_not_count():
    with_empty = uncertainty(Clustered.of([10.0, 0.0, 30.0], [10, 0, 10]), 100.0, "windows")
    without = uncertainty(Clustered.of([10.0, 30.0], [10, 10]), 100.0, "windows")
    assert with_empty == without and with_empty["clusters"] == 2


def test_too_little_for_a_standard_error():
    assert uncertainty(Clustered.of([], []), 0.0, "documents") == {"unit": "documents", "clusters": 0}
    one = uncertainty(Clustered.of([6.0], [3]), 14.0, "windows")  # losses 1, 2, 3: iid only
    assert one == {"unit": "windows", "clusters": 1, "mean_loss_stderr_iid": pytest.approx(math.sqrt(1 / 3))}
    single_token = uncertainty(Clustered.of([2.0], [1]), 4.0, "windows")
    assert single_token == {"unit": "windows", "clusters": 1}


def test_iid_variance_is_never_negative():
    # constant losses: sum_sq - N * mean^2 may round below zero; the stderr is then 0, not a math error
    x = 0.1 + 0.2
    out = uncertainty(Clustered.of([x * 3, x * 3], [3, 3]), 6 * x * x * (1 - 1e-15), "documents")
    assert out["mean_loss_stderr_iid"] == 0.0


def test_position_loss_buckets_by_hand():
    p = PositionLoss.zeros(10)
    p.add(torch.tensor([0, 1, 2, 3, 3, 5, 9]), torch.tensor([1.0, 2.0, 3.0, 5.0, 7.0, 4.0, 0.5]))
    p.add(torch.tensor([0]), torch.tensor([3.0], dtype=torch.float16))  # summed in float64 whatever comes in
    assert p.count.tolist() == [2, 1, 1, 2, 0, 1, 0, 0, 0, 1]
    assert p.nll.dtype == torch.float64 and p.nll.tolist() == [4.0, 2.0, 3.0, 12.0, 0, 4.0, 0, 0, 0, 0.5]
    rows = p.buckets()  # [0], [1], [2, 3], [4, 7], [8, 9]
    assert [r["positions"] for r in rows] == [[0, 0], [1, 1], [2, 3], [4, 7], [8, 9]]
    assert [r["tokens"] for r in rows] == [2, 1, 3, 1, 1]
    assert [r["mean_loss"] for r in rows] == [2.0, 2.0, 5.0, 4.0, 0.5]
    assert [r["perplexity"] for r in rows] == [math.exp(v) for v in (2.0, 2.0, 5.0, 4.0, 0.5)]


def test_position_loss_skips_empty_buckets():
    p = PositionLoss.zeros(20)
    p.add(torch.tensor([17]), torch.tensor([1.5]))
    assert p.buckets() == [{"positions": [16, 19], "tokens": 1, "mean_loss": 1.5, "perplexity": math.exp(1.5)}]
    assert PositionLoss.zeros(5).buckets() == []


def test_groups_by_hand():
    docs = [
        DocumentResult(0, group="a", tokens=4, nll_sum=8.0, bytes=10),
        DocumentResult(1, group="b", tokens=2, nll_sum=1.0, bytes=0),
        DocumentResult(2, group="a", tokens=6, nll_sum=4.0, bytes=30),
        DocumentResult(3, group="a", skipped="empty"),
        DocumentResult(4, group=None, tokens=5, nll_sum=5.0, bytes=5),
    ]
    out = groups(docs)
    assert list(out) == ["a", "b", NULL_GROUP]  # no group value: a group of its own, so the groups add up
    assert sum(g["tokens"] for g in out.values()) == 4 + 2 + 6 + 5
    assert (out[NULL_GROUP]["documents"], out[NULL_GROUP]["nll_sum"]) == (1, 5.0)
    a = out["a"]
    assert (a["documents"], a["tokens"], a["bytes"], a["nll_sum"]) == (2, 10, 40, 12.0)
    assert a["mean_loss"] == 1.2 and a["perplexity"] == math.exp(1.2)
    assert a["bits_per_byte"] == pytest.approx(12.0 / 40 / math.log(2), rel=1e-15)
    assert out["b"]["mean_loss"] == 0.5 and out["b"]["bits_per_byte"] is None  # no bytes: no bits per byte


def test_exp_capped():
    assert exp_capped(0.0) == 1.0
    assert exp_capped(2.5) == math.exp(2.5)
    assert exp_capped(699.0) == math.exp(699.0)
    assert exp_capped(700.0) == math.inf and exp_capped(1e6) == math.inf  # math.exp would raise beyond ~709.78
    assert exp_capped(-1e6) == 0.0
