"""--task surprisal against the float64 reference (tests/tasks_reference.py) on tiny models: each word's surprisal
in the three styles (pm, minicons, none), its entropy and rank; invariance to batch size, padding side and token
budget; regions; words from text; the tables on disk, resume and refusals."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lm_ce.config.sources import config_for
from lm_ce.errors import UsageError
from lm_ce.runner import evaluate
from lm_ce.tasks.surprisal import sentence_of

from . import tasks_reference as ref
from .conftest import make_jsonl
from .reference import as_float64

DOCS = Path(__file__).parent / "data" / "tasks" / "surprisal_docs.jsonl"
STYLES = [("pm", True, "pm"), ("minicons", True, "minicons"), ("pm", False, "none")]
REL = 1e-5  # float32 forward against the float64 one (measured: below 1e-6 on these tiny models)


def word_lists() -> list[list[str]]:
    rows = [json.loads(line) for line in DOCS.read_text(encoding="utf-8").splitlines()]
    return [r["words"] if "words" in r else r["text"].split(" ") for r in rows]


@pytest.fixture
def words_file(tmp_path) -> str:
    return make_jsonl(tmp_path / "words.jsonl", [{"id": f"d{i}", "words": w} for i, w in enumerate(word_lists())])


def run(model_dir: str, data: str, **fields):
    return evaluate(config_for(model=model_dir, data_files=[data], task="surprisal", progress=False,
                               **{"words_field": "words", "id_field": "id", **fields}), owns_process=True)  # the CLI


def reference_lm(model_dir: str) -> ref.LM:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return ref.LM(as_float64(AutoModelForCausalLM.from_pretrained(model_dir)), AutoTokenizer.from_pretrained(model_dir))


@pytest.mark.parametrize("style,correct,name", STYLES, ids=[s[2] for s in STYLES])
@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_gpt2_dir", "bos_adding_llama_dir"])
def test_words_equal_reference(request, model_fixture, style, correct, name, words_file):
    """Every word's surprisal (bits), tokens, entropy (bits) and rank at its first token; the documents' sums and
    results.json's mean per word."""
    model_dir = request.getfixturevalue(model_fixture)
    res = run(model_dir, words_file, bow_style=style, bow_correction=correct)
    lm = reference_lm(model_dir)
    expected = [w for words in word_lists() for w in ref.word_surprisals(lm, words, name)]
    table = res.tables["words"]
    assert table["word"] == [w["word"] for w in expected]
    assert table["surprisal"] == pytest.approx([w["surprisal"] for w in expected], rel=REL)
    assert table["entropy"] == pytest.approx([w["entropy"] for w in expected], rel=REL)
    assert table["rank"] == [w["rank"] for w in expected] and table["tokens"] == [w["tokens"] for w in expected]
    s = res.summary["surprisal"]
    assert s["words"] == len(expected) and s["bow_correction"] == name and s["unit"] == "bits"
    assert s["mean_surprisal"] == pytest.approx(sum(w["surprisal"] for w in expected) / len(expected), rel=REL)
    sums = [d.task.surprisal_sum for d in res.documents]
    assert sum(sums) == pytest.approx(s["surprisal_sum"], rel=1e-12)


def test_nats(tiny_llama_dir, words_file):
    bits = run(tiny_llama_dir, words_file).tables["words"]["surprisal"]
    nats = run(tiny_llama_dir, words_file, surprisal_unit="nats").tables["words"]["surprisal"]
    assert nats == pytest.approx([b * math.log(2) for b in bits], rel=1e-12)


@pytest.mark.parametrize("fields", [{"batch_size": 1}, {"padding_side": "left"}, {"token_budget": 40},
                                    {"chunk_documents": 2}], ids=["batch1", "left", "budget40", "chunks2"])
def test_invariant_to_batches_and_padding(tiny_llama_dir, words_file, fields):
    """Batch size, padding side, token budget and chunking change float32 rounding only."""
    base = run(tiny_llama_dir, words_file, batch_size=8)
    other = run(tiny_llama_dir, words_file, **fields)
    assert other.tables["words"]["surprisal"] == pytest.approx(base.tables["words"]["surprisal"], rel=1e-6)
    assert other.tables["words"]["rank"] == base.tables["words"]["rank"]


@pytest.mark.parametrize("style", ["pm", "minicons"])
def test_a_region_is_the_sum_of_its_words(tiny_gpt2_dir, tmp_path, style):
    """An element of --words-field holding several words is one unit whose surprisal is its words' sum (the corrections
    between them cancel)."""
    words = word_lists()[0]  # The cat sat on the mat.
    regions = [" ".join(words[:2]), " ".join(words[2:4]), " ".join(words[4:])]
    data = make_jsonl(tmp_path / "r.jsonl", [{"id": "w", "words": words}, {"id": "r", "words": regions}])
    table = run(tiny_gpt2_dir, data, bow_style=style).tables["words"]
    per_word, per_region = table["surprisal"][:6], table["surprisal"][6:]
    sums = [sum(per_word[:2]), sum(per_word[2:4]), sum(per_word[4:])]
    assert per_region == pytest.approx(sums, rel=1e-9)


