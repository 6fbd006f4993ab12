"""Suites: each dataset scored as its own run with one model, pooled (micro) and mean (macro) figures, resume."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil

import pytest
import yaml

from lm_ce.config.sources import build_config, entry_config
from lm_ce.errors import UsageError
from lm_ce.reports import files as report_files
from lm_ce.reports import tables
from lm_ce.runner import evaluate


@pytest.fixture
def suite_file(tmp_path, texts, write_jsonl):
    docs = write_jsonl([{"text": t} for t in texts[:10]], "docs.jsonl")
    book = tmp_path / "book.txt"
    book.write_text("\n".join(texts[8:11]) + "\n", encoding="utf-8")
    config = {
        "model": "tiny", "progress": False, "plot": False, "max_length": 32, "batch_size": 4,
        "suite": [
            {"name": "docs", "data_files": [docs], "stride": 16},
            {"name": "book", "data_files": [str(book)], "protocol": "llama-cpp", "max_length": 16, "chunks": 9},
        ],
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


def test_suite_equals_separate_runs_with_micro_and_macro(tiny_llama, llama_tokenizer, suite_file, tmp_path):
    cfg = build_config(["--config", suite_file, "--output-dir", str(tmp_path / "out")])
    res = evaluate(cfg, model=tiny_llama, tokenizer=llama_tokenizer)
    suite = res.summary["suite"]
    assert list(suite["datasets"]) == ["docs", "book"] and res.summary["complete"]
    separate = {}
    for entry in cfg.suite:
        alone = evaluate(dataclasses.replace(entry_config(cfg, entry), output_dir=None), model=tiny_llama,
                         tokenizer=llama_tokenizer)
        separate[entry["name"]] = alone.summary
        mine = suite["datasets"][entry["name"]]
        for key in ("nll_sum", "counts", "metrics", "uncertainty", "settings"):
            assert mine[key] == alone.summary[key], (entry["name"], key)
    docs, book = separate["docs"], separate["book"]
    assert (docs["settings"]["mode"], docs["settings"]["stride"]) == ("document", 16)
    assert (book["settings"]["protocol"], book["settings"]["max_length"], book["counts"]["tokens"]) == ("llama-cpp", 16, 9 * 7)
    nll = docs["nll_sum"] + book["nll_sum"]
    tokens = docs["counts"]["tokens"] + book["counts"]["tokens"]
    n_bytes = docs["counts"]["bytes"] + book["counts"]["bytes"]
    micro, macro = suite["micro"], suite["macro"]
    assert micro["tokens"] == tokens and math.isclose(micro["nll_sum"], nll, rel_tol=1e-15)
    assert math.isclose(micro["mean_loss"], nll / tokens, rel_tol=1e-12)
    assert math.isclose(micro["bits_per_byte"], nll / n_bytes / math.log(2), rel_tol=1e-12)
    for key in ("mean_loss", "bits_per_byte", "perplexity"):
        assert math.isclose(macro[key], (docs["metrics"][key] + book["metrics"][key]) / 2, rel_tol=1e-12)
    assert macro["mean_loss"] != pytest.approx(micro["mean_loss"])  # unweighted: the datasets differ in size
    text = tables.table(res.summary)
    assert [line.split()[0] for line in text.splitlines()[2:]] == ["docs", "book", "micro", "macro"]


def test_suite_files_and_resume_across_datasets(tiny_llama, llama_tokenizer, suite_file, tmp_path):
    out = tmp_path / "out"
    cfg = build_config(["--config", suite_file, "--output-dir", str(out)])
    first = evaluate(cfg, model=tiny_llama, tokenizer=llama_tokenizer)
    report_files.write(first, str(out), plot=False)
    written = json.loads((out / "results.json").read_text())
    assert set(written["suite"]) == {"datasets", "micro", "macro"}
    assert json.loads((out / "book" / "results.json").read_text())["settings"]["protocol"] == "llama-cpp"
    assert (out / "docs" / "documents.jsonl").is_file()
    shutil.rmtree(out / "book")  # as if stopped before the second dataset: the first is reported from its state
    again = evaluate(dataclasses.replace(cfg, resume=True), model=tiny_llama, tokenizer=llama_tokenizer)
    for name in ("docs", "book"):
        for key in ("nll_sum", "counts", "metrics"):
            assert again.summary["suite"]["datasets"][name][key] == first.summary["suite"]["datasets"][name][key]
    assert again.summary["suite"]["micro"] == first.summary["suite"]["micro"]


@pytest.mark.parametrize("suite,needle", [
    ("nope", "must be a list"),
    ([{"data_files": ["a.jsonl"]}], "give a mapping with a 'name'"),
    ([{"name": "a"}, {"name": "a"}], "used twice"),
    ([{"name": "a", "model": "gpt2"}], "set once for the whole suite"),
    ([{"name": "a", "max_lenght": 5}], "did you mean 'max_length'"),
    ([{"name": "a", "protocol": "gptq", "stride": 4}], "suite entry 1 ('a'): mode='gptq', set by protocol='gptq', cuts non-overlapping chunks and takes no stride; drop stride"),
])
def test_bad_suites_are_refused_in_one_line(tmp_path, suite, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"suite": suite}), encoding="utf-8")
    with pytest.raises(UsageError, match=re.escape(needle)) as e:
        build_config(["--config", str(path)])
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="config file"):
        build_config(["--suite", "x"])
