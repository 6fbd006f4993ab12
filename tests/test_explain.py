"""`lm-ce explain`: the chain of states between two protocols (explain/chain.py), the steps' log Δs and paired
standard errors (explain/figures.py, sums/stats.ratio_difference), and whole chains on tiny models: the steps add up
to the ends' difference, each end is the protocol's own run, the chunk runs are exact subsets of the stream runs
before them, one model load, resumable."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest

from lm_ce.cli import main as cli
from lm_ce.config.sources import config_for
from lm_ce.errors import UsageError
from lm_ce.explain.chain import Endpoint, plan
from lm_ce.runner import evaluate
from lm_ce.sums.stats import paired, ratio_difference

from . import bytes_reference as ref
from .conftest import make_jsonl, stop_at_batch

L = 32


def order_of(a: str, b: str, *, bos=False, metrics=("perplexity", "perplexity"), order=None, length=2048):
    states, used = plan(Endpoint.parse(a, "--from"), Endpoint.parse(b, "--to"), default_length=length, adds_bos=bos,
                        metrics=metrics, order=order)
    return used, states


@pytest.mark.parametrize("a,b,bos,want", [
    ("lm-eval", "gptq", False, ["prefix_token", "join", "chunk_selection"]),
    ("lm-eval", "gptq", True, ["prefix_token", "join", "chunk_selection"]),
    ("hf-docs", "llama-cpp", False, ["window_length", "chunk_selection"]),
    ("hf-docs", "llama-cpp", True, ["window_length", "prefix_token", "bos_sink", "chunk_selection"]),
    ("lm-eval", "llama-cpp", False, ["window_length", "stride", "prefix_token", "join", "chunk_selection"]),
    ("gptq", "lm-eval", False, ["chunk_selection", "join", "prefix_token"]),
    ("lm-eval", "hf-docs", False, ["stride", "prefix_token", "join"]),
])
def test_default_orders(a, b, bos, want):
    used, states = order_of(a, b, bos=bos)
    assert used == want
    assert states[0].endpoint.protocol == a and states[-1].endpoint.protocol == b
    assert all(s.endpoint is None for s in states[1:-1])


def test_the_join_step_of_a_bos_tokenizer_puts_bos_first_as_gptq_does():
    _, states = order_of("lm-eval", "gptq", bos=True)
    join = states[2].point.fields()
    assert join == {"mode": "stream", "max_length": 2048, "stride": 2048, "prefix_token": "bos", "bos_policy": "first",
                    "detokenizer": "none", "separator": "\n\n", "chunks": None}
    _, states = order_of("hf-docs", "llama-cpp", bos=True, length=1024)
    assert states[1].point.fields()["stride"] == 256 and states[3].point.fields()["bos_policy"] == "every-window"


def test_units_and_forms_come_last_and_exist():
    used, states = order_of("lm-eval-wikitext", "lm-eval", metrics=("word_perplexity", "perplexity"))
    assert used == ["detokenizer", "unit"] and [s.metric for s in states] == ["word_perplexity"] * 2 + ["perplexity"]
    used, _ = order_of("lm-eval", "lm-eval", metrics=("perplexity", "bits_per_byte"))
    assert used == ["unit", "log_base"]
    used, states = order_of("lm-eval", "lm-eval", metrics=("bits_per_byte", "word_perplexity"))
    assert used == ["log_base", "unit"] and states[1].metric == "byte_perplexity"  # no metric is bits per word


@pytest.mark.parametrize("a,b,order,match", [
    ("lm-eval", "llama-cpp", "chunk_selection,window_length,stride,prefix_token,join,bos_sink", "chunk_selection needs"),
    ("hf-docs", "llama-cpp", "window_length,bos_sink,prefix_token,chunk_selection", "bos_sink"),
    ("lm-eval", "gptq", "join,prefix_token,chunk_selection", "changes nothing"),
    ("lm-eval", "gptq", "prefix_token,join", "leaves out chunk_selection"),
    ("gptq", "llama-cpp", None, "both ends cut chunks"),
])
def test_orders_that_cannot_be_followed_are_refused(a, b, order, match):
    with pytest.raises(UsageError, match=match):
        order_of(a, b, bos=True, order=order.split(",") if order else None)


def test_step_stderr_is_the_paired_one_on_equal_units_and_the_reference_otherwise():
    rng = np.random.default_rng(1)
    y_i, y_j, n, m = rng.exponential(50, 30), rng.exponential(50, 30), rng.integers(5, 90, 30), rng.integers(5, 90, 30)
    same = ratio_difference(y_i, n, y_j, n)
    want = paired(y_i, y_j, n)
    assert math.isclose(same["stderr"], want["stderr"], rel_tol=1e-12) and math.isclose(same["value"], want["value"])
    other = ratio_difference(y_i, n, y_j, m)
    d, se = ref.log_delta_stderr(y_i, n, y_j, m)
    assert math.isclose(other["value"], d, rel_tol=1e-12) and math.isclose(other["stderr"], se, rel_tol=1e-12)


@pytest.fixture(scope="module")
def data(tmp_path_factory, texts):
    rows = [{"text": t, "id": f"t{i}"} for i, t in enumerate(texts * 2)]
    return make_jsonl(tmp_path_factory.mktemp("explain") / "docs.jsonl", rows)


def explain(model: str, data: str, out, a: str, b: str, *more: str) -> dict:
    code = cli.main(["explain", "--model", model, "--data-files", data, "--id-field", "id", "--from", a, "--to", b,
                     "--output-dir", str(out), "--no-progress", "--batch-size", "4", "--no-plot", *more])
    assert code == 0
    return json.loads((out / "results.json").read_text())["explain"]


def named(model: str, data: str, protocol: str, **fields) -> dict:
    cfg = config_for(model=model, data_files=[data], id_field="id", protocol=protocol, max_length=L, progress=False,
                     batch_size=4, **fields)
    return evaluate(cfg).summary


def assert_telescopes(block: dict) -> None:
    deltas = [s["log_delta"] for s in block["steps"]]
    assert abs(math.fsum(deltas) - (block["end"]["log_value"] - block["start"]["log_value"])) <= 1e-12
    assert block["steps"][-1]["log_value"] == block["end"]["log_value"]
    assert all(s["log_delta_stderr"] is not None and s["log_delta_stderr"] >= 0 for s in block["steps"])


def tokens(out, step: str) -> pd.DataFrame:
    return pd.read_parquet(out / "steps" / step / "tokens.parquet").sort_values("seq_index")


def test_lm_eval_to_gptq_telescopes_and_its_ends_are_the_named_runs(tiny_llama_dir, data, tmp_path, monkeypatch):
    from lm_ce.model import load as model_lib

    loads = []
    real = model_lib.load
    monkeypatch.setattr(model_lib, "load", lambda *a, **k: loads.append(1) or real(*a, **k))
    out = tmp_path / "x"
    block = explain(tiny_llama_dir, data, out, f"lm-eval,max_length={L}", f"gptq,max_length={L}")
    assert len(loads) == 1  # one model load for the four runs
    assert [s["factor"] for s in block["steps"]] == ["prefix_token", "join", "chunk_selection"]
    assert_telescopes(block)
    start, end = named(tiny_llama_dir, data, "lm-eval"), named(tiny_llama_dir, data, "gptq")
    assert block["start"]["value"] == start["metrics"]["perplexity"] and block["start"]["log_value"] == start["metrics"]["mean_loss"]
    assert block["end"]["value"] == end["metrics"]["perplexity"] and block["end"]["log_value"] == end["metrics"]["mean_loss"]
    stream, chunks = tokens(out, "02-join"), tokens(out, "03-chunk_selection")  # gptq = the stream's whole chunks
    n = stream["seq_index"].max() + 1  # the stream's last target is the sequence's last token
    kept = stream[stream["seq_index"] < L * (n // L)]
    assert kept["token_id"].tolist() == chunks["token_id"].tolist() and kept["seq_index"].tolist() == chunks["seq_index"].tolist()
    np.testing.assert_allclose(kept["nll"], chunks["nll"], rtol=1e-5, atol=1e-5)
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "prefix_token" in md and "telescoping error" in md and (out / "results.html").is_file()


@pytest.fixture(scope="module")
def bos_llama_dir(tiny_llama_dir, tmp_path_factory) -> str:
    """The tiny llama with a tokenizer that adds BOS (as Llama's and Gemma's do)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny_llama_bos")
    shutil.copytree(tiny_llama_dir, path, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(path)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    tok.save_pretrained(path)
    return str(path)


def test_hf_docs_to_llama_cpp_with_a_bos_tokenizer_has_a_sink_step(bos_llama_dir, data, tmp_path):
    out = tmp_path / "x"
    block = explain(bos_llama_dir, data, out, f"hf-docs,max_length={L}", f"llama-cpp,max_length={L}", "--plot")
    assert [s["factor"] for s in block["steps"]] == ["prefix_token", "bos_sink", "chunk_selection"]
    assert_telescopes(block)
    assert block["end"]["value"] == named(bos_llama_dir, data, "llama-cpp")["metrics"]["perplexity"]
    assert block["start"]["value"] == named(bos_llama_dir, data, "hf-docs")["metrics"]["perplexity"]
    sink, chunks = tokens(out, "02-bos_sink"), tokens(out, "03-chunk_selection")  # llama-cpp: second halves of chunks
    n = sink["seq_index"].max() + 1
    kept = sink[(sink["seq_index"] % L > L // 2) & (sink["seq_index"] < L * (n // L))]
    assert kept["token_id"].tolist() == chunks["token_id"].tolist()
    np.testing.assert_allclose(kept["nll"], chunks["nll"], rtol=1e-5, atol=1e-5)
    assert any("adds BOS" in note for note in block["notes"]) and (out / "explain.png").is_file()


def test_units_and_forms_are_transformations_of_the_last_run(tiny_llama_dir, data, tmp_path):
    out = tmp_path / "x"
    block = explain(tiny_llama_dir, data, out, f"lm-eval-wikitext,max_length={L}", f"lm-eval,max_length={L}",
                    "--text-field", "text", "--to-metric", "bits_per_byte")
    assert [s["factor"] for s in block["steps"]] == ["detokenizer", "unit", "log_base"]
    assert_telescopes(block)
    detok, unit, base = block["steps"]
    end = named(tiny_llama_dir, data, "lm-eval")
    assert base["log_delta"] == 0 and base["log_delta_stderr"] == 0 and base["value"] == end["metrics"]["bits_per_byte"]
    assert unit["metric"] == "byte_perplexity" and unit["value"] == end["metrics"]["byte_perplexity"]
    rows = [pd.read_json(out / "steps" / d / "documents.jsonl", lines=True).fillna({"nll_sum": 0})
            for d in ("00-start", "01-detokenizer")]  # words are counted on the stored text in both: paired exactly
    want = paired(rows[0]["nll_sum"], rows[1]["nll_sum"], rows[0]["words"])
    assert math.isclose(detok["log_delta_stderr"], want["stderr"], rel_tol=1e-9)
    other = explain(tiny_llama_dir, data, tmp_path / "y", f"lm-eval-wikitext,max_length={L}", f"lm-eval,max_length={L}",
                    "--text-field", "text", "--order", "unit,detokenizer")
    assert [s["factor"] for s in other["steps"]] == ["unit", "detokenizer"]
    assert_telescopes(other)
    assert other["start"] == block["start"] and other["end"]["log_value"] == end["metrics"]["mean_loss"]
    assert other["steps"][1]["log_delta"] != detok["log_delta"]  # in tokens, not words: the order matters


def test_a_stopped_chain_resumes_to_the_same_figures(tiny_llama_dir, data, tmp_path, monkeypatch):
    args = (tiny_llama_dir, data)
    whole = explain(*args, tmp_path / "whole", f"lm-eval,max_length={L}", f"gptq,max_length={L}")
    stop_at_batch(monkeypatch, 12)
    out = tmp_path / "run"
    code = cli.main(["explain", "--model", tiny_llama_dir, "--data-files", data, "--id-field", "id", "--from",
                     f"lm-eval,max_length={L}", "--to", f"gptq,max_length={L}", "--output-dir", str(out),
                     "--no-progress", "--batch-size", "4", "--no-plot"])
    assert code == 130 and not (out / "results.json").exists()
    monkeypatch.undo()
    again = ["explain", "--model", tiny_llama_dir, "--data-files", data, "--id-field", "id", "--from",
             f"lm-eval,max_length={L}", "--to", f"gptq,max_length={L}", "--output-dir", str(out), "--no-progress",
             "--batch-size", "4", "--no-plot"]
    assert cli.main(again) == 2  # the stopped step holds a run: --resume or --overwrite says what to do
    assert cli.main([*again, "--resume"]) == 0
    resumed = json.loads((out / "results.json").read_text())["explain"]
    assert [s["log_value"] for s in resumed["steps"]] == [s["log_value"] for s in whole["steps"]]


@pytest.mark.parametrize("args,match", [
    (["--from", "lm-eval", "--to", "gptq", "--max-length", "64"], "window field"),
    (["--from", "lm-eval"], "needs --to"),
    (["--from", "lm-eval,max_len=3", "--to", "gptq"], "not FIELD=VALUE"),
    (["--from", "lm-evil", "--to", "gptq"], "no protocol"),
    (["--from", "lm-eval", "--to", "gptq", "--order", "join,magic"], "factors are"),
    (["--from", "lm-eval", "--to", "gptq", "--metric", "ppl"], "choose one of"),
])
def test_bad_command_lines_say_why_in_one_line(args, match, capsys, tmp_path):
    assert cli.main(["explain", "--model", "gpt2", "--output-dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1
