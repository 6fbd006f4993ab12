"""lm_ce's caches are bounded, shown and checked: the GGUF weights cache says its size before writing, leaves no
temporary on Ctrl-C, is keyed by the versions that dequantize, replaces older copies of the same file and is listed
and cleared by `lm-ce cache`; sha256 memos are signed (a planted one is not believed); LM_CE_CACHE="" means no disk
cache; datasets' Arrow copy is checked when found and made again when cut or changed; a resume whose
documents.jsonl lost rows is refused."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from lm_ce import files
from lm_ce.cli import main as cli
from lm_ce.config.fields import Config
from lm_ce.model import gguf

from .conftest import make_jsonl, stop_at_batch

NAME = "0123456789abcdef0123456789abcdef-float32-v2-transformers4.0-gguf0.1"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LM_CE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(files, "_digests", {})
    return tmp_path / "cache"


def test_the_gguf_cache_says_its_size_lists_and_clears(tiny_llama, llama_tokenizer, cache, tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="lm_ce")
    old = cache / "gguf" / NAME.replace("transformers4.0", "transformers3.0")  # the same file, other versions
    old.mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"x" * 1000)
    other = cache / "gguf" / NAME.replace("0123", "4567")  # another file: kept
    other.mkdir()
    target = cache / "gguf" / NAME
    gguf.save_gguf_cache(tiny_llama, llama_tokenizer, str(target), source=str(tmp_path / "model.gguf"))
    said = [r.getMessage() for r in caplog.records if "caching the dequantized GGUF weights" in r.getMessage()]
    size = sum(p.numel() * p.element_size() for p in gguf.unshared_state(tiny_llama).values())
    assert said and f"({size / 2**20:,.0f} MB)" in said[0] and "lm-ce cache" in said[0]
    manifest = json.loads((target / gguf.MANIFEST).read_text())
    assert manifest["source"] == str(tmp_path / "model.gguf") and manifest["transformers"] and manifest["gguf"]
    assert not old.exists() and other.exists()  # the older copy of the same file removed
    files.file_sha256(str(target / "config.json"))
    files._remember(("x",), "0" * 64)
    assert cli.main(["cache", "list"]) == 0
    listed = capsys.readouterr().out
    assert NAME in listed and str(tmp_path / "model.gguf") in listed and manifest["created"] in listed
    assert "(unfinished" in listed  # `other` has no config.json: a stopped run's leftover
    assert "sha256" in listed and "1 memo" in listed
    assert cli.main(["cache", "clear", "nonexistent"]) == 2
    assert "no entry nonexistent" in capsys.readouterr().err
    assert cli.main(["cache", "clear", other.name]) == 0
    assert not other.exists() and target.exists() and files.memo_files()
    assert cli.main(["cache", "clear"]) == 0
    assert not target.exists() and not files.memo_files()
    assert "freed" in capsys.readouterr().out


def test_the_gguf_cache_key_holds_the_versions_that_dequantize():
    import importlib.metadata

    import transformers

    name = gguf.entry_name("a" * 64, torch.float32)
    assert name.startswith("a" * 32 + "-float32-v2-")
    assert f"transformers{transformers.__version__}" in name and f"gguf{importlib.metadata.version('gguf')}" in name


def test_ctrl_c_while_caching_leaves_no_temporary(tiny_llama, llama_tokenizer, cache, monkeypatch):
    import safetensors.torch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    target = cache / "gguf" / NAME
    with pytest.raises(KeyboardInterrupt):
        gguf.save_gguf_cache(tiny_llama, llama_tokenizer, str(target))
    assert list((cache / "gguf").iterdir()) == []


def test_a_full_disk_is_not_filled(tiny_llama, llama_tokenizer, cache, monkeypatch, caplog):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    gguf.save_gguf_cache(tiny_llama, llama_tokenizer, str(cache / "gguf" / NAME))
    assert not (cache / "gguf" / NAME).exists() and "not caching" in caplog.text


def test_a_planted_memo_is_not_believed(cache, tmp_path, monkeypatch):
    """A memo file copied or written under the cache (right name, any digest) is not the file's hash: without the
    cache's secret its signature fails, and the file is read."""
    monkeypatch.setattr(files, "SETTLED_NS", -10**12)
    path = tmp_path / "data.txt"
    path.write_text("real\n")
    real = hashlib.sha256(b"real\n").hexdigest()
    assert files.file_sha256(str(path)) == real
    memo = next(p for p in files.memo_files())
    for planted in ("f" * 64, json.dumps({"file": json.loads(memo.read_text())["file"], "sha256": "f" * 64,
                                          "hmac": "0" * 64})):
        memo.write_text(planted)
        monkeypatch.setattr(files, "_digests", {})
        assert files.file_sha256(str(path)) == real
    assert oct((cache / "sha256" / files.KEY).stat().st_mode & 0o777) == "0o600"
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    files._remember(key, real)
    assert files._recall(key) == real  # signed with the secret: believed
    (cache / "sha256" / files.KEY).chmod(0o644)  # a secret others can read signs nothing
    assert files._recall(key) is None


