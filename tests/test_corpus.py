"""Corpus scale: exact running sums instead of per-document records, rows and tokens written as chunks finish,
saves that hold one chunk, reports of what was saved, and shards merged into the figures of one run."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lm_ce.cli import main as cli
from lm_ce.data import documents as data
from lm_ce.runner import evaluate
from lm_ce.sums.stats import Clustered, ExactSum, uncertainty

from .conftest import chunked_settings, corpus_rows, make_jsonl, saved_run, stop_at_batch


def test_exact_sum_is_fsum_in_any_order_and_merged():
    rng = random.Random(1)
    values = [1e20, 1.0, -1e20] + [rng.uniform(-1, 1) * 10 ** rng.randint(-8, 8) for _ in range(2000)]
    whole = ExactSum()
    for v in values:
        whole.add(v)
    assert whole.value == math.fsum(values)
    parts = [ExactSum() for _ in range(3)]
    for i, v in enumerate(reversed(values)):
        parts[i % 3].add(v)
    parts[2].merge(parts[0])
    parts[2].merge(parts[1])
    assert parts[2].value == math.fsum(values)
    plain = 0.0
    for v in values:
        plain += v
    assert plain != math.fsum(values)  # float addition in order rounds: the test could tell


def test_clustered_sums_merge_to_the_whole():
    rng = random.Random(2)
    clusters = [(rng.uniform(0, 50), rng.randint(1, 40)) for _ in range(500)]
    whole = Clustered.of(*zip(*clusters))
    halves = [Clustered.of(*zip(*clusters[:200])), Clustered.of(*zip(*clusters[200:]))]
    halves[0].merge(halves[1])
    assert uncertainty(halves[0], 1e4, "documents") == uncertainty(whole, 1e4, "documents")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", corpus_rows(70))


def state_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in [out / "state.json", *out.glob("state-*.safetensors")])


def test_rows_go_to_disk_and_the_state_does_not_grow(tiny_llama_dir, corpus, tmp_path):
    in_memory = evaluate(chunked_settings(tiny_llama_dir, corpus, None))
    on_disk = evaluate(chunked_settings(tiny_llama_dir, corpus, tmp_path / "all"))
    assert on_disk.summary["nll_sum"] == in_memory.summary["nll_sum"]
    assert on_disk.summary["uncertainty"] == in_memory.summary["uncertainty"]
    assert on_disk.summary["groups"] == in_memory.summary["groups"]
    assert list(on_disk.documents) == list(in_memory.documents)  # read back from documents.jsonl
    assert len(in_memory.documents) == 70
    # the saved state holds running sums, not rows: 16 documents and 70 save (nearly) the same bytes
    few = evaluate(chunked_settings(tiny_llama_dir, corpus, tmp_path / "few", limit=16))
    assert few.summary["counts"]["documents"] < on_disk.summary["counts"]["documents"]
    assert state_bytes(tmp_path / "all") - state_bytes(tmp_path / "few") < 1000
    run = saved_run(tmp_path / "all")
    assert not run.tally.docs and not run.tally.windows and run.partial is None
    assert run.rows_offset == (tmp_path / "all" / "documents.jsonl").stat().st_size


def test_a_stopped_report_shows_what_was_saved(tiny_llama_dir, corpus, tmp_path, monkeypatch):
    stop_at_batch(monkeypatch, 30)  # inside a chunk
    stopped = evaluate(chunked_settings(tiny_llama_dir, corpus, tmp_path), owns_process=True)  # the CLI's stop
    run = saved_run(tmp_path)
    assert run.partial is not None and run.partial.tokens > 0
    assert stopped.summary["counts"]["tokens"] == run.tokens == run.sums.tokens + run.partial.tokens
    assert stopped.summary["counts"]["windows"] == run.windows + len(run.partial.windows)
    assert math.isclose(stopped.summary["nll_sum"], run.sums.nll.value + sum(d.nll for d in run.partial.docs.values()))
    rows = (tmp_path / "documents.jsonl").read_text().splitlines()
    assert len(rows) == run.chunks_done * 8  # the finished chunks' rows, written as they finished


def test_saved_tokens_are_written_as_they_go(tiny_llama_dir, corpus, tmp_path, monkeypatch):
    """tokens.parquet from chunk parts equals the table kept in memory; a stop and resume loses no row; finishing
    joins nothing (the parts were appended to one file as they were written)."""
    in_memory = evaluate(chunked_settings(tiny_llama_dir, corpus, None, save_tokens=True, limit=30))
    stop_at_batch(monkeypatch, 45)  # inside the third chunk
    out = tmp_path / "run"
    code = cli.main(["--model", tiny_llama_dir, "--data-files", corpus, "--id-field", "id", "--group-field", "group",
                     "--max-length", "24", "--stride", "12", "--batch-size", "2", "--chunk-documents", "8",
                     "--limit", "30", "--save-tokens", "--output-dir", str(out), "--no-progress"])
    assert code == 130
    assert list(out.glob(".tokens.parquet.tmp-part*"))  # the finished chunks' parts, kept for --resume
    monkeypatch.undo()
    resumed = evaluate(chunked_settings(tiny_llama_dir, corpus, out, save_tokens=True, limit=30, resume=True))
    from lm_ce.reports import files as report

    # the parts were joined as they were written (the resume joined the saved ones again): finishing renames
    monkeypatch.setattr(report, "join_parquet", lambda *args: pytest.fail("tokens joined again after scoring"))
    report.write(resumed, str(out), plot=False)
    assert pq.read_table(out / "tokens.parquet").to_pydict() == in_memory.token_table
    assert not list(out.glob(".tokens.parquet.tmp-part*"))  # complete: joined, parts removed
    assert list(resumed.documents) == list(in_memory.documents)


def run_cli(args: list[str]) -> int:
    return cli.main(args)


def test_a_resumed_shard_starts_at_its_first_unfinished_chunk(tiny_llama_dir, corpus, tmp_path, monkeypatch):
    """A shard stopped inside a later chunk resumes to the uninterrupted shard's figures and rows, reading the data
    from its first unfinished chunk on (its chunk index among all the data's chunks, times the chunk size)."""
    calls = stop_at_batch(monkeypatch, None)  # inside the shard's last chunk
    whole = evaluate(chunked_settings(tiny_llama_dir, corpus, tmp_path / "whole", shard="1/3"))
    calls.update(stop=calls["n"] - 2, n=0)
    out = tmp_path / "stopped"
    assert not evaluate(chunked_settings(tiny_llama_dir, corpus, out, shard="1/3"), owns_process=True).summary["complete"]
    monkeypatch.undo()
    done = saved_run(out).chunks_done
    assert done >= 1
    starts = []
    read = data.iter_documents

    def spy(cfg, rows=None, *, start=0, **kw):
        starts.append(start)
        return read(cfg, rows, start=start, **kw)

    monkeypatch.setattr(data, "iter_documents", spy)
    resumed = evaluate(chunked_settings(tiny_llama_dir, corpus, out, shard="1/3", resume=True))
    assert starts == [(1 + 3 * done) * 8]  # chunk 1 + 3 * done of all chunks: this shard's chunk `done`
    assert resumed.summary["nll_sum"] == whole.summary["nll_sum"]
    assert resumed.summary["counts"] == whole.summary["counts"]
    assert (out / "documents.jsonl").read_text() == (tmp_path / "whole" / "documents.jsonl").read_text()


def test_shards_merged_equal_the_single_run(tiny_llama_dir, corpus, tmp_path, capsys):
    base = ["--model", tiny_llama_dir, "--data-files", corpus, "--id-field", "id", "--group-field", "group",
            "--max-length", "24", "--stride", "12", "--chunk-documents", "8", "--no-progress"]
    assert run_cli(base + ["--output-dir", str(tmp_path / "one")]) == 0
    for k in range(3):
        assert run_cli(base + ["--shard", f"{k}/3", "--output-dir", str(tmp_path / f"s{k}")]) == 0
    shards = [str(tmp_path / f"s{k}") for k in (2, 0, 1)]  # any order
    assert run_cli(["merge", *shards, "--output-dir", str(tmp_path / "merged")]) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["counts"]["tokens"] == one["counts"]["tokens"]
    for key in ("documents", "skipped_documents", "bytes", "words", "windows", "input_tokens", "padding_tokens"):
        assert merged["counts"][key] == one["counts"][key], key
    assert math.isclose(merged["nll_sum"], one["nll_sum"], rel_tol=1e-12)
    assert math.isclose(merged["uncertainty"]["mean_loss_stderr"], one["uncertainty"]["mean_loss_stderr"], rel_tol=1e-9)
    assert merged["groups"].keys() == one["groups"].keys()
    for name, group in one["groups"].items():
        assert merged["groups"][name] == pytest.approx(group, rel=1e-12)
    assert [b["tokens"] for b in merged["by_position"]] == [b["tokens"] for b in one["by_position"]]
    assert [b["mean_loss"] for b in merged["by_position"]] == pytest.approx([b["mean_loss"] for b in one["by_position"]])
    assert (tmp_path / "merged" / "documents.jsonl").read_text() == (tmp_path / "one" / "documents.jsonl").read_text()
    parts = [json.loads((tmp_path / f"s{k}" / "results.json").read_text())["counts"]["tokens"] for k in range(3)]
    assert all(parts) and sum(parts) == one["counts"]["tokens"]
    capsys.readouterr()

    # refused, one line each: a missing shard, a shard twice, a shard of another run
    assert run_cli(["merge", shards[0], shards[1], "--output-dir", str(tmp_path / "m2")]) == 2
    assert "shard 1 of 3 missing" in capsys.readouterr().err
    assert run_cli(["merge", *shards, shards[0], "--output-dir", str(tmp_path / "m3")]) == 2
    assert "shard 2/3 is given twice" in capsys.readouterr().err
    assert run_cli(base + ["--shard", "1/3", "--max-length", "16", "--output-dir", str(tmp_path / "other")]) == 0
    capsys.readouterr()
    assert run_cli(["merge", shards[0], shards[1], str(tmp_path / "other"), "--output-dir", str(tmp_path / "m4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differ in settings.max_length" in err[0]
    assert run_cli(["merge", shards[0], str(tmp_path / "one"), "--output-dir", str(tmp_path / "m5")]) == 2
    assert "is not a shard" in capsys.readouterr().err


def test_shard_flags_are_checked(tiny_llama_dir, corpus, tmp_path, capsys, monkeypatch):
    base = ["--model", tiny_llama_dir, "--data-files", corpus, "--no-progress", "--output-dir", str(tmp_path / "x")]
    for bad in (["--shard", "3/3"], ["--shard", "1"], ["--shard", "0/2", "--mode", "stream"]):
        assert run_cli(base + bad) == 2
        assert "--shard" in capsys.readouterr().err
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    assert run_cli(base + ["--shard", "auto"]) == 2
    assert "SLURM_ARRAY_TASK_ID" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert run_cli(base + ["--shard", "auto", "--limit", "20", "--chunk-documents", "4"]) == 0
    assert json.loads((tmp_path / "x" / "results.json").read_text())["shard"] == {"index": 1, "count": 2}
    rows = [json.loads(line) for line in (tmp_path / "x" / "documents.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [4, 5, 6, 7, 12, 13, 14, 15]  # every second chunk from chunk 1
    # more shards than chunks: a shard without a chunk finishes with nothing scored, and is not refused
    assert run_cli(base[:-1] + [str(tmp_path / "y"), "--shard", "5/6", "--limit", "20", "--chunk-documents", "4"]) == 0
    assert json.loads((tmp_path / "y" / "results.json").read_text())["counts"]["tokens"] == 0
