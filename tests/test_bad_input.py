"""Hostile and odd input: every bad input ends with exit code 2 and one clear line on stderr, or is
handled and counted in the report. Never a traceback, never a silently wrong number.

The CLI runs in-process (`lm_ce.cli.main`) for the table; a few cases also run through a real
subprocess (`python scripts/evaluate.py`) to prove that no traceback reaches the terminal.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from lm_ce.cli.main import main

from .conftest import make_jsonl

ROOT = Path(__file__).resolve().parent.parent
GOOD_ROWS = [{"text": "The quick brown fox jumps over the lazy dog.", "n": 1}, {"text": "Hello world.", "n": 2}]
BAD_UTF8 = b"caf\xe9 au lait\n"  # latin-1 bytes: \xe9 is not valid UTF-8 here


@dataclass
class Env:
    """What a case builds its command line from: the tiny models, a good data file, a scratch folder."""

    tmp: Path
    llama: str
    good: str
    no_specials: str

    def file(self, name: str, content: str | bytes) -> str:
        """A file in this test's folder with exactly these bytes (str is written as UTF-8)."""
        path = self.tmp / name
        path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        return str(path)

    def folder(self, name: str) -> str:
        """An empty folder in this test's folder."""
        path = self.tmp / name
        path.mkdir()
        return str(path)


@pytest.fixture(scope="module")
def no_specials_dir(tiny_llama_dir, tmp_path_factory) -> str:
    """The tiny llama with a tokenizer that has neither a BOS nor an EOS token."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("no_specials")
    shutil.copytree(tiny_llama_dir, path, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.bos_token = None
    tok.eos_token = None
    tok.save_pretrained(path)
    reloaded = AutoTokenizer.from_pretrained(path)
    assert reloaded.bos_token_id is None and reloaded.eos_token_id is None
    return str(path)


@pytest.fixture
def env(tmp_path, tiny_llama_dir, no_specials_dir, monkeypatch) -> Env:
    monkeypatch.setenv("LM_CE_CACHE", str(tmp_path / "cache"))  # GGUF cache: never the user's
    good = make_jsonl(tmp_path / "good.jsonl", GOOD_ROWS)
    return Env(tmp_path, tiny_llama_dir, good, no_specials_dir)


def model_dir(e: Env, name: str, config: str | None = None, without: str = "weights") -> str:
    """A copy of the tiny llama's directory without its weights (or tokenizer), with this config.json if given."""
    path = e.tmp / name
    drop = {"tokenizer": ("tokenizer*", "special_tokens_map.json"), "weights": ("*.safetensors", "*.bin"), "nothing": ()}[without]
    shutil.copytree(e.llama, path, ignore=shutil.ignore_patterns(*drop))
    if config is not None:
        (path / "config.json").write_text(config)
    return str(path)