def test_an_empty_lm_ce_cache_means_no_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_CE_CACHE", "")
    monkeypatch.setattr(files, "_digests", {})
    monkeypatch.setattr(files, "SETTLED_NS", -10**12)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("x\n")
    assert files.cache_root() is None
    assert files.file_sha256("data.txt") == hashlib.sha256(b"x\n").hexdigest()
    assert sorted(os.listdir(tmp_path)) == ["data.txt"]  # no sha256/ folder in the current directory
    assert cli.main(["cache", "list"]) == 0


def arrow_cfg(tmp_path) -> Config:
    rows = [{"text": f"document number {i} " * 3} for i in range(3000)]
    return Config(data_files=[make_jsonl(tmp_path / "docs.jsonl", rows)])


@pytest.mark.parametrize("damage", ["cut", "cut at a batch", "bit flip"])
def test_a_damaged_arrow_copy_is_made_again(tmp_path, monkeypatch, caplog, damage):
    """A cut copy (1,000 of 3,000 rows, or half a file) or one with a flipped bit is not read: said in one line and
    made again, so every document is scored."""
    import datasets
    import pyarrow as pa

    from lm_ce.data.reading import load_rows

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    cfg = arrow_cfg(tmp_path)
    [path] = load_rows(cfg).files
    whole = Path(path).read_bytes()
    if damage == "cut at a batch":  # a valid Arrow stream of the first 1,000 rows
        table = pa.ipc.open_stream(whole).read_all().slice(0, 1000)
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    elif damage == "cut":
        Path(path).write_bytes(whole[: len(whole) // 2])
    else:
        flipped = bytearray(whole)
        flipped[len(whole) - 100] ^= 4
        Path(path).write_bytes(bytes(flipped))
    rows = load_rows(cfg)
    assert [r["text"] for r in rows] == [f"document number {i} " * 3 for i in range(3000)]
    assert "is damaged" in caplog.text and "making it again" in caplog.text
    assert Path(rows.files[0]).read_bytes() == whole


def test_a_datasets_cache_that_is_a_file_is_named(tmp_path, monkeypatch):
    import datasets

    from lm_ce.data.reading import load_rows
    from lm_ce.errors import UsageError

    (tmp_path / "hf").write_text("not a folder")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    with pytest.raises(UsageError, match=r"the datasets cache \(HF_DATASETS_CACHE\) .*hf cannot be used: .* is a file"):
        load_rows(arrow_cfg(tmp_path))


def test_a_resume_whose_documents_lost_rows_is_refused(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    data = make_jsonl(tmp_path / "d.jsonl", [{"text": f"text {i} " * 5} for i in range(12)])
    base = ["--model", tiny_llama_dir, "--data-files", data, "--max-length", "16", "--chunk-documents", "2",
            "--batch-size", "1", "--no-progress", "--output-dir", str(tmp_path / "run")]
    stop_at_batch(monkeypatch, 9)
    assert cli.main(base) == 130
    monkeypatch.undo()
    rows = (tmp_path / "run" / "documents.jsonl").read_text().splitlines(keepends=True)
    assert len(rows) >= 4
    (tmp_path / "run" / "documents.jsonl").write_text("".join(rows[:-1]))
    capsys.readouterr()
    assert cli.main(base + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"does not hold the {len(rows)} rows the saved state records" in err[0], err


@pytest.mark.parametrize("argv", [[], ["lst"], ["list", "extra"]])
def test_a_cache_command_without_list_or_clear_is_one_line(argv, capsys):
    assert cli.main(["cache", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give list or clear" in err[0], err
