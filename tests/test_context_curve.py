"""--context-curve: each point equals a plain run with that context length restricted to the same targets.

Checked against the float64 reference (one window at a time, its own window arithmetic), against lm_ce runs
with --max-length L --stride s and --save-tokens filtered to the same target positions, for invariance to
batch size and padding side, and for bad input refused in one line.
"""
from __future__ import annotations

import json
import math
import random

import pytest

from lm_ce.analysis.curve import curve_spans, curve_stride
from lm_ce.cli.main import main
from lm_ce.config.fields import Config
from lm_ce.runner import evaluate

from .conftest import make_jsonl, saved_run, stop_at_batch
from .reference import document_sequence, document_windows, reference_nll, stream_windows

LENGTHS = [8, 16, 32]
DIVISOR = 4  # strides 2, 4, 8
REL = 2e-5  # float32 model and head against the float64 reference


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, texts):
    return make_jsonl(tmp_path_factory.mktemp("curve") / "docs.jsonl", [{"text": t} for t in texts[:10]])


def run(model_dir: str, data: str, **fields):
    """A run as the command line makes it (owning the process: stop_at_batch's Ctrl-C is a stop, not an error)."""
    return evaluate(Config(model=model_dir, data_files=[data], progress=False, **fields), owns_process=True)


def curve_of(model_dir: str, data: str, **fields) -> dict:
    fields = {"context_curve": LENGTHS, "context_curve_divisor": DIVISOR, "max_length": 16, **fields}
    return run(model_dir, data, **fields).summary["context_curve"]


def clip(windows: list[tuple[int, int, int]], first: int) -> list[tuple[int, int, int]]:
    """The reference's own restriction of windows to the targets S[first:]."""
    out = []
    for start, a, b in windows:
        targets = [t for t in range(a + 1, b + 1) if t >= first]
        if targets:
            out.append((start, targets[0] - 1, b))
    return out


@pytest.mark.parametrize("n_seq,first_target", [(1, 1), (5, 1), (33, 1), (34, 1), (200, 1), (200, 40), (97, 3)])
@pytest.mark.parametrize("mode", ["document", "stream"])
def test_spans_score_each_target_once_with_about_length_context(n_seq, first_target, mode):
    longest = 32
    for length in (4, 8, 32):
        for stride in {1, curve_stride(length, 8, mode), curve_stride(length, 2, mode), curve_stride(length, 1, mode)}:
            spans = curve_spans(mode, n_seq, first_target, length, stride, longest)
            targets = [t for _, a, b in spans for t in range(a + 1, b + 1)]
            first = max(longest, first_target if mode == "document" else 1)  # a stream has no prompt
            assert targets == list(range(first, n_seq)), (length, stride)
            for start, a, b in spans:
                assert b - start <= length
                low, high = (length - stride, length - 1) if mode == "stream" else (length - stride + 1, length)
                for t in range(a + 1, b + 1):
                    assert low <= t - start <= high, (length, stride, (start, a, b), t)


def test_points_match_the_float64_reference(tiny_llama_dir, tiny_llama, llama_tokenizer, data_file, texts):
    curve = curve_of(tiny_llama_dir, data_file, batch_size=5)
    longest = LENGTHS[-1]
    prefix = llama_tokenizer.bos_token_id
    for k, length in enumerate(LENGTHS):
        stride = length // DIVISOR
        nll, tokens = 0.0, 0
        for text in texts[:10]:
            seq, first = document_sequence(llama_tokenizer, text, prefix)
            if len(seq) < 2:
                continue
            windows = clip(document_windows(len(seq), first, length, stride), max(longest, first))
            part, n = reference_nll(tiny_llama, seq, windows)
            nll, tokens = nll + part, tokens + n
        assert tokens > 400 and curve["tokens"][k] == tokens
        assert math.isclose(curve["nll_sum"][k], nll, rel_tol=REL), (length, curve["nll_sum"][k], nll)
        assert math.isclose(curve["mean_loss"][k], nll / tokens, rel_tol=REL)
        assert math.isclose(curve["perplexity"][k], math.exp(nll / tokens), rel_tol=REL)
    assert curve["lengths"] == LENGTHS and curve["strides"] == [2, 4, 8]
    assert curve["context"] == [[7, 8], [13, 16], [25, 32]]
    having = [t for t in texts[:10] if len(document_sequence(llama_tokenizer, t, prefix)[0]) > longest]
    assert curve["documents"] == len(having) and 2 <= len(having) < 10  # the short documents have no target
    assert curve["mean_loss"][0] != curve["mean_loss"][-1]  # the tiny model's loss depends on its context


