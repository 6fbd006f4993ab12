"""Comparing two finished runs (lm_ce.paired, `lm-ce compare`): the paired clustered standard error
against numpy, groups, most changed documents, token by token, other tokenizers, and refusals."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from lm_ce.cli import main as cli
from lm_ce.config.fields import Config
from lm_ce.errors import UsageError
from lm_ce.reports import files as report
from lm_ce.reports import paired
from lm_ce.runner import evaluate

from .conftest import make_jsonl, perturbed_copy

Z = 1.959963984540054
MAX_LEN, STRIDE = 32, 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, texts):
    rows = [{"text": t, "title": f"t{i}", "domain": "short" if len(t) < 60 else "long"} for i, t in enumerate(texts)]
    rows += [{"text": t[::-1], "title": f"r{i}", "domain": "reversed"} for i, t in enumerate(texts[8:])]
    rows += [{"text": t.upper(), "title": f"u{i}"} for i, t in enumerate(texts[3:6])]  # no domain: the group (null)
    return make_jsonl(tmp_path_factory.mktemp("paired") / "docs.jsonl", rows)


@pytest.fixture(scope="module")
def perturbed_dir(tiny_llama_dir, tmp_path_factory):
    return perturbed_copy(tiny_llama_dir, tmp_path_factory.mktemp("perturbed"), seed=3, scale=0.05)[0]


@pytest.fixture(scope="module")
def make_run(corpus, tmp_path_factory):
    def run(model: str, **settings) -> str:
        out = tmp_path_factory.mktemp("run")
        fields = dict(data_files=[corpus], id_field="title", group_field="domain", max_length=MAX_LEN, stride=STRIDE,
                      batch_size=4, progress=False, plot=False, output_dir=str(out))
        fields.update(settings)
        report.write(evaluate(Config(model=model, **fields)), str(out), plot=False)
        return str(out)

    return run


@pytest.fixture(scope="module")
def runs(make_run, tiny_llama_dir, perturbed_dir, tiny_gpt2_dir):
    return {"a": make_run(tiny_llama_dir, save_tokens=True), "b": make_run(perturbed_dir, save_tokens=True),
            "gpt2": make_run(tiny_gpt2_dir)}


def documents(run: str) -> pd.DataFrame:
    frame = pd.read_json(f"{run}/documents.jsonl", lines=True)
    return frame[frame["skipped"].isna()]


def paired_se(a: np.ndarray, b: np.ndarray, n: np.ndarray) -> tuple[float, float]:
    d = b - a
    mean = d.sum() / n.sum()
    c = len(d)
    return mean, math.sqrt(c / (c - 1) * ((d - mean * n) ** 2).sum()) / n.sum()


def test_paired_standard_error_matches_numpy(runs):
    c = paired.compare_runs(runs["a"], runs["b"])
    a, b = documents(runs["a"]), documents(runs["b"])
    assert c["same_tokens"] and c["paired_by"] == "documents" and c["notes"] == []
    mean, se = paired_se(a["nll_sum"].to_numpy(), b["nll_sum"].to_numpy(), a["tokens"].to_numpy())
    d = c["delta"]["mean_loss"]
    assert math.isclose(d["value"], mean, rel_tol=1e-9) and math.isclose(d["stderr"], se, rel_tol=1e-9)
    assert d["ci95"] == pytest.approx([mean - Z * se, mean + Z * se], rel=1e-9)
    ra, rb = (json.load(open(f"{r}/results.json")) for r in (runs["a"], runs["b"]))
    assert math.isclose(d["value"], rb["metrics"]["mean_loss"] - ra["metrics"]["mean_loss"], rel_tol=1e-9)
    bits, bse = paired_se(a["nll_sum"].to_numpy() / math.log(2), b["nll_sum"].to_numpy() / math.log(2), a["bytes"].to_numpy())
    assert math.isclose(c["delta"]["bits_per_byte"]["value"], bits, rel_tol=1e-9)
    assert math.isclose(c["delta"]["bits_per_byte"]["stderr"], bse, rel_tol=1e-9)
    bpb_delta = rb["metrics"]["bits_per_byte"] - ra["metrics"]["bits_per_byte"]
    assert math.isclose(c["delta"]["bits_per_byte"]["value"], bpb_delta, rel_tol=1e-9)
    assert c["ln_ppl_ratio"] == {"mean": d["value"], "stderr": d["stderr"]}
    assert math.isclose(c["perplexity_ratio"], rb["metrics"]["perplexity"] / ra["metrics"]["perplexity"], rel_tol=1e-9)


def test_groups_and_most_changed(runs):
    c = paired.compare_runs(runs["a"], runs["b"])
    a, b = documents(runs["a"]), documents(runs["b"])
    names = a["group"].fillna("(null)")  # documents with no group value form the group (null), as in a run's groups
    assert set(c["groups"]) == set(names) and "(null)" in c["groups"]
    assert sum(g["documents"] for g in c["groups"].values()) == len(a)  # the groups add up to the totals
    assert sum(g["tokens_a"] for g in c["groups"].values()) == a["tokens"].sum()
    for name, g in c["groups"].items():
        m = (names == name).to_numpy()
        mean, se = paired_se(a["nll_sum"].to_numpy()[m], b["nll_sum"].to_numpy()[m], a["tokens"].to_numpy()[m])
        assert g["documents"] == m.sum() and math.isclose(g["delta"]["mean_loss"]["value"], mean, rel_tol=1e-9)
        assert math.isclose(g["delta"]["mean_loss"]["stderr"], se, rel_tol=1e-9)
    change = (b["nll_sum"].to_numpy() - a["nll_sum"].to_numpy())
    top = np.argsort(-np.abs(change))[: paired.MOST_CHANGED]
    assert [r["id"] for r in c["most_changed"]] == list(a["id"].to_numpy()[top])
    assert [r["delta_nll_sum"] for r in c["most_changed"]] == pytest.approx(list(change[top]))


def test_token_by_token(runs):
    t = paired.compare_runs(runs["a"], runs["b"])["token_by_token"]
    a, b = pd.read_parquet(f"{runs['a']}/tokens.parquet"), pd.read_parquet(f"{runs['b']}/tokens.parquet")
    assert t["tokens"] == len(a) and "kl_divergence" not in t and t["unit"] == "documents"
    ratio = (b["nll"] - a["nll"]).to_numpy(np.float64)
    assert math.isclose(t["ln_ppl_ratio"]["mean"], ratio.mean(), rel_tol=1e-9)
    assert math.isclose(t["same_top1"]["mean"], np.mean(a["top1_id"] == b["top1_id"]), rel_tol=1e-12)
    dp = np.exp(-b["nll"].to_numpy(np.float64)) - np.exp(-a["nll"].to_numpy(np.float64))
    assert math.isclose(t["delta_p"]["mean"], dp.mean(), rel_tol=1e-9)
    assert t["delta_p"]["median"] == pytest.approx(np.percentile(dp.astype(np.float32), 50), rel=1e-6)
    assert math.isclose(t["b_better"], np.mean(b["nll"] < a["nll"]))
    assert math.isclose(t["corr_ln_p"], np.corrcoef(a["nll"], b["nll"])[0, 1], rel_tol=1e-9)


def test_other_tokenizer_by_bits_per_byte_only(runs):
    c = paired.compare_runs(runs["a"], runs["gpt2"])
    assert not c["same_tokens"] and c["delta"]["mean_loss"] is None and "ln_ppl_ratio" not in c
    assert "bits per byte alone" in c["notes"][0] and "bits per byte alone" in paired.markdown(c)
    a, g = documents(runs["a"]), documents(runs["gpt2"])
    bits, se = paired_se(a["nll_sum"].to_numpy() / math.log(2), g["nll_sum"].to_numpy() / math.log(2), a["bytes"].to_numpy())
    assert math.isclose(c["delta"]["bits_per_byte"]["value"], bits, rel_tol=1e-9)
    assert math.isclose(c["delta"]["bits_per_byte"]["stderr"], se, rel_tol=1e-9)


def test_refusals_name_what_differs(runs, make_run, tiny_llama_dir, write_jsonl, tmp_path):
    other_windows = make_run(tiny_llama_dir, max_length=24, stride=24)
    with pytest.raises(UsageError, match="max_length: 32 vs 24; stride: 16 vs 24"):
        paired.compare_runs(runs["a"], other_windows)
    other_data = make_run(tiny_llama_dir, data_files=[write_jsonl([{"text": "Hello there.", "title": "x", "domain": "d"}])])
    with pytest.raises(UsageError, match="data.files: \\['.* bytes, sha256 .*'\\] vs"):
        paired.compare_runs(runs["a"], other_data)
    copied = tmp_path / "copy" / "same.jsonl"  # the same content elsewhere is the same data
    copied.parent.mkdir()
    copied.write_bytes(open(json.load(open(f"{runs['a']}/results.json"))["data"]["files"][0]["path"], "rb").read())
    same = paired.compare_runs(runs["a"], make_run(tiny_llama_dir, data_files=[str(copied)], save_tokens=True))
    assert same["delta"]["mean_loss"]["value"] == 0.0 and same["token_by_token"]["same_top1"]["mean"] == 1.0
    edited = tmp_path / "edited"
    edited.mkdir()
    for name in ("results.json", "documents.jsonl"):
        (edited / name).write_text(open(f"{runs['b']}/{name}").read())
    rows = [json.loads(line) for line in (edited / "documents.jsonl").read_text().splitlines()]
    rows[9]["bytes"] += 1
    (edited / "documents.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UsageError, match="document 9 differs \\(bytes"):
        paired.compare_runs(runs["a"], str(edited))
    summary = json.loads((edited / "results.json").read_text())
    (edited / "results.json").write_text(json.dumps({**summary, "complete": False}))
    with pytest.raises(UsageError, match="interrupted run"):
        paired.compare_runs(runs["a"], str(edited))
    with pytest.raises(UsageError, match="results.json not found"):
        paired.compare_runs(runs["a"], str(tmp_path / "nowhere"))


def test_command_line(runs, tmp_path, capsys):
    assert cli.main(["compare", runs["a"], runs["b"], "--output-dir", str(tmp_path / "cmp")]) == 0
    written = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert written == json.loads(json.dumps(paired.compare_runs(runs["a"], runs["b"])))
    assert "## By group" in (tmp_path / "cmp" / "comparison.md").read_text()
    assert "B − A" in capsys.readouterr().out
    assert cli.main(["compare", runs["a"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "two run directories" in err[0]


def test_command_line_refusals_are_one_line(runs, tmp_path, capsys):
    """--output-dir a file, and a damaged documents.jsonl: one line and exit 2 (were tracebacks)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    assert cli.main(["compare", runs["a"], runs["b"], "--output-dir", str(a_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a_file is a file, not a directory" in err[0], err
    assert a_file.read_text() == "mine"
    for damage, expected in [(lambda text: text[: len(text) // 2], "documents.jsonl:"), (lambda text: "[1, 2]\n" + text, ":1: not a document row")]:
        broken = tmp_path / f"broken{len(expected)}"
        broken.mkdir()
        (broken / "results.json").write_text(open(f"{runs['b']}/results.json").read())
        (broken / "documents.jsonl").write_text(damage(open(f"{runs['b']}/documents.jsonl").read()))
        assert cli.main(["compare", runs["a"], str(broken)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0] and "rerun that evaluation" in err[0], err


def test_stream_runs_pair_blocks_of_tokens(make_run, tiny_llama_dir, perturbed_dir):
    a = make_run(tiny_llama_dir, mode="stream", save_tokens=True, group_field=None)
    b = make_run(perturbed_dir, mode="stream", save_tokens=True, group_field=None)
    c = paired.compare_runs(a, b)
    ta, tb = pd.read_parquet(f"{a}/tokens.parquet"), pd.read_parquet(f"{b}/tokens.parquet")
    blocks = ta["position"].to_numpy() // STRIDE
    sa = np.bincount(blocks, ta["nll"].to_numpy(np.float64))
    sb = np.bincount(blocks, tb["nll"].to_numpy(np.float64))
    mean, se = paired_se(sa, sb, np.bincount(blocks))
    assert c["paired_by"] == "totals" and "token by token" in c["notes"][0]
    assert math.isclose(c["delta"]["mean_loss"]["value"], mean, rel_tol=1e-9)
    assert math.isclose(c["delta"]["mean_loss"]["stderr"], se, rel_tol=1e-9)
    plain = paired.compare_runs(make_run(tiny_llama_dir, mode="stream", group_field=None),
                                make_run(perturbed_dir, mode="stream", group_field=None))
    assert plain["delta"]["mean_loss"]["stderr"] is None and "only the totals" in plain["notes"][0]
    footer = paired.markdown(plain).rstrip().splitlines()[-1]  # no standard error: the footer does not describe one
    assert "SE²" not in footer and "no paired standard error" in footer, footer
    assert "SE² = C/(C−1)" in paired.markdown(c)
    assert math.isclose(plain["delta"]["mean_loss"]["value"], mean, rel_tol=1e-6)


def test_names_in_comparison_md_are_text_not_html(runs):
    """Model names, directories, notes, groups and ids show in comparison.md as they are (no tag or link renders)."""
    import html

    from .test_report import HOSTILE, rendered

    c = paired.compare_runs(runs["a"], runs["b"])
    c["a"]["model"], c["b"]["directory"], c["notes"] = HOSTILE["model"], HOSTILE["file"], [HOSTILE["other"]]
    c["groups"] = {HOSTILE["group"]: next(iter(c["groups"].values()))}
    c["most_changed"][0].update(id=HOSTILE["underscores"], group=HOSTILE["newline"])
    page = rendered(paired.markdown(c))
    for tag in ("<svg", "<img", "<script", "<a ", "<strong>"):
        assert tag not in page, tag
    text = html.unescape(page)
    assert all(name.replace("\n", "\\n") in text for name in HOSTILE.values())
