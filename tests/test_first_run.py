"""What a new user hits first: a local-file run reports the files and the CPU, a Hub id without network
fails at once with one line, the data cache can be kept in the output or off, the plot is part of the
default install, and writing the GGUF cache shows no library progress bar."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lm_ce import compat
from lm_ce.cli.main import main
from lm_ce.config.fields import Config
from lm_ce.model import diagnose, gguf
from lm_ce.model import load as model_load
from lm_ce.reports.tables import md

from .conftest import make_jsonl

ROOT = Path(__file__).resolve().parent.parent


def _cpu_model() -> str | None:
    """The "model name" line of /proc/cpuinfo, read here independently of lm_ce."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def test_local_file_run_reports_the_files_and_the_cpu(tiny_llama_dir, tmp_path, capsys):
    first = make_jsonl(tmp_path / "a.jsonl", [{"text": "The quick brown fox jumps over the lazy dog."}])
    second = make_jsonl(tmp_path / "b.jsonl", [{"text": "Hello world."}, {"text": "Is it raining?"}])
    out = tmp_path / "run"
    assert main(["--model", tiny_llama_dir, "--data-files", f"{first},{second}", "--output-dir", str(out), "--no-progress"]) == 0
    data = json.loads((out / "results.json").read_text())["data"]
    assert data["source"] == "files" and data["format"] == "json" and data["data_files"] == [first, second]
    assert [f["path"] for f in data["files"]] == [first, second]
    for f in data["files"]:
        content = Path(f["path"]).read_bytes()
        assert f["sha256"] == hashlib.sha256(content).hexdigest() and f["bytes"] == len(content)
    assert not {"dataset", "dataset_config", "split"} & set(data)
    report = (out / "results.md").read_text()
    run = report[report.index("## What was run"):]
    assert "wikitext" not in report and "dataset_config" not in run
    for f in data["files"]:
        assert md(f["path"]) in run and f["sha256"] in run
    device_name = json.loads((out / "results.json").read_text())["environment"]["device_name"]
    assert f"| environment.device_name | {md(device_name)} |" in run
    if _cpu_model():
        assert device_name == _cpu_model()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_hub_id_without_network_fails_at_once_with_one_line(tmp_path):
    data = make_jsonl(tmp_path / "a.jsonl", [{"text": "Hello world."}])
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", "some-org/some-model",
                           "--data-files", data], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    line = done.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    # this line comes from the quick check (transformers' own, after about a minute of retries, reads otherwise)
    assert "cannot reach the Hugging Face Hub at http://127.0.0.1:" in line and "--model" in line


def test_the_quick_check_lets_cached_models_and_offline_mode_through(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert "cannot reach" in str(diagnose.hub_unreachable("some-org/some-model", Config()))
    snapshot = tmp_path / "hub" / "models--some-org--some-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    assert diagnose.hub_unreachable("some-org/some-model", Config()) is None  # in the cache: load it from there
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert diagnose.hub_unreachable("other-org/other-model", Config()) is None  # offline: transformers says it at once


def _arrow_files(folder: Path) -> list[Path]:
    return list(folder.rglob("*.arrow")) if folder.exists() else []


def test_data_cache_in_the_output_or_off(tiny_gpt2_dir, tmp_path, monkeypatch, capsys):
    import datasets

    default_cache = tmp_path / "default_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", default_cache)
    data = make_jsonl(tmp_path / "a.jsonl", [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "Hi."}])
    figures = {}
    for choice in ("off", "output", "default"):
        out = tmp_path / choice
        assert main(["--model", tiny_gpt2_dir, "--data-files", data, "--data-cache", choice, "--output-dir", str(out),
                     "--no-progress"]) == 0
        figures[choice] = json.loads((out / "results.json").read_text())["nll_sum"]
        in_output = _arrow_files(out / "datasets_cache")
        assert bool(in_output) == (choice == "output")
        assert bool(_arrow_files(default_cache)) == (choice == "default")  # off and output leave it untouched
    assert figures["off"] == figures["output"] == figures["default"]
    assert main(["--model", tiny_gpt2_dir, "--data-files", data, "--data-cache", "output"]) == 2
    assert "--output-dir" in capsys.readouterr().err


def test_the_plot_is_part_of_the_default_install(tiny_gpt2_dir, tmp_path):
    text = (ROOT / "pyproject.toml").read_text()
    dependencies = text[text.index("\ndependencies = ["):text.index("\n]", text.index("\ndependencies = ["))]
    assert '"matplotlib' in dependencies  # not only in an extra
    data = make_jsonl(tmp_path / "a.jsonl", [{"text": "The quick brown fox jumps over the lazy dog."}])
    assert main(["--model", tiny_gpt2_dir, "--data-files", data, "--output-dir", str(tmp_path / "run"),
                 "--no-progress"]) == 0
    png = (tmp_path / "run" / "position_loss.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_writing_the_gguf_cache_shows_no_library_bar(tiny_llama, llama_tokenizer, tmp_path, monkeypatch):
    import safetensors.torch
    import transformers
    from huggingface_hub.utils import are_progress_bars_disabled

    seen = []
    save_file = safetensors.torch.save_file  # what save_gguf_cache writes the weights with

    def watched(*args, **kwargs):
        seen.append((transformers.utils.logging.is_progress_bar_enabled(), are_progress_bars_disabled()))
        return save_file(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", watched)
    transformers.utils.logging.enable_progress_bar()
    target = tmp_path / "cache" / "model"
    gguf.save_gguf_cache(tiny_llama, llama_tokenizer, str(target))
    assert (target / "model.safetensors").is_file()
    assert seen == [(False, True)]  # both libraries' bars off while writing
    assert transformers.utils.logging.is_progress_bar_enabled()  # and as they were afterwards


def test_loading_drops_the_tables_a_fast_tokenizer_was_built_from(tiny_llama_dir, tmp_path):
    """transformers keeps the Python vocabulary and merge list it built a fast tokenizer from (125 MB at Gemma-3's
    262k vocabulary) though nothing reads them again: model.load deletes them, and the tokenizer stays the same."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaTokenizer

    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyz.,", "▁t", "he", "▁the", "at", "▁c"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{p: i + 3 for i, p in enumerate(pieces)}}
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("a", "t"), ("▁", "c")]
    target = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, target)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (target / name).unlink(missing_ok=True)
    LlamaTokenizer(vocab=vocab, merges=merges).save_pretrained(target)
    fresh = AutoTokenizer.from_pretrained(target)
    if not all(hasattr(fresh, name) for name in ("_vocab", "_merges")):
        pytest.skip(f"this transformers ({type(fresh).__name__}) keeps no build tables")
    _, loaded, _ = model_load.load(Config(model=str(target)), torch.device("cpu"))
    assert not any(hasattr(loaded, name) for name in compat.BUILD_TABLES)
    text = "the cat. the hat, a chat"
    ids = fresh(text)["input_ids"]
    assert loaded(text)["input_ids"] == ids and len(set(ids)) > 5  # merged pieces, not characters alone
    assert loaded.get_vocab() == fresh.get_vocab() and loaded.decode(ids) == fresh.decode(ids)
