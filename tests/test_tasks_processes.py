"""The tasks on several processes (a real torch.distributed.run launch) and as shards merged by lm-ce merge give one
process's figures: the same rows, predictions, words and accuracies (float32 rounding on the log-likelihoods)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lm_ce.cli.main import main

from .conftest import make_jsonl
from .test_distributed import read, run_distributed, run_single

DATA = Path(__file__).parent / "data" / "tasks"
pytestmark = pytest.mark.slow  # real 2-process launches: ~20 s each on a busy 2-core machine


def words_data(tmp_path: Path) -> str:
    rows = [json.loads(x) for x in (DATA / "surprisal_docs.jsonl").read_text(encoding="utf-8").splitlines()]
    words = [r["words"] if "words" in r else r["text"].split(" ") for r in rows] * 3  # 15 documents
    return make_jsonl(tmp_path / "w.jsonl", [{"id": f"d{i}", "words": w} for i, w in enumerate(words)])


def parquet(path: Path) -> dict:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pydict()


def same_choice_rows(one: list[dict], many: list[dict]) -> None:
    assert [(r["index"], r["id"], r["pred"], r["pred_norm"], r["choice_tokens"]) for r in many] == [
        (r["index"], r["id"], r["pred"], r["pred_norm"], r["choice_tokens"]) for r in one]
    for a, b in zip(one, many):
        assert b["choice_loglikelihoods"] == pytest.approx(a["choice_loglikelihoods"], rel=1e-6)


@pytest.mark.parametrize("protocol", ["lm-eval", "llama-cpp-hellaswag"])
def test_multiple_choice_on_two_processes(tiny_llama_dir, tmp_path, capsys, protocol):
    args = ["--model", tiny_llama_dir, "--data-files", str(DATA / "mc_items.jsonl"), "--id-field", "id",
            "--task", "multiple-choice", "--protocol", protocol, "--chunk-documents", "4"]
    run_single(args, tmp_path / "one", capsys)
    run_distributed(args, tmp_path / "many")
    (one, one_rows), (many, many_rows) = read(tmp_path / "one"), read(tmp_path / "many")
    same_choice_rows(one_rows, many_rows)
    for key in ("acc", "acc_norm", "acc_bytes", "items", "choices"):
        assert many["multiple_choice"][key] == one["multiple_choice"][key], key
    assert many["environment"]["processes"] == 2 and sum(many["counts"]["tokens_per_process"]) == one["counts"]["tokens"]


def test_surprisal_on_two_processes(tiny_gpt2_dir, tmp_path, capsys):
    args = ["--model", tiny_gpt2_dir, "--data-files", words_data(tmp_path), "--id-field", "id", "--task", "surprisal",
            "--words-field", "words", "--chunk-documents", "4", "--batch-size", "2"]
    run_single(args, tmp_path / "one", capsys)
    run_distributed(args, tmp_path / "many")
    one, many = parquet(tmp_path / "one" / "words.parquet"), parquet(tmp_path / "many" / "words.parquet")
    assert {k: v for k, v in many.items() if k != "surprisal"} == {k: v for k, v in one.items() if k != "surprisal"}
    assert many["surprisal"] == pytest.approx(one["surprisal"], rel=1e-6)
    assert parquet(tmp_path / "many" / "sentences.parquet")["words"] == parquet(tmp_path / "one" / "sentences.parquet")["words"]


def test_shards_merged_equal_one_run(tiny_llama_dir, tmp_path, capsys):
    """--shard 0/2 and 1/2, then lm-ce merge: the rows, tables and figures of one run (both tasks)."""
    cases = {"mc": ["--data-files", str(DATA / "mc_items.jsonl"), "--id-field", "id", "--task", "multiple-choice"],
             "words": ["--data-files", words_data(tmp_path), "--id-field", "id", "--task", "surprisal",
                       "--words-field", "words"]}
    for name, extra in cases.items():
        args = ["--model", tiny_llama_dir, *extra, "--chunk-documents", "2"]
        run_single(args, tmp_path / name / "whole", capsys)
        for k in range(2):
            run_single([*args, "--shard", f"{k}/2"], tmp_path / name / f"s{k}", capsys)
        out = tmp_path / name / "merged"
        assert main(["merge", str(tmp_path / name / "s0"), str(tmp_path / name / "s1"), "--output-dir", str(out)]) == 0
        (whole, whole_rows), (merged, merged_rows) = read(tmp_path / name / "whole"), read(out)
        assert [r["index"] for r in merged_rows] == [r["index"] for r in whole_rows]
        key = "multiple_choice" if name == "mc" else "surprisal"
        assert merged[key].keys() == whole[key].keys(), key
        for field, value in whole[key].items():  # pytest.approx takes no list inside a dict (pytest 9.2)
            exact = value is None or isinstance(value, str)  # nor None (pytest 9.2)
            assert merged[key][field] == (value if exact else pytest.approx(value, rel=1e-12)), field
        if name == "words":
            assert parquet(out / "words.parquet") == parquet(tmp_path / name / "whole" / "words.parquet")
            assert parquet(out / "sentences.parquet") == parquet(tmp_path / name / "whole" / "sentences.parquet")
