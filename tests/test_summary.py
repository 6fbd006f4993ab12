"""lm_ce.reports.summary and figures: the figures from exact sums worked out by hand, and results.json from a small Run built by hand."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from lm_ce.config.fields import Config
from lm_ce.errors import UsageError
from lm_ce.model.load import ModelInfo
from lm_ce.reports.figures import metrics
from lm_ce.reports.summary import Durations, summarize
from lm_ce.rundir.outputs import token_table
from lm_ce.scoring.setup import Setup
from lm_ce.sums.divergence import Divergence
from lm_ce.sums.records import DocSums, DocumentResult, RowSums, Run, Tally, TokenSums, WindowSums
from lm_ce.sums.stats import PositionLoss

LN2 = 0.6931471805599453


def test_metrics_by_hand():
    m = metrics(10.0, 4, 20, 5)  # 10 nats over 4 tokens, 20 bytes, 5 words
    assert m["mean_loss"] == 2.5
    assert m["perplexity"] == pytest.approx(12.182493960703473, rel=1e-15)  # e^2.5
    assert m["bits_per_token"] == pytest.approx(2.5 / LN2, rel=1e-15)
    assert m["bits_per_byte"] == pytest.approx(0.5 / LN2, rel=1e-15)
    assert m["byte_perplexity"] == pytest.approx(1.6487212707001282, rel=1e-15)  # e^(10/20)
    assert m["word_perplexity"] == pytest.approx(7.38905609893065, rel=1e-15)  # e^(10/5)
    # perplexity and bits agree: 2^(bits per token) is the perplexity, 2^(bits per byte) the byte perplexity
    assert 2 ** m["bits_per_token"] == pytest.approx(m["perplexity"], rel=1e-12)
    assert 2 ** m["bits_per_byte"] == pytest.approx(m["byte_perplexity"], rel=1e-12)


def test_metrics_without_counts_are_none():
    assert metrics(0.0, 0, 0, 0) == dict.fromkeys(
        ["mean_loss", "perplexity", "bits_per_token", "bits_per_byte", "byte_perplexity", "word_perplexity"])
    m = metrics(3.0, 2, 0, 0)  # tokens but no bytes or words (a stopped stream)
    assert m["mean_loss"] == 1.5 and m["bits_per_byte"] is None and m["byte_perplexity"] is None
    assert m["word_perplexity"] is None


def test_metrics_beyond_float64_are_inf():
    m = metrics(1e6, 1, 1, 1)
    assert m["perplexity"] == math.inf and m["byte_perplexity"] == math.inf
    assert m["bits_per_token"] == pytest.approx(1e6 / LN2, rel=1e-15)  # the finite figures stay exact


SETUP = Setup(device=torch.device("cpu"), processes=1, threads=1, max_length=8, stride=8, prefix=0, budget=64,
              head=None, head_note="full logits (built by hand)")
INFO = ModelInfo("tiny", "object", "tiny", None, "float32", 256, 1000)
DURATIONS = Durations(load=1.0, scoring=2.0, total=3.5)


def document_run() -> Run:
    """Two scored documents (6 and 5 nats over 4 and 2 tokens), one empty, one without text."""
    positions = PositionLoss.zeros(8)
    positions.add(torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([3.0, 1.0, 1.0, 1.0, 4.0, 1.0]))
    tally = Tally(
        docs={0: DocSums(nll=6.0, tokens=4, sum_sq=12.0), 1: DocSums(nll=5.0, tokens=2, sum_sq=17.0)},
        windows=[WindowSums(0, 0, 6.0, 4), WindowSums(1, 0, 5.0, 2)],
        positions=positions, padding=2, inputs=8,
    )
    documents = [
        DocumentResult(0, id="a", group="x", tokens=4, nll_sum=6.0, bytes=10, words=2, windows=1),
        DocumentResult(1, id="b", group="y", tokens=2, nll_sum=5.0, bytes=6, words=1, windows=1),
        DocumentResult(2, id="c", group="x", skipped="empty"),
        DocumentResult(3, skipped="not_text"),
    ]
    return run_of(documents, tally, chunks_done=1, windows=2, tokens_per_process=[6])


def run_of(documents: list[DocumentResult], tally: Tally, **fields) -> Run:
    """A run whose finished chunks hold these rows and this tally, folded as the runner folds them."""
    rows, sums = RowSums(), TokenSums()
    for d in documents:
        rows.add(d)
    sums.add(tally)
    return Run(rows=rows, sums=sums, tally=Tally(positions=tally.positions, padding=tally.padding,
                                                 inputs=tally.inputs), **fields)


def summary_of(cfg: Config, run: Run, stopped: bool = False):
    return summarize(cfg, run=run, stopped=stopped, setup=SETUP, info=INFO, durations=DURATIONS)


def test_document_run_summary_by_hand():
    run = document_run()
    before = copy.deepcopy(run)
    cfg = Config(model="tiny", group_field="group", max_length=8)
    results = summary_of(cfg, run)
    s = results.summary
    assert s["nll_sum"] == 11.0
    assert s["counts"] == {"tokens": 6, "documents": 2, "skipped_documents": 2, "bytes": 16, "words": 3,
                           "windows": 2, "input_tokens": 8, "padding_tokens": 2, "tokens_per_process": [6],
                           "double_prefix_removed": 0}
    assert s["metrics"] == metrics(11.0, 6, 16, 3)
    assert s["metrics"]["mean_loss"] == pytest.approx(11 / 6, rel=1e-15)
    # clusters: documents; mean 11/6, residuals 6 - 4 * 11/6 = -4/3 and 5 - 2 * 11/6 = 4/3:
    # se = sqrt(2/1 * 32/9) / 6 = 4/9; iid: (29 - 6 * (11/6)^2) / 5 = 53/30, se sqrt(53/180)
    u = s["uncertainty"]
    assert (u["unit"], u["clusters"]) == ("documents", 2)
    assert u["mean_loss_stderr"] == pytest.approx(4 / 9, rel=1e-12)
    assert u["mean_loss_stderr_iid"] == pytest.approx(math.sqrt(53 / 180), rel=1e-12)
    assert s["timing"] == {"seconds": 2.0, "tokens_per_second": 3.0, "load_seconds": 1.0, "total_seconds": 3.5}
    assert s["complete"] is True
    assert s["by_position"] == [
        {"positions": [0, 0], "tokens": 2, "mean_loss": 3.5, "perplexity": math.exp(3.5)},
        {"positions": [1, 1], "tokens": 2, "mean_loss": 1.0, "perplexity": math.exp(1.0)},
        {"positions": [2, 3], "tokens": 2, "mean_loss": 1.0, "perplexity": math.exp(1.0)},
    ]
    assert s["groups"]["x"]["documents"] == 1 and s["groups"]["x"]["mean_loss"] == 1.5  # the empty one not counted
    assert s["groups"]["y"]["bits_per_byte"] == pytest.approx(5 / 6 / LN2, rel=1e-15)
    assert s["model"] == {"name": "tiny", "source": "object", "path": "tiny", "revision": None, "dtype": "float32",
                          "max_positions": 256, "parameters": 1000, "device_map": None, "commit": None, "weights": None,
                          "tokenizer": None, "attn_implementation": None, "head": "full logits (built by hand)"}
    assert s["settings"] == {"protocol": "lm-eval", "protocol_overrides": {}, "headline": "perplexity", "mode": "document", "max_length": 8,
                             "stride": 8, "prefix_token": "auto", "prefix_token_id": 0, "bos_policy": "first",
                             "window_first_token_id": None, "chunks": None, "detokenizer": "none", "separator": None,
                             "batch_size": 8, "token_budget": 64, "padding_side": "right", "task": "perplexity"}
    assert s["data"]["dataset"] == "wikitext" and s["data"]["group_field"] == "group"
    assert s["environment"]["processes"] == 1 and s["environment"]["device"] == "cpu"
    assert s["environment"]["torch"] == torch.__version__
    assert s["config"] == cfg.resolved()
    assert "compare" not in s
    assert results.documents == [] and results.positions is not None and results.token_table is None  # no outputs
    # the run is read, not changed
    assert (run.rows, run.sums) == (before.rows, before.sums)
    assert torch.equal(run.tally.positions.nll, before.tally.positions.nll)


def test_document_mode_stopped_inside_a_chunk_reports_what_was_saved():
    run = document_run()
    # stopped inside the next chunk: document 7 scored in part, over one window
    run.partial = Tally(docs={7: DocSums(nll=100.0, tokens=3, sum_sq=4000.0)}, windows=[WindowSums(7, 0, 100.0, 3)])
    s = summary_of(Config(model="tiny"), run, stopped=True).summary
    assert (s["nll_sum"], s["counts"]["tokens"], s["counts"]["windows"], s["complete"]) == (111.0, 9, 3, False)
    assert s["counts"]["tokens"] == run.tokens  # what state.pt holds, and the refusal to overwrite says
    assert s["uncertainty"]["clusters"] == 3  # the part-scored document is a cluster of its scored tokens
    assert s["counts"]["documents"] == 2 and s["counts"]["bytes"] == 16  # the finished rows
    assert s["metrics"]["bits_per_byte"] is None  # the stopped chunk's bytes are not all scored
    assert "groups" not in s  # no --group-field
    assert (run.sums.tokens, run.sums.nll.value) == (6, 11.0)  # the run is not changed


def stream_run() -> Run:
    """One stream of 6 scored tokens in two windows, over two documents of 3 and 1 words."""
    tally = Tally(docs={-1: DocSums(nll=11.0, tokens=6, sum_sq=29.0)},
                  windows=[WindowSums(-1, 0, 6.0, 4), WindowSums(-1, 4, 5.0, 2)], positions=PositionLoss.zeros(8))
    documents = [DocumentResult(0, words=3), DocumentResult(1, words=1), DocumentResult(2, skipped="not_text")]
    return run_of(documents, tally, windows=2, stream_bytes=20, tokens_per_process=[6])


def test_stream_run_summary_by_hand():
    results = summary_of(Config(model="tiny", mode="stream"), stream_run())
    s = results.summary
    assert (s["nll_sum"], s["counts"]["tokens"], s["counts"]["bytes"], s["counts"]["words"]) == (11.0, 6, 20, 4)
    assert s["metrics"]["bits_per_byte"] == pytest.approx(11 / 20 / LN2, rel=1e-15)
    assert s["metrics"]["word_perplexity"] == pytest.approx(math.exp(11 / 4), rel=1e-15)
    # clusters: the two windows, with the same sums as the two documents above
    assert s["uncertainty"]["unit"] == "windows"
    assert s["uncertainty"]["mean_loss_stderr"] == pytest.approx(4 / 9, rel=1e-12)
    assert s["settings"]["separator"] == "\n\n"
    assert results.documents == []  # documents.jsonl is for document mode


def test_stopped_stream_counts_its_partial_sums_but_no_bytes():
    run = stream_run()
    run.partial = Tally(docs={-1: DocSums(nll=3.0, tokens=1, sum_sq=9.0)}, windows=[WindowSums(-1, 6, 3.0, 1)])
    s = summary_of(Config(model="tiny", mode="stream"), run, stopped=True).summary
    assert (s["nll_sum"], s["counts"]["tokens"], s["complete"]) == (14.0, 7, False)
    assert s["metrics"]["mean_loss"] == 2.0
    # bytes and words are known only for the whole stream
    assert s["counts"]["bytes"] == 0 and s["metrics"]["bits_per_byte"] is None and s["metrics"]["word_perplexity"] is None
    assert s["counts"]["windows"] == 3  # the stopped stream's windows, as its stderr counts them
    assert run.sums.tokens == 6  # the run's own sums are not changed


def empty_run(*reasons: str) -> Run:
    return run_of([DocumentResult(i, skipped=r) for i, r in enumerate(reasons)], Tally())


def test_nothing_scored_is_refused():
    with pytest.raises(UsageError, match="no row has a string in field 'body'"):
        summary_of(Config(model="tiny", text_field="body"), empty_run("not_text", "not_text"))
    with pytest.raises(UsageError, match="all 2 documents tokenize to nothing"):
        summary_of(Config(model="tiny"), empty_run("empty", "not_text"))
    stopped = summary_of(Config(model="tiny"), empty_run("empty"), stopped=True).summary  # stopped before any batch
    assert stopped["counts"]["tokens"] == 0 and stopped["metrics"]["perplexity"] is None


def test_stopped_in_the_first_chunk_with_compare_to():
    """A document run stopped (Ctrl-C) inside its first chunk with --compare-to has no finished tokens: it reports
    what it saved of the chunk."""
    run = empty_run()
    run.tally.compares = [Divergence()]  # as Plan.new_tally leaves it: nothing of the first chunk is finished
    run.partial = Tally(docs={0: DocSums(nll=3.0, tokens=2, sum_sq=5.0)}, compares=[Divergence()])
    s = summary_of(Config(model="tiny", compare_to=["other"]), run, stopped=True).summary
    assert s["complete"] is False and s["counts"]["tokens"] == 2
    assert s["compare"] == {"other": {"tokens": 0}}  # (the hand-built partial has no compared tokens)


class Vocabulary:
    """A tokenizer stand-in: decode gives the id's letter."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i) for i in ids)


def test_token_table_in_document_order():
    blocks = [  # two batches, scored out of document order
        {"doc": torch.tensor([1, 1, 0]), "position": torch.tensor([1, 0, 2]), "token_id": torch.tensor([3, 4, 5]),
         "top1_id": torch.tensor([3, 3, 0]), "nll": torch.tensor([0.5, 1.5, 2.5])},
        {"doc": torch.tensor([0, 0]), "position": torch.tensor([0, 1]), "token_id": torch.tensor([0, 1]),
         "top1_id": torch.tensor([1, 1]), "nll": torch.tensor([3.5, 4.5])},
    ]
    documents = [DocumentResult(0, id="first"), DocumentResult(1, id=None)]
    out = token_table(blocks, documents, Vocabulary())
    assert out["doc"] == [0, 0, 0, 1, 1] and out["position"] == [0, 1, 2, 0, 1]
    assert out["nll"] == [3.5, 4.5, 2.5, 1.5, 0.5]
    assert out["token"] == ["a", "b", "f", "e", "d"] and out["top1"] == ["b", "b", "a", "d", "d"]
    assert out["doc_id"] == ["first", "first", "first", None, None]
    assert token_table([], documents, Vocabulary()) is None