def test_points_match_plain_runs_restricted_to_the_targets(tiny_gpt2_dir, gpt2_tokenizer, data_file, texts):
    """Point L is the run with --max-length L --stride s_L, its --save-tokens rows kept from position 32 on."""
    curve = curve_of(tiny_gpt2_dir, data_file, batch_size=3)
    longest = LENGTHS[-1]
    for k, length in enumerate(LENGTHS):
        plain = run(tiny_gpt2_dir, data_file, max_length=length, stride=length // DIVISOR, save_tokens=True)
        table = plain.token_table
        first = 1  # the prefix token is S[0]; position p in tokens.parquet is target S[1 + p]
        kept = [nll for pos, nll in zip(table["position"], table["nll"]) if first + pos >= longest]
        assert curve["tokens"][k] == len(kept) > 400
        assert math.isclose(curve["nll_sum"][k], math.fsum(kept), rel_tol=1e-6), length


@pytest.mark.parametrize("fields", [dict(batch_size=1), dict(batch_size=7, padding_side="left"),
                                    dict(batch_size=16, token_budget=64, chunk_documents=2)])
def test_invariant_to_batch_size_padding_and_chunks(tiny_llama_dir, data_file, fields):
    base = curve_of(tiny_llama_dir, data_file, batch_size=4)
    other = curve_of(tiny_llama_dir, data_file, **fields)
    assert other["tokens"] == base["tokens"]
    assert other["nll_sum"] == pytest.approx(base["nll_sum"], rel=1e-6)


def test_run_figures_unchanged_by_the_curve(tiny_llama_dir, data_file):
    """The curve is scored apart: the run's own figures, counts and positions are those of a run without it."""
    plain = run(tiny_llama_dir, data_file, max_length=16).summary
    with_curve = run(tiny_llama_dir, data_file, max_length=16, context_curve=LENGTHS).summary
    assert with_curve["nll_sum"] == plain["nll_sum"] and with_curve["counts"] == plain["counts"]
    assert with_curve["by_position"] == plain["by_position"]
    assert "context_curve" not in plain


def test_stream_mode_matches_the_reference(tiny_gpt2_dir, tiny_gpt2, gpt2_tokenizer, data_file, texts):
    curve = curve_of(tiny_gpt2_dir, data_file, mode="stream", protocol="hf-docs", batch_size=6)
    seq = list(gpt2_tokenizer("\n\n".join(texts[:10]), add_special_tokens=False).input_ids)
    for k, length in enumerate(LENGTHS):
        windows = clip(stream_windows(len(seq), length, length // DIVISOR), LENGTHS[-1])
        nll, tokens = reference_nll(tiny_gpt2, seq, windows)
        assert curve["tokens"][k] == tokens == len(seq) - LENGTHS[-1]
        assert math.isclose(curve["nll_sum"][k], nll, rel_tol=REL), length
    assert curve["context"] == [[6, 7], [12, 15], [24, 31]] and curve["documents"] == 1


def test_writes_results_and_plot(tiny_llama_dir, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--model", tiny_llama_dir, "--data-files", data_file, "--max-length", "16", "--context-curve",
                 "8,16,32", "--output-dir", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    curve = json.loads((out / "results.json").read_text())["context_curve"]
    assert curve["lengths"] == LENGTHS and curve["strides"] == [2, 4, 8]  # the default divisor 4
    assert len(curve["mean_loss"]) == len(curve["perplexity"]) == len(curve["tokens"]) == 3
    assert "32 tokens of its sequence before it" in curve["targets"] and curve["seconds"] > 0
    assert (out / "context_curve.png").stat().st_size > 1000


def test_documents_too_short_give_stated_empty_points(tiny_llama_dir, tmp_path, caplog, capsys):
    data = make_jsonl(tmp_path / "short.jsonl", [{"text": "Hello world."}, {"text": "Is it raining?"}])
    out = tmp_path / "out"
    code = main(["--model", tiny_llama_dir, "--data-files", data, "--context-curve", "64,128",
                 "--output-dir", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    curve = json.loads((out / "results.json").read_text())["context_curve"]
    assert curve["tokens"] == [0, 0] and curve["mean_loss"] == [None, None] and curve["documents"] == 0
    assert "no token has 128 tokens of context before it" in caplog.text
    assert not (out / "context_curve.png").exists()


@pytest.mark.parametrize("args,message", [
    (["--context-curve", "16,8"], "strictly increasing lengths of at least 1"),
    (["--context-curve", "8,8"], "strictly increasing"),
    (["--context-curve", "0,8"], "at least 1"),
    (["--context-curve", "1,8", "--mode", "stream"], "at least 2"),
    (["--context-curve", "8,x"], "--context-curve must be a whole number"),
    (["--context-curve", ""], "--context-curve is empty"),
    (["--context-curve", "8,16", "--mode", "gptq"], "--mode gptq cuts fixed chunks"),
    (["--context-curve", "8,16", "--context-curve-divisor", "0"], "--context-curve-divisor must be at least 1"),
    (["--context-curve", "64,256"], "256 is beyond the model's 128 positions"),
])
def test_bad_input_refused_in_one_line(tiny_gpt2_dir, data_file, tmp_path, capsys, args, message):
    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    code = main(["--model", tiny_gpt2_dir, "--data-files", data_file, "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


@pytest.mark.slow  # a real 2-process launch (torch.distributed.run, gloo on CPU): ~20 s on a busy 2-core machine
def test_two_processes_equal_one(tiny_llama_dir, data_file, tmp_path, capsys):
    from .test_distributed import read, run_distributed, run_single

    args = ["--model", tiny_llama_dir, "--data-files", data_file, "--max-length", "16", "--batch-size", "3",
            "--context-curve", "8,16,32", "--context-curve-divisor", "4", "--chunk-documents", "4"]
    run_single(args, tmp_path / "one", capsys)
    launch = run_distributed(args, tmp_path / "many")
    one, many = read(tmp_path / "one")[0]["context_curve"], read(tmp_path / "many")[0]["context_curve"]
    assert many["tokens"] == one["tokens"] and many["documents"] == one["documents"] and one["tokens"][0] > 400
    # float rounding only: with few windows per process the batches are made smaller (see test_distributed)
    assert many["nll_sum"] == pytest.approx(one["nll_sum"], rel=1e-6)
    assert "Traceback" not in launch.stderr
    assert (tmp_path / "many" / "context_curve.png").is_file()


@pytest.mark.parametrize("case", ["prompt", "every-window"])
def test_prompts_and_bos_in_every_window_match_the_reference(tiny_llama_dir, tiny_llama, llama_tokenizer, texts,
                                                             tmp_path, case):
    """Targets start after the prompt when it is longer than the longest length; with --bos-policy every-window
    each window's first input is BOS, as in the plain run."""
    rng = random.Random(3)
    long_prompt = " ".join(rng.choice(texts[8].split()) for _ in range(60))  # more than 32 tokens
    rows = [{"text": texts[8], "prompt": "Question: what comes next?"}, {"text": texts[9], "prompt": long_prompt}]
    data = make_jsonl(tmp_path / "rows.jsonl", rows)
    fields = dict(prompt_field="prompt") if case == "prompt" else dict(bos_policy="every-window")
    curve = curve_of(tiny_llama_dir, data, batch_size=3, **fields)
    bos = llama_tokenizer.bos_token_id
    for k, length in enumerate(LENGTHS):
        nll, tokens = 0.0, 0
        for row in rows:
            prompt = row["prompt"] if case == "prompt" else None
            seq, first = document_sequence(llama_tokenizer, row["text"], bos, prompt)
            windows = clip(document_windows(len(seq), first, length, length // DIVISOR), max(LENGTHS[-1], first))
            part, n = reference_nll(tiny_llama, seq, windows, first_id=bos if case == "every-window" else None)
            nll, tokens = nll + part, tokens + n
        assert curve["tokens"][k] == tokens > 100
        assert math.isclose(curve["nll_sum"][k], nll, rel_tol=REL), (case, length)


CURVE_FIELDS = dict(context_curve=LENGTHS, context_curve_divisor=DIVISOR, max_length=16, chunk_documents=3)


def test_sharded_curves_merge_to_one_runs_curve(tiny_llama_dir, data_file, tmp_path):
    """Each shard scores the curve over its own chunks' documents and saves its exact sums; lm-ce merge adds them:
    the same curve as one run over all documents, bit for bit."""
    from lm_ce.reports import files as report
    from lm_ce.reports.merge import merge

    one = run(tiny_llama_dir, data_file, **CURVE_FIELDS).summary["context_curve"]
    shards = []
    for k in range(3):
        shard = run(tiny_llama_dir, data_file, shard=f"{k}/3", output_dir=str(tmp_path / f"s{k}"), **CURVE_FIELDS)
        report.write(shard, str(tmp_path / f"s{k}"), plot=False)
        shards.append(shard.summary["context_curve"])
    assert all(0 < s["tokens"][0] < one["tokens"][0] for s in shards)  # each shard: its own documents' targets
    merged = merge([str(tmp_path / f"s{k}") for k in range(3)], str(tmp_path / "merged")).summary["context_curve"]
    for key in ("lengths", "strides", "context", "tokens", "nll_sum", "mean_loss", "documents", "targets"):
        assert merged[key] == one[key], key
    assert (tmp_path / "merged" / "context_curve.png").is_file()


def test_a_curve_stopped_midway_resumes_to_the_uninterrupted_curve(tiny_llama_dir, data_file, tmp_path, monkeypatch):
    """A stop inside the curve (after the run's own pass) saves the run and the curve's finished chunks (results.json
    says complete: false, no context_curve); --resume scores only the rest of the curve: the same curve."""
    calls = stop_at_batch(monkeypatch, None)
    whole = run(tiny_llama_dir, data_file, output_dir=str(tmp_path / "whole"), batch_size=2, **CURVE_FIELDS)
    total = calls["n"]
    calls["n"] = 0
    run(tiny_llama_dir, data_file, batch_size=2, max_length=16, chunk_documents=3)
    curve_batches = total - calls["n"]  # the batches of the curve alone
    calls.update(n=0, stop=total - curve_batches // 3)  # in the curve's later chunks
    stopped = run(tiny_llama_dir, data_file, output_dir=str(tmp_path / "run"), batch_size=2, **CURVE_FIELDS)
    assert stopped.summary["complete"] is False and "context_curve" not in stopped.summary
    saved = saved_run(tmp_path / "run")
    assert saved.passes_done and 0 < saved.curve.chunks_done < 4 and not saved.curve.done
    assert stopped.summary["nll_sum"] == whole.summary["nll_sum"]  # the run's own figures were finished
    calls["stop"] = None
    calls["n"] = 0
    resumed = run(tiny_llama_dir, data_file, output_dir=str(tmp_path / "run"), batch_size=2, resume=True,
                  **CURVE_FIELDS)
    assert calls["n"] < curve_batches  # only the curve's unfinished chunks were scored again
    assert resumed.summary["complete"] is True
    curve, expected = resumed.summary["context_curve"], whole.summary["context_curve"]
    for key in ("tokens", "nll_sum", "documents"):
        assert curve[key] == expected[key], key
    assert resumed.summary["nll_sum"] == whole.summary["nll_sum"]