def test_text_is_split_at_whitespace(tiny_llama_dir, tmp_path, words_file):
    """--text-field: the text's whitespace-separated words, each with the whitespace before it; on single-spaced text
    the same as the words given as a list."""
    texts = [" ".join(w) for w in word_lists()]
    data = make_jsonl(tmp_path / "t.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)])
    from_text = run(tiny_llama_dir, data, words_field=None)
    from_words = run(tiny_llama_dir, words_file)
    assert from_text.tables["words"]["word"] == from_words.tables["words"]["word"]
    assert from_text.tables["words"]["surprisal"] == pytest.approx(from_words.tables["words"]["surprisal"], rel=1e-6)
    spaced = make_jsonl(tmp_path / "s.jsonl", [{"text": "  The cat\n sat   down. "}, {"text": "  "}, {"text": None}])
    res = run(tiny_llama_dir, spaced, words_field=None, id_field=None)
    assert res.tables["words"]["word"] == ["The", "cat", "sat", "down."]
    assert [d.skipped for d in res.documents] == [None, "empty", "not_text"]
    assert res.summary["counts"]["skipped_documents"] == 2


def test_sentences():
    assert sentence_of(["He", "said:", '"Go!"', "Then", "he", "left.", "Bye"]) == [0, 0, 0, 1, 1, 1, 2]
    assert sentence_of(["Wait…", "what?)", "no"]) == [0, 1, 2]


def test_tables_on_disk_and_resume(tiny_llama_dir, words_file, tmp_path, monkeypatch):
    """words.parquet and sentences.parquet written a chunk at a time; stopped inside a chunk and resumed, the same
    tables and figures as one run; documents.jsonl has each document's sums."""
    import pyarrow.parquet as pq

    from lm_ce.reports import files
    from lm_ce.tasks import words

    def scored(directory):
        res = run(tiny_llama_dir, words_file, chunk_documents=2, output_dir=str(directory))
        files.write(res, str(directory))
        return res

    whole = scored(tmp_path / "whole")
    calls = {"n": 0}
    score = words.WordScorer.score_batch

    def stop_in_second_chunk(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)
        return score(self, batch)

    monkeypatch.setattr(words.WordScorer, "score_batch", stop_in_second_chunk)
    stopped = scored(tmp_path / "run")
    assert stopped.summary["complete"] is False
    monkeypatch.undo()
    resumed = run(tiny_llama_dir, words_file, chunk_documents=2, output_dir=str(tmp_path / "run"), resume=True)
    files.write(resumed, str(tmp_path / "run"))
    for name in ("words.parquet", "sentences.parquet"):
        a, b = pq.read_table(tmp_path / "whole" / name).to_pydict(), pq.read_table(tmp_path / "run" / name).to_pydict()
        assert a == b, name
    assert not list((tmp_path / "run").glob(".*.tmp-part*"))
    assert resumed.summary["surprisal"] == whole.summary["surprisal"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "documents.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["d0", "d1", "d2", "d3", "d4"]
    assert all({"surprisal_sum", "surprisal_mean", "sentences", "words", "tokens"} <= set(r) for r in rows)
    columns = pq.read_table(tmp_path / "run" / "words.parquet").column_names
    assert columns[:4] == ["document", "document_index", "word_index", "word"] and "surprisal" in columns


def test_python_api(tiny_llama, llama_tokenizer, tiny_llama_dir, words_file):
    import lm_ce

    rows = [{"words": w} for w in word_lists()]
    res = lm_ce.evaluate(tiny_llama, llama_tokenizer, rows, task="surprisal", words_field="words", progress=False)
    assert res.tables["words"]["surprisal"] == pytest.approx(run(tiny_llama_dir, words_file).tables["words"]["surprisal"],
                                                             rel=1e-6)
    assert res.tables["words"]["document"][0] == "0"  # no --id-field: the document's index


@pytest.mark.parametrize("row,message", [
    ({"words": ["a", ""]}, "holds an empty word"),
    ({"words": "a b"}, "is not a list of strings"),
    ({"words": ["a", 3]}, "is not a list of strings"),
])
def test_bad_words_are_refused_in_one_line(tiny_llama_dir, tmp_path, row, message):
    data = make_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(UsageError, match=message):
        run(tiny_llama_dir, data, id_field=None)


def test_a_list_in_the_text_field_is_refused(tiny_llama_dir, tmp_path):
    data = make_jsonl(tmp_path / "bad.jsonl", [{"text": ["a", "b"]}])
    with pytest.raises(UsageError, match="give --words-field"):
        run(tiny_llama_dir, data, id_field=None, words_field=None)


@pytest.mark.parametrize("settings,message", [
    ({"task": "surprisal", "protocol": "llama-cpp"}, "surprisal has one definition"),
    ({"task": "surprisal", "prefix_token": "none"}, "conditions the first word on a prefix token"),
    ({"words_field": "w"}, "words_field is read by task='surprisal'"),  # in Python's words (config_for)
    ({"task": "surprisal", "surprisal_unit": "bytes"}, "choose one of bits, nats"),
])
def test_settings_that_cannot_work_are_refused(settings, message):
    with pytest.raises(UsageError, match=message):
        config_for(**settings)
