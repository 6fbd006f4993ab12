"""lm_ce.evaluate on objects in memory: the CLI's numbers, every kind of data, no files unless asked,
and the model given back as it was found (modes, device, weights), with the global RNG and threads."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

import lm_ce
from lm_ce.cli.main import main
from lm_ce.errors import UsageError

from .conftest import make_jsonl

SETTINGS = {"max_length": 32, "stride": 16, "batch_size": 3}
FLAGS = ["--max-length", "32", "--stride", "16", "--batch-size", "3"]


@pytest.fixture(scope="module")
def held_out(texts) -> list[str]:
    """Text the tiny models never saw in training (they are random), with an empty and a non-English one."""
    return texts[3:]


@pytest.fixture(scope="module")
def held_out_file(tmp_path_factory, held_out) -> str:
    return make_jsonl(tmp_path_factory.mktemp("api") / "held_out.jsonl", [{"body": t} for t in held_out])


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-7 * max(1.0, abs(b))


def same_run(a: lm_ce.Results, b: dict, documents_b: list[dict]) -> None:
    """Summary and per-document rows of an API run `a` equal those of results.json `b` and documents.jsonl."""
    assert a.summary["counts"] == b["counts"]
    assert close(a.summary["nll_sum"], b["nll_sum"])
    for key, value in b["metrics"].items():
        assert close(a.summary["metrics"][key], value), key
    assert [(d.index, d.tokens, d.bytes, d.skipped) for d in a.documents] == \
        [(d["index"], d["tokens"], d["bytes"], d["skipped"]) for d in documents_b]
    assert all(close(d.nll_sum, e["nll_sum"]) for d, e in zip(a.documents, documents_b))


def cli_run(model_dir: str, data: str, out: Path, capsys, *flags: str) -> tuple[dict, list[dict]]:
    code = main(["--model", model_dir, "--data-files", data, "--text-field", "body", *FLAGS, *flags,
                 "--output-dir", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    docs = out / "documents.jsonl"
    rows = [json.loads(line) for line in docs.read_text().splitlines()] if docs.exists() else []
    return json.loads((out / "results.json").read_text()), rows


@pytest.mark.parametrize("mode", ["document", "stream"])
def test_api_equals_cli(tiny_llama_dir, tiny_llama, llama_tokenizer, held_out, held_out_file, tmp_path, capsys, mode):
    summary, rows = cli_run(tiny_llama_dir, held_out_file, tmp_path / "cli", capsys, "--mode", mode)
    results = lm_ce.evaluate(tiny_llama, llama_tokenizer, held_out, mode=mode, progress=False, **SETTINGS)
    assert results.summary["counts"]["tokens"] > 1000
    assert len(results.documents) == len(rows) == (len(held_out) if mode == "document" else 0)
    same_run(results, summary, rows)
    assert set(results.summary) == set(summary)  # the keys of results.json
    assert results.summary["data"]["source"] == "memory" and summary["data"]["source"] == "files"


def test_every_kind_of_data_gives_the_same_run(tiny_gpt2, gpt2_tokenizer, held_out, held_out_file):
    import datasets

    table = datasets.Dataset.from_dict({"body": held_out, "n": list(range(len(held_out)))})
    kinds = {
        "list of strings": (held_out, {}),
        "tuple of strings": (tuple(held_out), {}),
        "list of rows": ([{"body": t} for t in held_out], {"text_field": "body"}),
        "Dataset": (table, {"text_field": "body"}),
        "IterableDataset": (table.to_iterable_dataset(), {"text_field": "body"}),
        "path": (held_out_file, {"text_field": "body"}),
        "Path": (Path(held_out_file), {"text_field": "body"}),
        "settings": (None, {"data_files": [held_out_file], "text_field": "body"}),
    }
    runs = {name: lm_ce.evaluate(tiny_gpt2, gpt2_tokenizer, data, progress=False, **SETTINGS, **extra)
            for name, (data, extra) in kinds.items()}
    first = runs["list of strings"]
    rows = [{"index": d.index, "tokens": d.tokens, "bytes": d.bytes, "skipped": d.skipped, "nll_sum": d.nll_sum}
            for d in first.documents]
    for name, results in runs.items():
        same_run(results, first.summary, rows)
    assert runs["Dataset"].summary["data"] == {**runs["list of strings"].summary["data"], "text_field": "body"}
    assert runs["path"].summary["data"]["files"][0]["path"] == held_out_file


def test_no_files_without_output_dir_and_the_cli_files_with_it(tiny_llama_dir, tiny_llama, llama_tokenizer, held_out,
                                                              held_out_file, tmp_path, monkeypatch, capsys):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    lm_ce.evaluate(tiny_llama, llama_tokenizer, held_out, progress=False, **SETTINGS)
    lm_ce.evaluate(tiny_llama, llama_tokenizer, held_out_file, text_field="body", progress=False, **SETTINGS)
    assert list(work.iterdir()) == []
    out = tmp_path / "api"
    lm_ce.evaluate(tiny_llama, llama_tokenizer, held_out_file, text_field="body", output_dir=str(out), progress=False,
                   **SETTINGS)
    cli_run(tiny_llama_dir, held_out_file, tmp_path / "cli", capsys)
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(p.name for p in (tmp_path / "cli").iterdir())
    assert {"results.json", "results.md", "config.yaml", "documents.jsonl", "position_loss.png"} <= set(written)


def test_in_memory_config_yaml_does_not_rerun_on_other_data(tiny_llama, llama_tokenizer, held_out, tmp_path, capsys):
    out = tmp_path / "run"
    lm_ce.evaluate(tiny_llama, llama_tokenizer, held_out, output_dir=str(out), progress=False, **SETTINGS)
    assert "wikitext" not in (out / "results.md").read_text()
    assert main(["--config", str(out / "config.yaml"), "--output-dir", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "given in memory" in err and "--data-files" in err


def _modes(model: torch.nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_model_rng_and_threads_are_given_back(tiny_llama_dir, llama_tokenizer, held_out, device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).to(device).train()
    model.model.layers[1].eval()  # a mix of modes, as with frozen parts
    modes, weights = _modes(model), {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    lm_ce.evaluate(model, llama_tokenizer, held_out, progress=False, threads=threads + 1, seed=7, **SETTINGS)
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's random stream goes on as if nothing ran
    assert torch.get_num_threads() == threads
    assert _modes(model) == modes and model.training and not model.model.layers[1].training
    assert all(p.device.type == device for p in model.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_bad_settings_and_data_are_refused_by_name(tiny_llama, llama_tokenizer, held_out):
    cases = [
        ({"max_lenght": 32}, "unknown field 'max_lenght'; did you mean 'max_length'?"),
        ({"max_length": "long"}, "field 'max_length' must be a whole number"),
        ({"mode": "streaming"}, "choose one of document, stream"),
        ({"data_files": ["x.jsonl"]}, "leave out data_files"),
        ({"dataset": "wikitext"}, "leave out dataset"),
    ]
    for settings, message in cases:
        with pytest.raises(UsageError, match=message.replace("?", r"\?")):
            lm_ce.evaluate(tiny_llama, llama_tokenizer, held_out, **settings)
    for data, message in [("no_such_file.jsonl", "is no file"), (iter(held_out), "an iterator would be used up"),
                          ([1, 2], "list of strings")]:
        with pytest.raises(UsageError, match=message):
            lm_ce.evaluate(tiny_llama, llama_tokenizer, data)
    with pytest.raises(UsageError, match="tokenizer"):
        lm_ce.evaluate(tiny_llama, None, held_out)
    with pytest.raises(UsageError, match="resume"):
        lm_ce.evaluate(tiny_llama, llama_tokenizer, held_out, resume=True, output_dir=os.devnull)


def test_model_is_named_by_where_it_came_from(tiny_llama, llama_tokenizer, held_out):
    results = lm_ce.evaluate(tiny_llama, llama_tokenizer, held_out[:2], progress=False)
    assert results.summary["model"]["name"] == tiny_llama.name_or_path and results.summary["model"]["source"] == "object"
    named = lm_ce.evaluate(tiny_llama, llama_tokenizer, held_out[:2], model="my-finetune step 200", progress=False)
    assert named.summary["model"]["name"] == "my-finetune step 200"
    assert math.isclose(named.summary["nll_sum"], results.summary["nll_sum"], rel_tol=0, abs_tol=0)
