"""scripts/bench/tables.py: the arithmetic behind the benchmark's limit, whole-process peers, ratios and targets,
on hand-built child records (no model is run)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from bench.tables import check_peer, limit_rate, ratios, summarize, summarize_peer, targets  # noqa: E402


def child(seconds: float, tokens: int = 1000, head: float | None = None, peak: float = 900.0) -> dict:
    result = {"tokens": tokens, "seconds": seconds, "cpu_seconds": 2 * seconds, "threads": 2, "load_seconds": 1.0,
              "memory": {"before_scoring_mb": 500.0, "peak_before_head_mb": peak - 100}}
    if head is not None:
        result["head_matmul"] = {"seconds": head}
    return {"ok": True, "result": result, "ru_maxrss_mb": peak, "wall_seconds": seconds + 5, "load_average": [0.5]}


def cli(wall: float, scoring: float, peak: float, tokens: int = 1000, nll: float = 2000.0) -> dict:
    return {"ok": True, "wall_seconds": wall, "scoring_seconds": scoring, "ru_maxrss_mb": peak, "tokens": tokens,
            "nll_sum": nll, "load_average": [0.5]}


def test_limit_is_the_faster_body_plus_its_head_matmul():
    summary = {"body": summarize([child(4.0, head=1.0)]), "plan-body": summarize([child(3.0, head=1.5)]),
               "lm_ce": summarize([child(5.0)])}
    assert summary["body"]["limit_tokens_per_second"] == pytest.approx(1000 / 5.0)
    assert summary["plan-body"]["limit_tokens_per_second"] == pytest.approx(1000 / 4.5)
    assert limit_rate(summary) == pytest.approx(1000 / 4.5)
    assert summary["body"]["peak_rss_mb"] == 800.0  # the body's own peak, before the head's matmul
    r = ratios({"summary": summary})
    assert r["lm_ce/limit"] == pytest.approx(4.5 / 5.0) and r["lm_ce/body"] == pytest.approx(4.0 / 5.0)
    assert limit_rate({"lm_ce": summary["lm_ce"]}) is None


def test_peers_take_medians_and_the_largest_peak():
    runs = [cli(30, 20, 1800), cli(10, 8, 1900), cli(20, 12, 1700)]
    s = summarize_peer(runs)
    assert (s["wall_seconds"], s["scoring_seconds"], s["ru_maxrss_mb"]) == (20, 12, 1900)
    failed = summarize_peer([{"ok": False, "error": "exit code 1: boom"}])
    assert failed["ok"] is False and "boom" in failed["error"]


def test_baseline_and_lm_eval_ratios_and_targets():
    peer = {"lm_ce_cli": summarize_peer([cli(40, 20, 1800)]), "baseline": summarize_peer([cli(44, 22, 1836)]),
            "lm_eval": summarize_peer([cli(60, 30, 5400)])}
    failures: list[str] = []
    check_peer("gemma-2048", peer, 1e-4, failures)
    assert failures == [] and peer["baseline"]["tokens_equal"]
    r = ratios({"summary": {}, "peer": peer})
    assert r["baseline scoring s/lm_ce scoring s"] == pytest.approx(1.1)
    assert r["baseline MB/lm_ce MB"] == pytest.approx(1.02)
    assert r["lm-eval wall/lm_ce wall"] == pytest.approx(1.5) and r["lm-eval MB/lm_ce MB"] == pytest.approx(3.0)
    got = {t["ratio"]: t["holds"] for t in targets({"cases": {"gemma-2048": {"ratios": r}}}) if t["case"] == "gemma-2048"}
    assert got == {"baseline scoring s/lm_ce scoring s": True, "baseline MB/lm_ce MB": True}
    r["baseline MB/lm_ce MB"] = 0.97
    got = {t["ratio"]: t["holds"] for t in targets({"cases": {"gemma-2048": {"ratios": r}}}) if t["case"] == "gemma-2048"}
    assert got["baseline MB/lm_ce MB"] is False
    short = [t for t in targets({"cases": {}}) if t["case"] == "smollm2-short"]
    assert short and all(t["holds"] is None for t in short)  # not measured is not a pass


@pytest.mark.parametrize("other", [cli(44, 22, 1836, nll=2000.5), cli(44, 22, 1836, tokens=999)])
def test_a_peer_that_scores_other_tokens_or_nll_fails_the_run(other):
    peer = {"lm_ce_cli": summarize_peer([cli(40, 20, 1800)]), "baseline": summarize_peer([other])}
    failures: list[str] = []
    check_peer("gemma-2048", peer, 1e-4, failures)
    assert len(failures) == 1 and "baseline" in failures[0]
