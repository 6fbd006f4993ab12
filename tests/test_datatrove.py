"""The datatrove step: 2 local tasks give every document the tokens and NLL that documents.jsonl gives it, and a
filter after the step keeps the documents its figures say it should. Skipped without datatrove."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import random
from pathlib import Path

import pytest

pytest.importorskip("datatrove")

from datatrove.executor import LocalPipelineExecutor  # noqa: E402
from datatrove.pipeline.filters import LambdaFilter  # noqa: E402
from datatrove.pipeline.readers import JsonlReader  # noqa: E402
from datatrove.pipeline.writers import JsonlWriter  # noqa: E402

from lm_ce.cli.main import main  # noqa: E402
from lm_ce.errors import UsageError  # noqa: E402
from lm_ce.integrations.datatrove import PerplexityStats  # noqa: E402

from .conftest import SENTENCES, make_jsonl  # noqa: E402
from .reference import reference_document  # noqa: E402

SETTINGS = {"max_length": 32, "stride": 16, "batch_size": 4}  # documents of several windows, several in a batch
FLAGS = ["--max-length", "32", "--stride", "16", "--batch-size", "4"]
PER_CALL = 8  # documents per lm_ce.evaluate call; the per-file CLI runs use chunks of this many documents
KEYS = ("lm_ce_nll", "lm_ce_tokens", "lm_ce_bytes", "lm_ce_perplexity", "lm_ce_bits_per_byte")


def documents(seed: int, n: int) -> list[str]:
    """n texts of 1 to 6 sentences, a non-English one among them (datatrove's readers drop empty texts)."""
    rng = random.Random(seed)
    out = [" ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 6))) for _ in range(n)]
    out[11] = "交叉熵损失函数衡量两个概率分布之间的差异。Ελληνικά. 🐍"
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Two JSONL files of 20 documents each (ids a0.., b0..): the reader gives each of 2 tasks one file."""
    root = tmp_path_factory.mktemp("dt_data")
    for part, seed in (("a", 1), ("b", 2)):
        make_jsonl(root / f"{part}.jsonl", [{"text": t, "id": f"{part}{i}"} for i, t in enumerate(documents(seed, 20))])
    return root


def cli_rows(model_dir: str, files: list[Path], out: Path, *flags: str) -> dict[str, dict]:
    """documents.jsonl of a CLI run on `files`, by document id."""
    code = main(["--model", model_dir, "--data-files", ",".join(map(str, files)), "--id-field", "id", *FLAGS, *flags,
                 "--output-dir", str(out), "--no-progress", "--no-plot"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]
    return {row["id"]: row for row in rows}


def written(folder: Path) -> list[dict]:
    """The documents a JsonlWriter wrote, task by task, in order."""
    return [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in f.read_text().splitlines()]


@pytest.fixture(scope="module")
def pipeline_run(tiny_llama_dir, data_dir, tmp_path_factory):
    """Reader -> PerplexityStats -> writer (all) -> perplexity filter -> writer (kept), 2 tasks, 1 worker.
    Returns (everything written, kept, the threshold, the per-file CLI rows by id, the executor's stats)."""
    out = tmp_path_factory.mktemp("dt_out")
    per_file = {}
    for f in sorted(data_dir.glob("*.jsonl")):  # the CLI on each task's file, planned in the same chunks
        per_file.update(cli_rows(tiny_llama_dir, [f], out / f"cli_{f.stem}", "--chunk-documents", str(PER_CALL)))
    perplexities = sorted({r["perplexity"] for r in per_file.values() if r["perplexity"] is not None})
    middle = len(perplexities) // 2
    threshold = (perplexities[middle - 1] + perplexities[middle]) / 2  # between two values: no ties at the edge
    step = PerplexityStats(model=tiny_llama_dir, documents_per_call=PER_CALL, **SETTINGS)
    executor = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(str(data_dir)),
            step,
            JsonlWriter(str(out / "all"), compression=None),
            LambdaFilter(lambda d: d.metadata["lm_ce_tokens"] > 0 and d.metadata["lm_ce_perplexity"] < threshold),
            JsonlWriter(str(out / "kept"), compression=None),
        ],
        tasks=2,
        workers=1,
        logging_dir=str(out / "logs"),
    )
    stats = executor.run()
    return written(out / "all"), written(out / "kept"), threshold, per_file, stats


def test_two_tasks_give_each_document_the_cli_figures(pipeline_run, data_dir):
    docs, _, _, per_file, _ = pipeline_run
    assert len(docs) == 40 and {d["id"] for d in docs} == set(per_file)
    in_files = [json.loads(line)["id"] for f in sorted(data_dir.glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert [d["id"] for d in docs] == in_files  # each task's documents come out in the order they went in
    for d in docs:
        got, row = d["metadata"], per_file[d["id"]]
        assert got["lm_ce_tokens"] == row["tokens"] and got["lm_ce_bytes"] == row["bytes"], d["id"]
        assert math.isclose(got["lm_ce_nll"], row["nll_sum"], rel_tol=1e-9, abs_tol=0.0), d["id"]
        assert math.isclose(got["lm_ce_perplexity"], row["perplexity"], rel_tol=1e-9), d["id"]
        assert math.isclose(got["lm_ce_bits_per_byte"], row["bits_per_byte"], rel_tol=1e-9), d["id"]


def test_same_figures_as_one_cli_run_over_all_documents(pipeline_run, tiny_llama_dir, data_dir, tmp_path):
    """One CLI run over both files batches the windows differently: the float32 forward then rounds differently
    (about 4e-8 relative here), as the CLI itself does at another batch size."""
    docs = pipeline_run[0]
    whole = cli_rows(tiny_llama_dir, sorted(data_dir.glob("*.jsonl")), tmp_path / "whole")
    for d in docs:
        assert d["metadata"]["lm_ce_tokens"] == whole[d["id"]]["tokens"]
        assert math.isclose(d["metadata"]["lm_ce_nll"], whole[d["id"]]["nll_sum"], rel_tol=1e-6), d["id"]


def test_figures_match_the_float64_reference(pipeline_run, tiny_llama, llama_tokenizer):
    docs = pipeline_run[0]
    longest = max(docs, key=lambda d: d["metadata"]["lm_ce_tokens"])
    assert longest["metadata"]["lm_ce_tokens"] > 2 * SETTINGS["max_length"]  # several windows
    for d in (docs[0], docs[11], docs[25], longest):
        nll, tokens = reference_document(tiny_llama, llama_tokenizer, d["text"], llama_tokenizer.bos_token_id,
                                         SETTINGS["max_length"], SETTINGS["stride"])
        assert d["metadata"]["lm_ce_tokens"] == tokens
        assert math.isclose(d["metadata"]["lm_ce_nll"], nll, rel_tol=2e-5), d["id"]
        assert d["metadata"]["lm_ce_bytes"] == len(d["text"].encode("utf-8"))


def test_a_filter_after_the_step_keeps_the_documents_below_the_threshold(pipeline_run):
    docs, kept, threshold, per_file, stats = pipeline_run
    expected = [d["id"] for d in docs if per_file[d["id"]]["perplexity"] < threshold]
    assert 5 < len(expected) < 35
    assert [d["id"] for d in kept] == expected
    step_stats = next(s for s in stats.stats if "lm_ce" in s.name)
    assert step_stats.stats["lm_ce_scored"].total == 40 and "lm_ce_empty" not in step_stats.stats
    assert step_stats.stats["lm_ce_model_loads"].total == 2  # once per task
    assert step_stats.stats["lm_ce_tokens"].total == sum(r["tokens"] for r in per_file.values())


def test_empty_documents_get_every_key_with_zeros(tiny_llama_dir, tiny_llama, llama_tokenizer):
    """Empty texts (a step before may empty them; readers drop them) and texts that tokenize to no target get
    tokens 0 and 0.0 ratios, also when a whole call has nothing to score; the others their own figures, in order."""
    from datatrove.data import Document

    import lm_ce

    texts = ["", "", "Hello world.", "", "Is it raining?"]
    step = PerplexityStats(model=tiny_llama_dir, documents_per_call=2, **SETTINGS)  # the first call: only empties
    out = list(step.run(Document(text=t, id=str(i)) for i, t in enumerate(texts)))
    assert [d.id for d in out] == ["0", "1", "2", "3", "4"]
    alone = lm_ce.evaluate(tiny_llama, llama_tokenizer, [t for t in texts if t], progress=False, **SETTINGS).documents
    for d in out:
        if d.text:
            r = alone.pop(0)
            assert (d.metadata["lm_ce_tokens"], d.metadata["lm_ce_bytes"]) == (r.tokens, r.bytes) and r.tokens > 0
            # batched otherwise (calls of 2 documents against one run): float32 rounding, 3e-8 relative measured
            assert math.isclose(d.metadata["lm_ce_nll"], r.nll_sum, rel_tol=1e-6)
        else:
            assert [d.metadata[k] for k in KEYS] == [0.0, 0, 0, 0.0, 0.0]
    assert len(llama_tokenizer("a", add_special_tokens=False).input_ids) == 1  # no prefix: one token, no target
    unprefixed = PerplexityStats(model=tiny_llama_dir, documents_per_call=1, prefix_token="none", **SETTINGS)
    out = list(unprefixed.run(iter([Document(text="a", id="a"), Document(text="Hello world.", id="b")])))
    assert [d.metadata["lm_ce_tokens"] for d in out][0] == 0 and out[1].metadata["lm_ce_tokens"] > 0
    assert [out[0].metadata[k] for k in KEYS] == [0.0, 0, 0, 0.0, 0.0]


def test_the_step_pickles_without_its_model_and_refuses_settings_that_do_not_apply(tiny_llama_dir):
    step = PerplexityStats(model=tiny_llama_dir, **SETTINGS)
    step._loaded = ("model", "tokenizer")
    assert pickle.loads(pickle.dumps(step))._loaded is None
    with pytest.raises(UsageError, match="output_dir"):
        PerplexityStats(model=tiny_llama_dir, output_dir="x")
    with pytest.raises(UsageError, match="document mode"):
        PerplexityStats(model=tiny_llama_dir, mode="stream")
    with pytest.raises(UsageError, match="max_lenght"):
        PerplexityStats(model=tiny_llama_dir, max_lenght=32)


def test_a_lone_surrogate_is_refused_naming_the_document(tiny_llama_dir):
    """As lm_ce.evaluate and the command line refuse it: one line with the pipeline's document id, no traceback of
    the tokenizer's."""
    from datatrove.data import Document

    step = PerplexityStats(model=tiny_llama_dir, documents_per_call=2, **SETTINGS)
    docs = [Document(text="Hello world.", id="ok"), Document(text="b \ud800 c", id="web/17")]
    with pytest.raises(UsageError, match=r"lm_ce.PerplexityStats: document 'web/17': its text holds a lone surrogate"):
        list(step.run(iter(docs)))


@pytest.mark.slow  # a local Ray cluster: several processes
@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="ray is not installed (pip install ray): the Ray executor is not tested")
def test_rays_executor_gives_the_local_figures(pipeline_run, tiny_llama_dir, data_dir, tmp_path):
    """The step on datatrove's RayPipelineExecutor (a local Ray cluster, 2 tasks of one CPU each): every document gets
    the figures documents.jsonl gives it, and those the local executor gave it, bit for bit."""
    import ray
    from datatrove.executor.ray import RayPipelineExecutor

    local = {d["id"]: d["metadata"] for d in pipeline_run[0]}
    # the workers import this checkout's lm_ce, as the tests do (not another one installed)
    root = str(Path(__file__).resolve().parent.parent)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}})
    try:
        RayPipelineExecutor(
            pipeline=[JsonlReader(str(data_dir)), PerplexityStats(model=tiny_llama_dir, documents_per_call=PER_CALL,
                                                                  threads=1, **SETTINGS),
                      JsonlWriter(str(tmp_path / "all"), compression=None)],
            tasks=2, workers=2, cpus_per_task=1, mem_per_cpu_gb=1, logging_dir=str(tmp_path / "logs"),
        ).run()
    finally:
        ray.shutdown()
    docs, per_file = written(tmp_path / "all"), pipeline_run[3]
    assert len(docs) == 40 and {d["id"] for d in docs} == set(per_file)
    for d in docs:
        got, row = d["metadata"], per_file[d["id"]]
        assert got["lm_ce_tokens"] == row["tokens"] and got["lm_ce_bytes"] == row["bytes"], d["id"]
        assert math.isclose(got["lm_ce_nll"], row["nll_sum"], rel_tol=1e-9, abs_tol=0.0), d["id"]
        assert {k: got[k] for k in KEYS} == {k: local[d["id"]][k] for k in KEYS}, d["id"]