def truncated_weights(e: Env) -> str:
    """A copy of the tiny llama whose model.safetensors lost its second half (an interrupted download)."""
    path = e.tmp / "truncated"
    shutil.copytree(e.llama, path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return str(path)


def remote_code_model(e: Env) -> str:
    """A copy of the tiny llama that asks for its own code (auto_map), as models needing trust_remote_code do."""
    path = e.tmp / "custom"
    shutil.copytree(e.llama, path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="lm_ce_custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                       "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (path / "config.json").write_text(json.dumps(config))
    (path / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'lm_ce_custom'\n")
    (path / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_custom import CustomConfig\n\n\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    return str(path)


def more_ids_than_rows(e: Env) -> str:
    """A copy of the tiny llama whose tokenizer gained 3 ids that the model's embedding has no rows for."""
    from transformers import AutoTokenizer

    path = e.tmp / "more_ids"
    shutil.copytree(e.llama, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_tokens(["<new1>", "<new2>", "<new3>"])
    tok.save_pretrained(path)
    return str(path)


def fewer_positions(e: Env, positions: int = 64) -> str:
    """A copy of the tiny llama (rotary positions) whose config says it was trained on 64 positions."""
    return model_dir(e, "short_llama", config=json.dumps({**json.loads((Path(e.llama) / "config.json").read_text()),
                                                         "max_position_embeddings": positions}), without="nothing")


def base(e: Env, extra=()) -> list[str]:
    """A command line that works, then `extra` (later flags win; a list flag is given once: the case's data files
    replace the good ones)."""
    data = [] if "--data-files" in extra else ["--data-files", e.good]
    return ["--model", e.llama, *data, "--progress", "false", "--batch-size", "4", *extra]


def yaml_config(e: Env, text: str) -> list[str]:
    return ["--config", e.file("run.yaml", text)]


# (id, command line from Env, fragments that must all appear in the one line on stderr)
REFUSED = [
    # --- the model ---
    ("model-missing-dir", lambda e: ["--model", str(e.tmp / "no_such_model")], ["no_such_model does not exist", "--model"]),
    ("model-txt-file", lambda e: ["--model", e.file("notes.txt", "hello")], ["notes.txt is a file, not a model", "directory"]),
    ("model-bin-file", lambda e: ["--model", e.file("pytorch_model.bin", os.urandom(64))], ["pytorch_model.bin is a file, not a model"]),
    ("model-dir-no-config", lambda e: ["--model", e.folder("empty_model")], ["empty_model has no config.json"]),
    ("gguf-random-bytes", lambda e: ["--model", e.file("m.gguf", os.urandom(256))], ["m.gguf is not a GGUF file"]),
    ("gguf-magic-then-garbage", lambda e: ["--model", e.file("t.gguf", b"GGUF" + os.urandom(200))], ["cannot read GGUF file", "t.gguf", "again"]),
    ("gguf-magic-truncated", lambda e: ["--model", e.file("u.gguf", b"GGUF\x03\x00\x00\x00")], ["cannot read GGUF file", "u.gguf", "again"]),
    ("model-dir-bad-config", lambda e: ["--model", model_dir(e, "bad_config", config="{not json")], ["bad_config", "not a valid JSON file", "config.json"]),
    ("model-dir-no-weights", lambda e: ["--model", model_dir(e, "no_weights")], ["cannot load model directory", "no_weights", "weights"]),
    ("model-dir-no-tokenizer", lambda e: ["--model", model_dir(e, "no_tok", without="tokenizer")], ["cannot load model directory", "no_tok", "tokenizer"]),
    ("model-truncated-safetensors", lambda e: ["--model", truncated_weights(e)], ["truncated/model.safetensors is truncated or corrupt", "download or save the model again"]),
    ("model-remote-code", lambda e: ["--model", remote_code_model(e)], ["own Python code", "auto_map in config.json", "--trust-remote-code", "executes the model's code"]),
    ("tokenizer-ids-beyond-embedding", lambda e: ["--model", more_ids_than_rows(e), "--data-files", e.file("new.jsonl", '{"text": "a <new3> b"}\n'), "--output-dir", str(e.tmp / "out")], ["its tokenizer has 515 ids, more than the model's 512 embedding rows"]),
    ("compare-to-fewer-positions", lambda e: ["--compare-to", fewer_positions(e), "--max-length", "128"], ["--compare-to", "short_llama has 64 positions, fewer than --max-length 128", "--max-length 64 or less"]),
    ("compare-to-missing", lambda e: ["--compare-to", str(e.tmp / "no_such_model")], ["no_such_model does not exist; check --compare-to"]),
    ("model-hub-offline", lambda e: ["--model", "nobody-here/no-such-model"], ["nobody-here/no-such-model", "Offline?", "--model"]),
    ("offload-folder-a-file", lambda e: ["--device-map", "auto", "--offload-folder", e.file("off", "x")], ["--offload-folder", "off is a file, not a folder"]),
    ("offload-folder-not-writable", lambda e: ["--device-map", "auto", "--offload-folder", "/proc/self"], ["--offload-folder /proc/self cannot be written (", "writable folder"]),
    ("offload-folder-under-a-file", lambda e: ["--device-map", "auto", "--offload-folder", e.file("f", "x") + "/sub"], ["--offload-folder", "f/sub cannot be written"]),
    # --- the data ---
    ("hub-dataset-offline", lambda e: ["--data-files", "none", "--dataset", "nobody-here/no-such-dataset"], ["nobody-here/no-such-dataset", "--data-files"]),
    ("data-files-empty-string", lambda e: ["--data-files", ""], ["--data-files is empty", "--dataset"]),
    ("data-missing", lambda e: ["--data-files", str(e.tmp / "nope.jsonl")], ["nope.jsonl does not exist", "--data-files"]),
    ("data-directory", lambda e: ["--data-files", e.folder("corpus")], ["corpus is a directory", "--data-files"]),
    ("data-unknown-ext", lambda e: ["--data-files", e.file("d.xml", "<a/>")], ["cannot tell the format", "d.xml", "--dataset"]),
    ("data-empty-jsonl", lambda e: ["--data-files", e.file("empty.jsonl", "")], ["empty.jsonl is empty"]),
    ("data-empty-txt", lambda e: ["--data-files", e.file("empty.txt", "")], ["empty.txt is empty"]),
    ("data-blank-jsonl", lambda e: ["--data-files", e.file("blank.jsonl", "\n\n  \n")], ["blank.jsonl: no rows, only blank lines; point --data-files at"]),
    ("limit-0", lambda e: ["--limit", "0"], ["--limit must be at least 1, got 0"]),
    ("jsonl-not-json", lambda e: ["--data-files", e.file("bad.jsonl", '{"text": "a"}\n{"text": "b"\n{"text": "c"}\n')], ["bad.jsonl:2:", "not valid JSON"]),
    ("jsonl-lone-surrogate", lambda e: ["--data-files", e.file("sur.jsonl", '{"text": "a"}\n{"text": "b \\ud800 c"}\n')], ["sur.jsonl:2:", "lone surrogate '\\ud800'"]),
    ("jsonl-array-row", lambda e: ["--data-files", e.file("arr.jsonl", '{"text": "a"}\n["b", "c"]\n')], ["arr.jsonl:2:", "a JSON array, not an object"]),
    ("text-field-never-a-string", lambda e: ["--text-field", "n"], ["nothing to score", "no row has a string in field 'n'"]),
    ("jsonl-no-text-field-streaming", lambda e: ["--streaming", "--text-field", "body"], ["'body'"]),
    ("jsonl-no-text-field", lambda e: ["--data-files", e.good, "--text-field", "body"], ["has no field 'body'", "text, n"]),
    ("json-document-not-rows", lambda e: ["--data-files", e.file("doc.json", '{\n"text": [1, 2],\n"x": {"y": ]\n}\n')], ["doc.json:3: not valid JSON", "fix the file"]),
    ("parquet-garbage", lambda e: ["--data-files", e.file("d.parquet", os.urandom(300))], ["cannot read", "d.parquet as parquet"]),
    ("csv-unclosed-quote", lambda e: ["--data-files", e.file("q.csv", 'text\n"never closed\nmore\n')], ["cannot read", "q.csv as csv: Error tokenizing data"]),
    ("csv-no-text-column", lambda e: ["--data-files", e.file("d.csv", "title,body\na,hello\nb,world\n")], ["d.csv has no field 'text'", "title, body"]),
    ("txt-not-utf8", lambda e: ["--data-files", e.file("latin.txt", b"fine line\n" + BAD_UTF8)], ["latin.txt:2", "UTF-8", "iconv"]),
    ("jsonl-not-utf8", lambda e: ["--data-files", e.file("latin.jsonl", b'{"text": "ok"}\n{"text": "' + BAD_UTF8.strip() + b'"}\n')], ["latin.jsonl:2", "UTF-8", "iconv"]),
    ("csv-not-utf8", lambda e: ["--data-files", e.file("latin.csv", b"text\nok\n" + BAD_UTF8)], ["latin.csv:3", "UTF-8", "iconv"]),
    ("jsonl-not-json-streaming", lambda e: ["--streaming", "--data-files", e.file("bad.jsonl", '{"text": "a"}\nnot json\n')], ["bad.jsonl:2:", "not valid JSON"]),
    ("txt-not-utf8-streaming", lambda e: ["--streaming", "--data-files", e.file("latin.txt", BAD_UTF8)], ["latin.txt:1", "UTF-8", "iconv"]),
    # --- lengths and sizes ---
    ("stride-over-max-length", lambda e: ["--max-length", "16", "--stride", "32"], ["--stride 32 is larger than --max-length 16"]),
    ("max-length-beyond-model", lambda e: ["--max-length", "300"], ["--max-length 300 is beyond the model's 256 positions", "--max-length 256"]),
    ("stream-max-length-1", lambda e: ["--mode", "stream", "--max-length", "1"], ["--mode stream --max-length 1 scores nothing", "--max-length 2"]),
    ("llama-cpp-max-length-2", lambda e: ["--protocol", "llama-cpp", "--max-length", "2"], ["--mode llama-cpp --max-length 2 scores nothing", "--max-length 3 or more"]),
    ("max-length-0", lambda e: ["--max-length", "0"], ["--max-length must be at least 1, got 0"]),
    ("batch-size-negative", lambda e: ["--batch-size", "-1"], ["--batch-size must be at least 1, got -1"]),
    # --- the command line and config files ---
    ("int-not-a-number", lambda e: ["--max-length", "abc"], ["--max-length must be a whole number, got 'abc'"]),
    ("int-superscript", lambda e: ["--batch-size", "²"], ["--batch-size must be a whole number, got '²'"]),
    ("bool-not-a-bool", lambda e: ["--streaming", "maybe"], ["--streaming must be true or false, got 'maybe'"]),
    ("unknown-flag", lambda e: ["--max-lenght", "5"], ["unknown flag '--max-lenght'; did you mean --max-length?"]),
    ("unknown-flag-far", lambda e: ["--zzz", "5"], ["unknown flag '--zzz'; see --help"]),
    ("bare-argument", lambda e: ["model.gguf"], ["unexpected argument 'model.gguf'"]),
    ("yaml-unknown-key", lambda e: yaml_config(e, "max_lenght: 5\n"), ["run.yaml", "unknown field 'max_lenght'", "did you mean 'max_length'"]),
    ("yaml-wrong-type", lambda e: yaml_config(e, 'max_length: "long"\n'), ["run.yaml: field 'max_length' must be a whole number, got 'long'"]),
    ("yaml-invalid", lambda e: yaml_config(e, "model: [unclosed\nmode: stream\n"), ["run.yaml", "not valid YAML", "line"]),
    ("yaml-not-mapping", lambda e: yaml_config(e, "- a\n- b\n"), ["run.yaml", "mapping"]),
    ("yaml-not-utf8", lambda e: ["--config", e.file("run.yaml", b"model: caf\xe9\n")], ["run.yaml:1: not UTF-8", "save the config file as UTF-8"]),
    ("config-missing", lambda e: ["--config", str(e.tmp / "nope.yaml")], ["nope.yaml does not exist"]),
    ("mode-wrong", lambda e: ["--mode", "wrong"], ["--mode is 'wrong'; choose one of document, stream, llama-cpp, gptq"]),
    ("prompt-field-stream", lambda e: ["--mode", "stream", "--prompt-field", "n"], ["--prompt-field needs --mode document"]),
    # --- the tokenizer ---
    ("no-bos-eos-auto", lambda e: ["--model", e.no_specials, "--prefix-token", "auto"], ["neither a BOS nor an EOS", "--prefix-token none"]),
    ("no-bos-eos-bos", lambda e: ["--model", e.no_specials, "--prefix-token", "bos"], ["--prefix-token bos", "no BOS token", "--prefix-token none"]),
]


# fragments a case's line must NOT hold: it names the right flag and does not blame what is not wrong
ABSENT = {
    "compare-to-missing": ["--model"],
    "stream-max-length-1": ["--text-field", "text field"],
    "llama-cpp-max-length-2": ["--text-field"],
    "model-remote-code": ["hf.co", "config.json, the weights"],
}


@pytest.mark.parametrize("case,args,fragments", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_with_one_clear_line(env, capsys, case, args, fragments):
    code = main(base(env, args(env)))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    print(f"{case}: {err}")
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("lm_ce: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    for fragment in ABSENT.get(case, []):
        assert fragment not in lines[0], (fragment, lines[0])


def results_of(e: Env, args: list[str]) -> tuple[dict, list[dict]]:
    """Run the CLI to completion: (results.json, documents.jsonl rows)."""
    out = e.tmp / "run"
    assert main(base(e, args + ["--output-dir", str(out)])) == 0
    documents = out / "documents.jsonl"
    rows = [json.loads(line) for line in documents.read_text().splitlines()] if documents.exists() else []
    return json.loads((out / "results.json").read_text()), rows


def assert_finite(summary: dict) -> None:
    for name, value in summary["metrics"].items():
        assert value is not None and math.isfinite(value), (name, value)
    assert math.isfinite(summary["nll_sum"]) and summary["counts"]["tokens"] > 0


@pytest.mark.parametrize("first", ["string", "number"])
def test_text_not_a_string_in_some_rows_is_skipped_and_counted(env, first):
    """Rows whose text is missing, null, a number or a list are counted as skipped ("not_text"), not dropped."""
    rows = [{"text": 5}, {"other": "no text here"}, {"text": None}, {"text": ["a", "b"]}, {"text": {"a": 1}}]
    rows = ([{"text": "Hello world."}] + rows if first == "string" else rows + [{"text": "Hello world."}])
    rows.append({"text": "Good morning!"})
    summary, documents = results_of(env, ["--data-files", make_jsonl(env.tmp / "mixed.jsonl", rows)])
    assert summary["counts"]["documents"] == 2
    assert summary["counts"]["skipped_documents"] == 5
    assert sorted(d["skipped"] or "" for d in documents) == ["", ""] + ["not_text"] * 5
    assert_finite(summary)


def test_csv_with_empty_text_cells_is_skipped_and_counted(env):
    path = env.file("d.csv", "text,n\nHello world.,1\n,2\nGood morning!,3\n")
    summary, documents = results_of(env, ["--data-files", path])
    assert (summary["counts"]["documents"], summary["counts"]["skipped_documents"]) == (2, 1)
    assert [d["skipped"] for d in documents] == [None, "not_text", None]


def test_utf8_bom_is_not_part_of_the_text(env):
    path = env.file("bom.jsonl", b'\xef\xbb\xbf{"text": "Hello world."}\n{"text": "Good morning!"}\n')
    summary, _ = results_of(env, ["--data-files", path])
    assert summary["counts"]["documents"] == 2 and summary["counts"]["bytes"] == len("Hello world.Good morning!")


@pytest.mark.parametrize("streaming", [False, True])
def test_utf8_bom_in_a_text_file_is_not_scored(env, streaming):
    """A .txt file saved with a byte order mark scores exactly like the same file without it."""
    text = "Hello world.\nGood morning!\n"
    flags = ["--streaming"] if streaming else []
    plain, plain_docs = results_of(env, ["--data-files", env.file("plain.txt", text), *flags])
    shutil.rmtree(env.tmp / "run")
    bom, bom_docs = results_of(env, ["--data-files", env.file("bom.txt", b"\xef\xbb\xbf" + text.encode()), *flags])
    assert bom["counts"] == plain["counts"] and bom["counts"]["bytes"] == len("Hello world.Good morning!")
    assert bom["nll_sum"] == plain["nll_sum"]
    assert [d["tokens"] for d in bom_docs] == [d["tokens"] for d in plain_docs]


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_groups_add_up_to_the_total_and_whole_numbers_stay_whole(env, suffix):
    """Documents without a group value are a group of their own; group 1 is `1` whatever the column type
    (pandas reads a CSV column of whole numbers with empty cells as float64, which once showed `1.0`)."""
    texts = ["Hello world.", "Good morning!", "The quick brown fox.", "A lazy dog."]
    if suffix == "jsonl":
        path = make_jsonl(env.tmp / "g.jsonl", [{"text": t, "g": g} for t, g in zip(texts, [1, None, 2, 1])])
    else:
        path = env.file("g.csv", "text,g\n" + "".join(f"{t},{g}\n" for t, g in zip(texts, ["1", "", "2", "1"])))
    summary, documents = results_of(env, ["--data-files", path, "--group-field", "g"])
    groups = summary["groups"]
    assert sorted(groups) == ["(null)", "1", "2"]
    assert [d["group"] for d in documents] == ["1", None, "2", "1"]
    assert sum(g["documents"] for g in groups.values()) == summary["counts"]["documents"] == 4
    assert sum(g["tokens"] for g in groups.values()) == summary["counts"]["tokens"]
    assert math.isclose(sum(g["nll_sum"] for g in groups.values()), summary["nll_sum"], rel_tol=1e-12)


@pytest.mark.parametrize("mode", ["document", "stream"])
def test_a_small_stride_says_its_cost_before_scoring(env, capsys, mode):
    """--stride 1 makes a window per token: the windows, the tokens they read and a time estimate are said."""
    path = make_jsonl(env.tmp / "long.jsonl", [{"text": "The quick brown fox jumps over the lazy dog. " * 8}] * 2)
    summary, _ = results_of(env, ["--data-files", path, "--mode", mode, "--max-length", "64", "--stride", "1"])
    err = capsys.readouterr().err
    assert summary["counts"]["windows"] > 100
    windows = summary["counts"]["windows"]
    assert f"--stride 1 with --max-length 64: {windows:,} windows" in err, err
    assert "estimated scoring time: about" in err, err
    results_of(env, ["--data-files", path, "--mode", mode, "--max-length", "64", "--stride", "32", "--overwrite"])
    assert "windows" not in capsys.readouterr().err  # an ordinary stride says nothing


ODD = [
    "   \t  ",  # whitespace only: an empty document, counted as skipped ("empty"), its tokens not scored
    "a",  # one character: one target after the BOS
    "",  # empty: nothing to score, counted as skipped ("empty")
    "Le café était fermé. Ça va? 😀🎉 交叉熵损失函数。Ελληνικά, русский текст. 🐍🦀",
    "The quick brown fox jumps over the lazy dog. " * 4445,  # one line of about 200k characters
]


@pytest.mark.parametrize("mode", ["document", "stream"])
def test_odd_documents_are_scored_or_counted(env, mode):
    path = make_jsonl(env.tmp / "odd.jsonl", [{"text": t} for t in ODD])
    summary, documents = results_of(env, ["--data-files", path, "--mode", mode, "--max-length", "256", "--batch-size", "64"])
    counts = summary["counts"]
    assert counts["tokens"] > 20000
    scored = ODD if mode == "stream" else ODD[1:]  # a stream's bytes are its joined text's, whitespace rows included
    assert counts["bytes"] == len(("\n\n" if mode == "stream" else "").join(scored).encode("utf-8"))
    if mode == "document":  # whitespace and "": empty documents, skipped
        assert (counts["documents"], counts["skipped_documents"]) == (3, 2) and "joined_empty_rows" not in counts
        assert [d["skipped"] for d in documents] == ["empty", None, "empty", None, None]
    else:  # joined into the stream with their separators (the bytes count them): joined, not skipped
        assert (counts["documents"], counts["skipped_documents"], counts["joined_empty_rows"]) == (3, 0, 2)
        assert "| empty rows joined | 2 |" in (env.tmp / "run" / "results.md").read_text()
    assert_finite(summary)


def test_a_stream_skips_only_rows_without_text(env, capsys):
    """A row with no text is left out of the stream (skipped); an empty one is joined (its separator is scored)."""
    rows = [{"text": "Hello world."}, {"text": ""}, {"text": None}, {"text": "Good morning!"}, {"text": "  "}]
    summary, _ = results_of(env, ["--data-files", make_jsonl(env.tmp / "s.jsonl", rows), "--mode", "stream"])
    counts = summary["counts"]
    assert (counts["documents"], counts["skipped_documents"], counts["joined_empty_rows"]) == (2, 1, 2)
    assert counts["bytes"] == len("\n\n".join(["Hello world.", "", "Good morning!", "  "]).encode())
    table = capsys.readouterr().out
    assert [line.split()[-1] for line in table.splitlines() if "empty rows joined" in line or "documents skipped" in line] == ["1", "2"]


def test_odd_documents_in_a_text_file(env):
    """The same documents as lines of a .txt file: the empty line is counted as skipped."""
    path = env.file("odd.txt", "\n".join(ODD) + "\n")
    summary, documents = results_of(env, ["--data-files", path, "--max-length", "256", "--batch-size", "64"])
    assert [d["skipped"] for d in documents] == ["empty", None, "empty", None, None]
    assert_finite(summary)


SUBPROCESS = ["unknown-flag", "gguf-magic-truncated", "model-truncated-safetensors", "jsonl-not-json"]


@pytest.mark.parametrize("case", SUBPROCESS)
def test_subprocess_exit_2_without_traceback(env, case):
    """In a real process nothing else reaches stderr: no traceback, no library log line, exit code 2."""
    args, fragments = {c[0]: c[1:] for c in REFUSED}[case]
    run_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LM_CE_CACHE": str(env.tmp / "cache")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), *base(env, args(env))],
        capture_output=True, text=True, env=run_env, timeout=120, cwd=env.tmp,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("lm_ce: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("block", [1, 2, 3, 5, 2**24])
def test_utf8_check_across_block_boundaries(tmp_path, block):
    """Characters split between blocks are valid; the first bad byte is found at the right line and column."""
    from lm_ce.data.local import first_bad_utf8

    good = tmp_path / "good.txt"
    good.write_text("café 🙂\nŁódź — 交叉熵\n", encoding="utf-8")
    assert first_bad_utf8(str(good), block) is None
    bad = tmp_path / "bad.txt"
    bad.write_bytes("🙂 ok\nnaïve ".encode() + b"\xe9t\xc3\xa9\n")
    assert f"{bad}:2: not valid UTF-8 (byte 0xe9, byte 8 of the line)" in first_bad_utf8(str(bad), block)
    cut = tmp_path / "cut.txt"
    cut.write_bytes("ok\n🙂".encode()[:-1])  # the file ends inside a character
    assert f"{cut}:2: not valid UTF-8" in first_bad_utf8(str(cut), block)


@pytest.mark.parametrize("field", ["text", "prompt", "group"])
def test_a_lone_surrogate_from_python_is_refused_naming_the_document(env, field):
    """Python's json reads "\\ud800" as a string; in a row given to lm_ce.evaluate it is named in one line, as the
    command line names the file's line (jsonl-lone-surrogate), never a tokenizer's traceback."""
    import lm_ce
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [{"text": "Hello world.", "prompt": "Say:", "group": "g", "id": f"d{i}"} for i in range(3)]
    rows[2][field] = "b \ud800 c"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(env.llama), AutoTokenizer.from_pretrained(env.llama)
    with pytest.raises(lm_ce.UsageError) as refused:
        lm_ce.evaluate(model, tokenizer, rows, id_field="id", group_field="group", prompt_field="prompt", progress=False)
    message = str(refused.value)
    assert "\n" not in message and f"document 2 (id 'd2'): its {field} holds a lone surrogate '\\ud800'" in message
