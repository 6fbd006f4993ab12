"""The second hostile sweep: what a hostile user tried and what lm_ce now does (one line and exit 2, or the
behaviour named). Cases that fit test_bad_input's table of refusals are there."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lm_ce.cli.main import main

from .conftest import make_jsonl

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world.", "Good morning! How are you today?"]


@pytest.fixture
def data(tmp_path) -> str:
    return make_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lm_ce: error: "), err
    return lines[0]


def test_compare_to_a_learned_position_model_shorter_than_max_length(tiny_llama_dir, tiny_gpt2_dir, data, tmp_path,
                                                                     capsys):
    """GPT-2 (128 learned positions, another tokenizer: scored on its own) under --max-length 200 ended in an
    IndexError after the first model was scored; now refused before scoring, like the first model's check."""
    out = tmp_path / "run"
    code = main(["--model", tiny_llama_dir, "--compare-to", tiny_gpt2_dir, "--data-files", data, "--max-length", "200",
                 "--output-dir", str(out), "--progress", "false"])
    line = one_error_line(capsys)
    assert code == 2
    assert "has 128 positions, fewer than --max-length 200" in line and "--max-length 128 or less" in line, line
    assert not out.exists()  # nothing written, and the directory the run created is not left behind


def test_tokenizer_beyond_the_embedding_writes_nothing(tiny_llama_dir, tmp_path, capsys):
    """Refused after loading, before any output file."""
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "more_ids"
    shutil.copytree(tiny_llama_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.add_tokens(["<x1>"])
    tok.save_pretrained(model)
    out = tmp_path / "run"
    data = make_jsonl(tmp_path / "x.jsonl", [{"text": "a <x1> b"}])
    assert main(["--model", str(model), "--data-files", data, "--output-dir", str(out), "--progress", "false"]) == 2
    assert "513 ids, more than the model's 512 embedding rows" in one_error_line(capsys)
    assert not out.exists()  # nothing written, and the directory the run created is not left behind


@pytest.mark.parametrize("mode", ["document", "stream", "llama-cpp"])
def test_whitespace_only_rows_are_never_scored(tiny_llama_dir, llama_tokenizer, tmp_path, capsys, mode):
    """Rows of whitespace alone (which this tokenizer turns into tokens) were scored: 3 documents, 3 tokens, "word
    perplexity 236". They are empty documents: a file of nothing else is refused in every mode."""
    assert llama_tokenizer("   ", add_special_tokens=False)["input_ids"]  # the tokenizer makes tokens of it
    blank = make_jsonl(tmp_path / "blank.jsonl", [{"text": "   "}, {"text": " \t "}, {"text": "\n"}])
    assert main(["--model", tiny_llama_dir, "--data-files", blank, "--mode", mode, "--max-length", "8",
                 "--progress", "false"]) == 2
    line = one_error_line(capsys)
    assert "nothing to score" in line and "whitespace only" in line, line


@pytest.mark.parametrize("mode", ["document", "stream"])
def test_whitespace_rows_among_text_are_counted_as_skipped(tiny_llama_dir, tmp_path, mode):
    """Document mode: a whitespace row adds nothing (figures equal to the run without it). Stream mode: the row
    stays in the joined text, as the recipe joins every row, and is counted as an empty row joined, not skipped."""
    from lm_ce.config.fields import Config
    from lm_ce.runner import evaluate

    with_blank = make_jsonl(tmp_path / "a.jsonl", [{"text": TEXTS[0]}, {"text": "   "}, {"text": TEXTS[1]}])
    without = make_jsonl(tmp_path / "b.jsonl", [{"text": TEXTS[0]}, {"text": TEXTS[1]}])

    def run(path):
        return evaluate(Config(model=tiny_llama_dir, data_files=[path], mode=mode, max_length=32, progress=False)).summary

    a, b = run(with_blank), run(without)
    joined = (0, 1) if mode == "stream" else (1, None)  # (skipped documents, empty rows joined)
    assert (a["counts"]["documents"], a["counts"]["skipped_documents"], a["counts"].get("joined_empty_rows")) == (2, *joined)
    assert a["counts"]["words"] == b["counts"]["words"]
    if mode == "document":
        assert (a["nll_sum"], a["counts"]["tokens"], a["counts"]["bytes"]) == (b["nll_sum"], b["counts"]["tokens"],
                                                                              b["counts"]["bytes"])
    else:
        assert a["counts"]["bytes"] == len("\n\n".join([TEXTS[0], "   ", TEXTS[1]]).encode())


def test_a_mode_overridden_away_from_its_protocol_is_named_where_the_protocol_is(tiny_llama_dir, data, tmp_path,
                                                                                  capsys):
    """--mode stream under protocol lm-eval (document-level) kept the protocol's label; the overridden fields are
    now recorded (settings.protocol_overrides) and named wherever the protocol is printed."""
    out = tmp_path / "run"
    assert main(["--model", tiny_llama_dir, "--data-files", data, "--mode", "stream", "--max-length", "16",
                 "--output-dir", str(out), "--progress", "false"]) == 0
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["protocol"] == "lm-eval" and settings["protocol_overrides"] == {"mode": "stream"}
    assert "protocol lm-eval (overridden: --mode stream), stream mode" in capsys.readouterr().out
    assert "protocol lm-eval (overridden: --mode stream)" in (out / "results.md").read_text()
    plain = tmp_path / "plain"
    assert main(["--model", tiny_llama_dir, "--data-files", data, "--protocol", "llama-cpp", "--max-length", "8",
                 "--output-dir", str(plain), "--progress", "false"]) == 0
    summary = json.loads((plain / "results.json").read_text())
    assert summary["settings"]["protocol_overrides"] == {"max_length": 8}  # llama-cpp's is 512
    assert "headline (llama-cpp (overridden: --max-length 8): perplexity)" in (plain / "results.md").read_text()
    default = tmp_path / "default"
    assert main(["--model", tiny_llama_dir, "--data-files", data, "--output-dir", str(default), "--progress", "false"]) == 0
    assert json.loads((default / "results.json").read_text())["settings"]["protocol_overrides"] == {}
    assert "(overridden:" not in (default / "results.md").read_text()


@pytest.mark.parametrize("config", sorted(p.name for p in (Path(__file__).parent.parent / "configs").glob("*.yaml")))
def test_the_shipped_configs_run_their_protocols_as_named(config):
    """No false 'overridden': a setting that gives what the protocol gives (prefix none in a stream) is none."""
    from lm_ce.config.sources import build_config
    from lm_ce.reports.summary import protocol_overrides

    cfg = build_config(["--config", str(Path(__file__).parent.parent / "configs" / config)])
    assert protocol_overrides(cfg) == {}
