"""A run records what it scored, by content, as it read it (weights, tokenizer, data), and --resume, lm-ce merge and
lm-ce compare refuse different content in one line naming what differs: a data file edited in place with its size
and mtime kept, copied over with cp -p, a retargeted symlink, a file edited while the run reads it, weights updated
between the shards of a job array, a replaced --compare-to model or LongPPL evaluator, another tokenizer."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import lm_ce
from lm_ce.cli.main import main as cli
from lm_ce.config.fields import Config
from lm_ce.errors import UsageError
from lm_ce.model.fingerprint import tokenizer_fingerprint
from lm_ce.reports import files as report
from lm_ce.reports import paired
from lm_ce.runner import evaluate
from lm_ce.scoring.scorer import Scorer

from .conftest import chunked_settings, corpus_rows, make_jsonl, perturbed_copy, stop_at_batch


SCORE = Scorer.score  # put back after a test's stop or edit (monkeypatch.undo would undo own_caches too)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def own_caches(tmp_path, monkeypatch):
    """The sha256 memo, GGUF and datasets caches in this test's folder."""
    import datasets

    monkeypatch.setenv("LM_CE_CACHE", str(tmp_path / "lm_ce_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")


@pytest.fixture
def corpus(tmp_path) -> str:
    return make_jsonl(tmp_path / "data" / "docs.jsonl", corpus_rows(24))


def edit_in_place(path: str) -> None:
    """Change a few bytes of the file, keeping its size and restoring its mtime (what an editor or a tool that
    keeps times does)."""
    st = os.stat(path)
    data = bytearray(Path(path).read_bytes())
    at = data.index(b"quick")
    data[at:at + 5] = b"QUICK"
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_results_record_the_weights_tokenizer_and_data_as_read(tiny_llama_dir, llama_tokenizer_dir, corpus, tmp_path):
    out = tmp_path / "run"
    res = evaluate(chunked_settings(tiny_llama_dir, corpus, out))
    model, data = res.summary["model"], res.summary["data"]
    assert model["commit"] is None and model["weights"]["method"] == "file-sha256"
    assert model["weights"]["files"] == {"config.json": sha256(Path(tiny_llama_dir) / "config.json"),
                                         "model.safetensors": sha256(Path(tiny_llama_dir) / "model.safetensors")}
    from transformers import AutoTokenizer

    again = tokenizer_fingerprint(AutoTokenizer.from_pretrained(llama_tokenizer_dir))
    assert model["tokenizer"]["sha256"] == again["sha256"] and model["tokenizer"]["fast"] is True
    assert data["files"] == [{"path": corpus, "bytes": os.path.getsize(corpus), "sha256": sha256(corpus)}]
    state = json.loads((out / "state.json").read_text())
    assert state["identity"]["data"]["files"] == data["files"]
    assert state["identity"]["models"]["model"]["weights"]["sha256"] == model["weights"]["sha256"]
    json.dumps(state["identity"])  # plain JSON


def test_the_tokenizer_fingerprint_is_of_what_decides_ids(llama_tokenizer_dir, gpt2_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    llama, gpt2 = (AutoTokenizer.from_pretrained(d) for d in (llama_tokenizer_dir, gpt2_tokenizer_dir))
    assert tokenizer_fingerprint(llama)["sha256"] != tokenizer_fingerprint(gpt2)["sha256"]
    swapped = swapped_tokenizer(llama_tokenizer_dir, tmp_path / "swapped")
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(swapped))["sha256"] != tokenizer_fingerprint(llama)["sha256"]
    (tmp_path / "config").mkdir()  # the same tokenizer with only a setting that does not change ids: the same
    llama.save_pretrained(tmp_path / "config")
    settings = json.loads((tmp_path / "config" / "tokenizer_config.json").read_text())
    (tmp_path / "config" / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": 77}))
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "config"))["sha256"] == \
        tokenizer_fingerprint(llama)["sha256"]


