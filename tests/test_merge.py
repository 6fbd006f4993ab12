"""lm-ce merge writes nothing partial: every shard's documents.jsonl and tokens.parquet are checked against what its
state records before anything is written; a running shard, a stopped one, a merged output and a bad --output-dir
are each named in one line. A shard's own report says that it is one shard of N."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lm_ce.cli import main as cli
from lm_ce.config.fields import Config
from lm_ce.data.shards import shard_of
from lm_ce.rundir import claims

from .conftest import corpus_rows, make_jsonl, stop_at_batch
from .test_output_dir import no_model_load  # noqa: F401  (a fixture)


@pytest.fixture(scope="module")
def shards(tiny_llama_dir, tmp_path_factory):
    """Three finished shards of one run with --save-tokens, and the merge of them."""
    work = tmp_path_factory.mktemp("merge")
    data = make_jsonl(work / "docs.jsonl", corpus_rows(40))
    base = ["--model", tiny_llama_dir, "--data-files", data, "--id-field", "id", "--max-length", "24", "--stride", "12",
            "--chunk-documents", "6", "--save-tokens", "--no-progress", "--no-plot"]
    for k in range(3):
        assert cli.main(base + ["--shard", f"{k}/3", "--output-dir", str(work / f"s{k}")]) == 0
    assert cli.main(["merge", *(str(work / f"s{k}") for k in range(3)), "--output-dir", str(work / "merged")]) == 0
    return work, base


def copies(shards, tmp_path) -> list[Path]:
    work, _ = shards
    out = []
    for k in range(3):
        shutil.copytree(work / f"s{k}", tmp_path / f"s{k}")
        out.append(tmp_path / f"s{k}")
    return out


def refused(dirs: list[Path], out: Path, capsys) -> str:
    capsys.readouterr()
    assert cli.main(["merge", *map(str, dirs), "--output-dir", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert not out.exists() or not any(out.iterdir())  # nothing written
    return err[0]


@pytest.mark.parametrize("damage", ["tokens missing", "all tokens missing", "tokens cut", "documents cut",
                                    "documents changed", "documents missing"])
def test_a_shard_whose_files_are_not_as_saved_is_refused(shards, tmp_path, capsys, damage):
    dirs = copies(shards, tmp_path)
    if damage == "tokens missing":
        (dirs[1] / "tokens.parquet").unlink()
    elif damage == "all tokens missing":
        for d in dirs:
            (d / "tokens.parquet").unlink()
    elif damage == "tokens cut":
        data = (dirs[1] / "tokens.parquet").read_bytes()
        (dirs[1] / "tokens.parquet").write_bytes(data[: len(data) // 2])
    elif damage == "documents cut":
        lines = (dirs[2] / "documents.jsonl").read_text().splitlines(keepends=True)
        (dirs[2] / "documents.jsonl").write_text("".join(lines[:-3]))
    elif damage == "documents changed":  # same size, one digit changed
        text = (dirs[2] / "documents.jsonl").read_text()
        at = text.index('"tokens": ') + len('"tokens": ')
        (dirs[2] / "documents.jsonl").write_text(text[:at] + str((int(text[at]) + 1) % 10) + text[at + 1:])
    else:
        (dirs[0] / "documents.jsonl").unlink()
    line = refused(dirs, tmp_path / "out", capsys)
    which = {"tokens missing": "shard 1/3", "all tokens missing": "shard 0/3", "tokens cut": "shard 1/3",
             "documents cut": "shard 2/3", "documents changed": "shard 2/3", "documents missing": "shard 0/3"}[damage]
    name = "tokens.parquet" if "tokens" in damage else "documents.jsonl"
    assert f"{which} in " in line and name in line and "rerun that shard" in line, line


def test_the_merged_output_is_whole(shards):
    work, _ = shards
    merged = json.loads((work / "merged" / "results.json").read_text())
    rows = (work / "merged" / "documents.jsonl").read_text().splitlines()
    assert len(rows) == 40 and [json.loads(r)["index"] for r in rows] == list(range(40))
    import pyarrow.parquet as pq

    assert pq.ParquetFile(work / "merged" / "tokens.parquet").metadata.num_rows == merged["counts"]["tokens"]


def test_running_stopped_and_merged_directories_are_named(shards, tmp_path, capsys, monkeypatch):
    work, base = shards
    dirs = copies(shards, tmp_path)
    line = refused([work / "merged"], tmp_path / "o1", capsys)
    assert "is the output of lm-ce merge (3 shards), not a shard" in line, line
    stopped = tmp_path / "stopped"
    stop_at_batch(monkeypatch, 2)
    assert cli.main(base + ["--shard", "1/3", "--output-dir", str(stopped)]) == 130
    monkeypatch.undo()
    line = refused([dirs[0], stopped, dirs[2]], tmp_path / "o2", capsys)
    assert "shard 1/3 in" in line and "was stopped before its end" in line and "--resume" in line, line
    cfg = Config(output_dir=str(stopped), resume=True)
    with claims.claim(cfg):  # a run holds the directory: it is running
        line = refused([dirs[0], stopped, dirs[2]], tmp_path / "o3", capsys)
    assert "is still running (pid" in line, line
    (tmp_path / "file").write_text("x")
    line = refused(dirs, tmp_path / "file" / "sub", capsys)
    assert "file" in line and "cannot be created" in line, line


def test_a_shards_report_says_it_is_one_shard(shards):
    work, _ = shards
    md = (work / "s1" / "results.md").read_text()
    html = (work / "s1" / "results.html").read_text()
    assert "shard 1 of 3" in md.splitlines()[0] and "SHARD 1 of 3" in md
    assert "shard 1 of 3" in html and "SHARD 1 of 3" in html
    assert "shard" not in (work / "merged" / "results.md").read_text().splitlines()[0]


def test_a_shards_console_table_says_it_is_one_shard(shards):
    from lm_ce.reports import tables

    work, _ = shards
    table = tables.table(json.loads((work / "s2" / "results.json").read_text()))
    assert "shard 2 of 3" in table.splitlines()[0] and "SHARD 2 of 3: these figures cover only" in table


@pytest.mark.parametrize("env,message", [
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "0"}, "SLURM_ARRAY_TASK_COUNT is 0, no task at all"),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "x"},
     "SLURM_ARRAY_TASK_MIN is 'x', not a whole number"),
    ({"SLURM_ARRAY_TASK_ID": "٣", "SLURM_ARRAY_TASK_COUNT": "4"}, "not set (or not whole numbers)"),
    ({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "2"},
     "SLURM_ARRAY_TASK_ID 9 is not one of 4 tasks counted from SLURM_ARRAY_TASK_MIN 2; use --array=0-3"),
])
def test_shard_auto_refuses_odd_slurm_values_in_one_line(monkeypatch, env, message):
    from lm_ce.errors import UsageError

    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        shard_of(Config(shard="auto"))


@pytest.mark.parametrize("extra,message", [
    (["--shard", "0/³"], "--shard 0/³: give K/N with 0 <= K < N"),
    (["--shard", "0/0"], "--shard 0/0: give K/N"),
    (["--protocol", "hf-docs", "--shard", "1/3"], "--mode is stream, set by --protocol hf-docs"),
    (["--mode", "stream", "--shard", "1/3"], "--shard cuts the documents into chunks, which needs --mode document"),
])
def test_shard_flags_refused_in_one_line(tiny_llama_dir, tmp_path, capsys, no_model_load, extra, message):
    data = make_jsonl(tmp_path / "d.jsonl", [{"text": "a b c"}])
    assert cli.main(["--model", tiny_llama_dir, "--data-files", data, *extra]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err


def test_compare_refuses_a_cut_documents_file(shards, tmp_path, capsys):
    """lm-ce compare pairs documents.jsonl rows: a file cut since its run is refused, not paired in part."""
    dirs = copies(shards, tmp_path)
    assert cli.main(["compare", str(shards[0] / "s0"), str(dirs[0]), "--output-dir", str(tmp_path / "c1")]) == 0
    lines = (dirs[0] / "documents.jsonl").read_text().splitlines(keepends=True)
    (dirs[0] / "documents.jsonl").write_text("".join(lines[:-2]))
    capsys.readouterr()
    assert cli.main(["compare", str(shards[0] / "s0"), str(dirs[0]), "--output-dir", str(tmp_path / "c2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"holds {len(lines) - 2} rows" in err[0] and "its state records" in err[0], err