def swapped_tokenizer(source: str, target: Path) -> Path:
    """The tokenizer with the ids of 'a' and 'b' exchanged: it cuts every text as before (same token counts) into
    other ids."""
    shutil.copytree(source, target, dirs_exist_ok=True)
    spec = json.loads((target / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (target / "tokenizer.json").write_text(json.dumps(spec))
    return target


@pytest.mark.parametrize("change", ["edited in place", "cp -p of another file", "symlink retargeted"])
def test_resume_refuses_data_whose_content_changed(change, tiny_llama_dir, corpus, tmp_path, monkeypatch, capsys):
    """Same size and whole-second mtime, which the resume's old fingerprint compared, and a run stopped midway: the
    resumed run would have added the new content's sums to the old ones."""
    data = Path(corpus)
    if change == "symlink retargeted":
        data = tmp_path / "link.jsonl"
        data.symlink_to(corpus)
    args = ["--model", tiny_llama_dir, "--data-files", str(data), "--max-length", "24", "--stride", "12",
            "--batch-size", "2", "--chunk-documents", "8", "--output-dir", str(tmp_path / "run"), "--no-progress"]
    stop_at_batch(monkeypatch, 5)
    assert cli(args) == 130
    monkeypatch.setattr(Scorer, "score", SCORE)
    before = sha256(data)
    other = tmp_path / "other.jsonl"
    shutil.copy2(corpus, other)
    edit_in_place(str(other))
    if change == "edited in place":
        edit_in_place(str(data))
    elif change == "cp -p of another file":
        os.utime(other, ns=(os.stat(data).st_atime_ns, os.stat(data).st_mtime_ns))
        shutil.copy2(other, data)  # cp -p: content and times
    else:
        os.utime(other, ns=(os.stat(corpus).st_atime_ns, os.stat(corpus).st_mtime_ns))
        data.unlink()
        data.symlink_to(other)
    assert os.path.getsize(data) == os.path.getsize(corpus)
    capsys.readouterr()
    assert cli(args + ["--resume"]) == 2
    line = one_line_error(capsys)
    assert f"data file {data}: sha256 {before[:12]} → {sha256(data)[:12]}" in line and "--overwrite" in line


def test_resume_of_a_finished_run_over_changed_data_is_refused_and_its_report_kept(tiny_llama_dir, corpus, tmp_path,
                                                                                    capsys):
    args = ["--model", tiny_llama_dir, "--data-files", corpus, "--max-length", "24", "--limit", "6",
            "--output-dir", str(tmp_path / "run"), "--no-progress"]
    assert cli(args) == 0
    report_before = (tmp_path / "run" / "results.json").read_text()
    os.utime(corpus)  # touched: the content is what matters, not the times
    assert cli(args + ["--resume"]) == 0  # the same content: reported again, naming the same hash
    assert json.loads((tmp_path / "run" / "results.json").read_text())["data"] == json.loads(report_before)["data"]
    edit_in_place(corpus)
    capsys.readouterr()
    assert cli(args + ["--resume"]) == 2
    assert "sha256" in one_line_error(capsys)
    after = json.loads((tmp_path / "run" / "results.json").read_text())
    assert after["data"] == json.loads(report_before)["data"]  # the report still names what was scored


def edit_at_the_first_batch(monkeypatch, path: str) -> None:
    score, calls = Scorer.score, {"n": 0}

    def score_then_edit(self, batch, tally):
        calls["n"] += 1
        if calls["n"] == 1:
            edit_in_place(path)
        return score(self, batch, tally)

    monkeypatch.setattr(Scorer, "score", score_then_edit)


def test_a_file_edited_while_the_run_reads_it(tiny_llama_dir, corpus, tmp_path, monkeypatch):
    """Read through its Arrow copy (keyed by the content hashed at the start), the run scores the content it
    recorded: an edit after the copy was made changes nothing. Read as a stream, the edit is refused. Edited between
    the start and the read, it is refused before anything is scored."""
    original = sha256(corpus)
    clean = evaluate(chunked_settings(tiny_llama_dir, corpus, None))
    edit_at_the_first_batch(monkeypatch, corpus)
    copied = evaluate(chunked_settings(tiny_llama_dir, corpus, tmp_path / "copy"))
    assert copied.summary["data"]["files"][0]["sha256"] == original != sha256(corpus)
    assert copied.summary["nll_sum"] == clean.summary["nll_sum"]

    shutil.copy(corpus, tmp_path / "s.jsonl")
    edit_at_the_first_batch(monkeypatch, str(tmp_path / "s.jsonl"))
    with pytest.raises(UsageError, match="changed while the run read it \\(as a stream") as e:
        evaluate(chunked_settings(tiny_llama_dir, str(tmp_path / "s.jsonl"), tmp_path / "stream", streaming=True))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "stream" / "results.json").exists()
    monkeypatch.setattr(Scorer, "score", SCORE)

    shutil.copy(corpus, tmp_path / "late.jsonl")
    late = str(tmp_path / "late.jsonl")
    with pytest.raises(UsageError, match=f"data file {late} changed since the run started"):
        evaluate(chunked_settings(tiny_llama_dir, late, None),
                 on_event=lambda name: edit_in_place(late) if name == "loaded" else None)


def test_merge_refuses_shards_of_other_weights_or_tokenizer(tiny_llama_dir, corpus, tmp_path, capsys):
    """A checkpoint folder updated while a job array runs: each shard is of what it read."""
    model = tmp_path / "checkpoint"
    shutil.copytree(tiny_llama_dir, model)
    base = ["--model", str(model), "--data-files", corpus, "--max-length", "24", "--chunk-documents", "4",
            "--no-progress"]
    assert cli(base + ["--shard", "0/2", "--output-dir", str(tmp_path / "s0")]) == 0
    before = sha256(model / "model.safetensors")
    perturbed_copy(tiny_llama_dir, model, seed=9, scale=0.1)
    assert cli(base + ["--shard", "1/2", "--output-dir", str(tmp_path / "s1")]) == 0
    capsys.readouterr()
    assert cli(["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--output-dir", str(tmp_path / "m")]) == 2
    line = one_line_error(capsys)
    assert f"model: weights model.safetensors {before[:12]} → {sha256(model / 'model.safetensors')[:12]}" in line
    assert not (tmp_path / "m" / "results.json").exists()

    shutil.copytree(tiny_llama_dir, model, dirs_exist_ok=True)  # the first weights again, another tokenizer
    swapped_tokenizer(tiny_llama_dir, model)
    assert cli(base + ["--shard", "1/2", "--output-dir", str(tmp_path / "t1")]) == 0
    capsys.readouterr()
    assert cli(["merge", str(tmp_path / "s0"), str(tmp_path / "t1"), "--output-dir", str(tmp_path / "m")]) == 2
    line = one_line_error(capsys)
    assert "model: tokenizer" in line and "weights" not in line


@pytest.mark.parametrize("flag", ["--longppl-evaluator", "--compare-to"])
def test_resume_covers_every_model_the_run_reads(flag, tiny_llama_dir, corpus, tmp_path, monkeypatch, capsys):
    other = tmp_path / "other"
    perturbed_copy(tiny_llama_dir, other, seed=5, scale=0.3)
    args = ["--model", tiny_llama_dir, "--data-files", corpus, "--max-length", "24", "--stride", "8", "--batch-size",
            "2", "--chunk-documents", "8", "--output-dir", str(tmp_path / "run"), "--no-progress", flag, str(other)]
    if flag == "--longppl-evaluator":
        args += ["--longppl-short", "4", "--longppl-step", "3"]
    stop_at_batch(monkeypatch, 4)
    assert cli(args) == 130
    monkeypatch.setattr(Scorer, "score", SCORE)
    before = sha256(other / "model.safetensors")
    perturbed_copy(tiny_llama_dir, other, seed=6, scale=0.3)  # replaced at the same path
    capsys.readouterr()
    assert cli(args + ["--resume"]) == 2
    line = one_line_error(capsys)
    assert f"{flag} {other}: weights model.safetensors {before[:12]} → " in line
    perturbed_copy(tiny_llama_dir, other, seed=5, scale=0.3)  # put back: resumes
    assert cli(args + ["--resume"]) == 0
    summary = json.loads((tmp_path / "run" / "results.json").read_text())
    recorded = summary["longppl"]["evaluator_model"] if flag == "--longppl-evaluator" else \
        summary["compare"][str(other)]["model"]
    assert recorded["weights"]["files"]["model.safetensors"] == before


def test_compare_pairs_tokens_only_under_one_tokenizer(tiny_llama_dir, corpus, tmp_path):
    """Other ids for the same cuts (equal token counts in every document): compared by bits per byte, saying why."""
    swapped_model = tmp_path / "swapped"
    shutil.copytree(tiny_llama_dir, swapped_model)
    swapped_tokenizer(tiny_llama_dir, swapped_model)
    runs = []
    for name, model in (("a", tiny_llama_dir), ("b", str(swapped_model))):
        cfg = chunked_settings(model, corpus, tmp_path / name)
        report.write(evaluate(cfg), cfg.output_dir, plot=False, page=False)
        runs.append(str(tmp_path / name))
    rows = [[json.loads(line)["tokens"] for line in open(f"{r}/documents.jsonl")] for r in runs]
    assert rows[0] == rows[1]  # the token counts alone would call these the same tokens
    c = paired.compare_runs(*runs)
    assert not c["same_tokens"] and c["delta"]["mean_loss"] is None and "ln_ppl_ratio" not in c
    assert "tokenizers differ (fingerprint" in c["notes"][0] and c["delta"]["bits_per_byte"]["value"] is not None
    assert paired.compare_runs(runs[0], runs[0])["same_tokens"]


def test_a_model_object_is_fingerprinted_by_its_parameters(tiny_llama_dir, llama_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    texts = ["The quick brown fox jumps over the lazy dog.", "Perplexity is the exponential of the mean loss."]
    first = lm_ce.evaluate(model, llama_tokenizer, texts, output_dir=str(tmp_path / "a"), progress=False)
    weights = first.summary["model"]["weights"]
    assert weights["method"] == "parameters-sha256" and len(weights["sha256"]) == 64 and weights["seconds"] >= 0
    again = lm_ce.evaluate(model, llama_tokenizer, texts, output_dir=str(tmp_path / "b"), progress=False)
    assert again.summary["model"]["weights"]["sha256"] == weights["sha256"]
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-3
    changed = lm_ce.evaluate(model, llama_tokenizer, texts, output_dir=str(tmp_path / "c"), progress=False)
    assert changed.summary["model"]["weights"]["sha256"] != weights["sha256"]
    unrecorded = lm_ce.evaluate(model, llama_tokenizer, texts, progress=False).summary["model"]["weights"]
    assert unrecorded["sha256"] is None and "output_dir" in unrecorded["note"]


def hub_snapshot(hub: Path, repo: str, source: str, commit: str) -> None:
    """A model in a Hugging Face cache as the Hub client leaves it: blobs named by content, a snapshot of links."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True)
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    for f in Path(source).iterdir():
        blob = sha256(f)
        shutil.copy(f, folder / "blobs" / blob)
        (folder / "snapshots" / commit / f.name).symlink_to(f"../../blobs/{blob}")


def hub_dataset(cache: Path, repo: str, rows_file: str, commit: str) -> None:
    """A Hub dataset in datasets' cache as a download leaves it (offline, datasets reads its latest cached commit)."""
    import datasets

    built = datasets.load_dataset_builder("json", data_files={"test": rows_file}, cache_dir=str(cache / "build"))
    built.download_and_prepare()
    name = repo.split("/")[1]
    target = cache / repo.replace("/", "___") / "default" / "0.0.0" / commit
    shutil.copytree(built.cache_dir, target)
    for f in target.glob("json-*.arrow"):
        f.rename(f.with_name(f.name.replace("json-", f"{name}-")))
    info = json.loads((target / "dataset_info.json").read_text())
    (target / "dataset_info.json").write_text(json.dumps({**info, "config_name": "default", "dataset_name": name,
                                                          "builder_name": name}))


def test_hub_model_and_dataset_are_recorded_by_commit(tiny_llama_dir, corpus, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    model_commit, data_commit = "1" * 40, "2" * 40
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_snapshot(tmp_path / "hub", "some-org/tiny", tiny_llama_dir, model_commit)
    hub_dataset(tmp_path / "datasets", "some-org/texts", corpus, data_commit)
    args = ["--model", "some-org/tiny", "--dataset", "some-org/texts", "--dataset-config", "default", "--split",
            "test", "--max-length", "24", "--stride", "12", "--batch-size", "2", "--chunk-documents", "8",
            "--output-dir", str(tmp_path / "run"), "--no-progress"]
    calls = stop_at_batch(monkeypatch, 5)
    assert cli(args) == 130
    calls["stop"] = None
    summary = json.loads((tmp_path / "run" / "results.json").read_text())
    model, data = summary["model"], summary["data"]
    assert model["commit"] == model_commit and model["weights"]["method"] == "hub-blobs"
    assert model["weights"]["files"]["model.safetensors"] == sha256(Path(tiny_llama_dir) / "model.safetensors")
    assert data["resolved_revision"] == data_commit and data["revision"] is None
    moved = tmp_path / "datasets" / "some-org___texts" / "default" / "0.0.0"
    (moved / data_commit).rename(moved / ("3" * 40))  # only another commit can be read now
    capsys.readouterr()
    assert cli(args + ["--resume"]) == 2
    assert f"resolves to commit {'3' * 12}, but the run started on {'2' * 12}" in one_line_error(capsys)
    assert cli(args[:-3] + ["--data-files", corpus, "--dataset-revision", "main"]) == 2
    assert "--dataset-revision main" in one_line_error(capsys)
    other = ["--dataset-revision", "4" * 40, "--output-dir", str(tmp_path / "asked")]
    assert cli(args[:-3] + other) == 2  # a commit asked by its id, and another read: refused, not recorded
    assert f"--dataset-revision {'4' * 12}: dataset 'some-org/texts' was found at commit {'3' * 12}" in \
        one_line_error(capsys)


def test_a_model_file_written_while_it_loads_is_refused(tiny_llama_dir, corpus, tmp_path, monkeypatch):
    import transformers

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    load = transformers.AutoModelForCausalLM.from_pretrained

    def load_then_write(*args, **kwargs):
        loaded = load(*args, **kwargs)
        with open(model / "model.safetensors", "r+b") as f:  # the same byte back: a write all the same
            first = f.read(1)
            f.seek(0)
            f.write(first)
        return loaded

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load_then_write)
    with pytest.raises(UsageError, match=f"model file {model / 'model.safetensors'} changed while it was loaded"):
        evaluate(chunked_settings(str(model), corpus, None))


def test_a_model_with_another_tokenizer_is_compared_on_the_same_content(tmp_path):
    """--compare-to a model with another tokenizer reads the data again: a change in between is refused."""
    from lm_ce.analysis.compare import compare_by_bytes
    from lm_ce.sums.records import Results

    data = {"source": "files", "files": [{"path": "d.jsonl", "bytes": 5, "sha256": "a" * 64}]}
    first = Results({"complete": True, "data": data}, [], None)
    other = Results({"complete": True, "data": {**data, "files": [{**data["files"][0], "sha256": "b" * 64}]}}, [], None)
    with pytest.raises(UsageError, match=f"data file d.jsonl: sha256 {'a' * 12} → {'b' * 12}"):
        compare_by_bytes(Config(data_files=["d.jsonl"]), "other", first, score=lambda cfg, rows=None: other)


def test_a_state_that_recorded_no_content_is_not_resumed(tiny_llama_dir, corpus, tmp_path, capsys):
    args = ["--model", tiny_llama_dir, "--data-files", corpus, "--max-length", "24", "--limit", "4",
            "--output-dir", str(tmp_path / "run"), "--no-progress"]
    assert cli(args) == 0
    saved = tmp_path / "run" / "state.json"
    state = json.loads(saved.read_text())
    saved.write_text(json.dumps({k: v for k, v in state.items() if k != "identity"}))
    capsys.readouterr()
    assert cli(args + ["--resume"]) == 2
    assert "did not record the content it scored" in one_line_error(capsys)


def test_a_file_written_while_its_arrow_copy_is_made_and_one_only_touched(tiny_llama_dir, corpus, tmp_path,
                                                                          monkeypatch):
    import datasets

    prepare = datasets.builder.DatasetBuilder.download_and_prepare

    def prepare_then_write(self, *args, **kwargs):
        prepare(self, *args, **kwargs)
        edit_in_place(corpus)

    monkeypatch.setattr(datasets.builder.DatasetBuilder, "download_and_prepare", prepare_then_write)
    with pytest.raises(UsageError, match="changed while the run read it \\(making its Arrow copy"):
        evaluate(chunked_settings(tiny_llama_dir, corpus, None))
    monkeypatch.setattr(datasets.builder.DatasetBuilder, "download_and_prepare", prepare)
    evaluate(chunked_settings(tiny_llama_dir, corpus, None))  # the copy of the edited content, made
    touched = evaluate(chunked_settings(tiny_llama_dir, corpus, None),  # found, not read again: a touch is harmless
                       on_event=lambda name: os.utime(corpus) if name == "loaded" else None)
    assert touched.summary["data"]["files"][0]["sha256"] == sha256(corpus)
