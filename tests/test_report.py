"""lm_ce.reports.tables and files: number formatting, the console table and results.md from a summary dict, and the files written."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import yaml

from lm_ce.reports.files import write
from lm_ce.reports.tables import ROWS, fmt, markdown, table
from lm_ce.sums.records import DocumentResult, Results
from lm_ce.sums.stats import PositionLoss

# Each ROWS figure, and how it must read (written out by hand).
FIGURES = {
    "metrics.mean_loss": (2.3456789, "2.34568"),
    "metrics.perplexity": (10.44, "10.44"),
    "metrics.bits_per_token": (3.3841, "3.3841"),
    "metrics.bits_per_byte": (0.987654321, "0.987654"),
    "metrics.byte_perplexity": (1.98, "1.98"),
    "metrics.word_perplexity": (123456.789, "123,457"),
    "nll_sum": (1234567.891, "1,234,568"),
    "counts.tokens": (526316, "526,316"),
    "counts.documents": (12, "12"),
    "counts.skipped_documents": (3, "3"),
    "counts.bytes": (2000000, "2,000,000"),
    "counts.words": (350001, "350,001"),
    "counts.windows": (300, "300"),
    "counts.padding_tokens": (0, "0"),
    "timing.seconds": (61.5, "61.5"),
    "timing.tokens_per_second": (None, "-"),
}


def summary_dict(complete: bool = True) -> dict:
    """A summary as results.json holds it, with every figure of ROWS and every breakdown."""
    s: dict = {"complete": complete}
    for path, (value, _) in FIGURES.items():
        node = s
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    s["uncertainty"] = {"unit": "documents", "clusters": 12, "mean_loss_stderr": 0.0123,
                        "mean_loss_ci95": [2.32, 2.37], "perplexity_ci95": [10.2, 10.7]}
    s["groups"] = {"news": {"documents": 2, "tokens": 10, "bytes": 0, "nll_sum": 15.0, "mean_loss": 1.5,
                            "perplexity": 4.48169, "bits_per_byte": None}}
    s["compare"] = {
        "other-model": {"perplexity": 11.0, "bits_per_byte": 1.0, "delta_perplexity": 0.56, "kl_mean": 0.0125,
                        "kl_p99": 0.25, "top1_agreement": 0.875},
        "bytes-model": {"perplexity": 12.5, "bits_per_byte": 1.125, "note": "another tokenizer: compared by bytes"},
    }
    s["by_position"] = [{"positions": [0, 0], "tokens": 12, "mean_loss": 5.5, "perplexity": 244.692},
                        {"positions": [2, 3], "tokens": 24, "mean_loss": 2.25, "perplexity": 9.48774}]
    s["model"] = {"name": "tiny-model", "source": "directory", "path": "/models/tiny", "revision": None,
                  "dtype": "float32", "max_positions": 256, "parameters": 41000, "head": "chunked"}
    s["data"] = {"dataset": "wikitext", "dataset_config": "wikitext-2-raw-v1", "split": "test", "data_files": None}
    s["settings"] = {"mode": "document", "max_length": 128, "stride": 64, "padding_side": "right"}
    s["environment"] = {"lm_ce": "0.1", "device": "cpu", "processes": 1}
    s["config"] = {"model": "/models/tiny", "max_length": 128, "stride": 64, "data_files": None}
    return s


def test_fmt():
    assert fmt(None) == "-"
    assert fmt(1234567) == "1,234,567" and fmt(-3) == "-3"
    assert fmt(0.5) == "0.5" and fmt(1234.5678) == "1,234.57" and fmt(1e-9) == "1e-09"
    assert fmt(1.5e7) == "15,000,000" and fmt(12345678.9) == "12,345,679"  # from 10^6 on: whole numbers
    assert fmt(math.inf) == "inf" and fmt(math.nan) == "nan"
    assert fmt("chunked") == "chunked"
    assert fmt(False) == "false" and fmt(True) == "true"  # as results.json has them (data.streaming), not 0 and 1


def test_what_was_run_spells_booleans_as_results_json(tmp_path):
    s = summary_dict()
    s["data"]["streaming"] = False
    assert "\n| data.streaming | false |\n" in markdown(s)


def test_labels_are_unique():
    labels = [label for label, _ in ROWS]
    assert len(set(labels)) == len(labels)
    assert {path for _, path in ROWS} == set(FIGURES)  # FIGURES covers every row


def test_table_has_every_figure():
    lines = table(summary_dict()).splitlines()
    assert lines[0] == "tiny-model (float32) on wikitext wikitext-2-raw-v1 test: document mode, max_length 128, stride 64"
    for label, path in ROWS:
        expected = FIGURES[path][1]
        found = [line for line in lines if line.strip().startswith(label + "  ")]
        assert len(found) == 1 and found[0].split()[-1] == expected, (label, found)
    interval = next(line for line in lines if "95% interval" in line)
    assert interval.endswith("10.2 .. 10.7 (stderr of mean loss 0.0123 over 12 documents)")
    assert not any("INTERRUPTED" in line for line in lines)


def test_table_breakdowns():
    text = table(summary_dict())
    assert "\nBy group\n" in text and "\nModel against model (same tokens)\n" in text
    assert "\nMean loss by position in the window\n" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  ")}
    assert rows["news"] == ["news", "2", "10", "1.5", "4.48169", "-"]
    assert rows["other-model"] == ["other-model", "11", "1", "0.56", "0.0125", "0.25", "0.875"]
    assert rows["bytes-model"][:4] == ["bytes-model", "12.5", "1.125", "another"]  # the note instead of KL
    assert rows["tiny-model"] == ["tiny-model", "(first)", "10.44", "0.987654", "-", "-", "-", "-"]
    assert rows["0-0"] == ["0-0", "12", "5.5", "244.692"] and rows["2-3"] == ["2-3", "24", "2.25", "9.48774"]


def test_markdown_has_every_figure():
    text = markdown(summary_dict())
    assert text.startswith("# tiny-model (float32) on wikitext wikitext-2-raw-v1 test: document mode")
    for label, path in ROWS:
        assert f"\n| {label} | {FIGURES[path][1]} |\n" in text, label
    assert "| perplexity 95% interval | 10.2 .. 10.7 (stderr of mean loss 0.0123 over 12 documents) |" in text
    assert "| news | 2 | 10 | 1.5 | 4.48169 | - |" in text
    assert "| other-model | 11 | 1 | 0.56 | 0.0125 | 0.25 | 0.875 |" in text
    assert "| bytes-model | 12.5 | 1.125 | another tokenizer: compared by bytes | - | - | - |" in text
    assert "| 2-3 | 24 | 2.25 | 9.48774 |" in text
    # what was run: every set value, none of the unset ones
    assert "| model.parameters | 41,000 |" in text and "| settings.stride | 64 |" in text
    assert "| environment.device | cpu |" in text
    assert "model.revision" not in text and "data.data_files" not in text
    assert "Interrupted" not in text


def test_interrupted_runs_say_so():
    assert "INTERRUPTED: these figures cover only what was scored before the stop" in table(summary_dict(False))
    assert "**Interrupted: these figures cover only what was scored before the stop.**" in markdown(summary_dict(False))


def test_local_files_in_the_title_and_no_interval():
    s = summary_dict()
    s["data"]["data_files"] = ["a.jsonl", "b.jsonl"]
    s["uncertainty"] = {"unit": "windows", "clusters": 1}
    lines = table(s).splitlines()
    assert lines[0].startswith("tiny-model (float32) on a.jsonl, b.jsonl: document mode")
    assert next(line for line in lines if "95% interval" in line).split()[-1] == "-"


def results_of(summary: dict, *, tokens: bool = True) -> Results:
    positions = PositionLoss.zeros(8)
    positions.add(torch.tensor([0, 1, 1, 5]), torch.tensor([4.0, 2.0, 3.0, 1.0]))
    documents = [DocumentResult(0, id="first", tokens=4, nll_sum=6.0, bytes=12, words=3, windows=1),
                 DocumentResult(1, id="empty", skipped="empty")]
    table = {"doc": [0, 0], "position": [0, 1], "nll": [2.5, 3.5], "token": ["a", "é"]} if tokens else None
    return Results(summary, documents, positions, table)


def test_write_writes_every_file(tmp_path):
    summary = summary_dict()
    summary["metrics"]["word_perplexity"] = math.inf  # written as JSON's Infinity, read back as inf
    write(results_of(copy.deepcopy(summary)), str(tmp_path / "out"))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml", "documents.jsonl", "position_loss.png", "results.html", "results.json", "results.md",
        "tokens.parquet",
    ]  # no temporary files left behind
    assert json.loads((out / "results.json").read_text(encoding="utf-8")) == summary
    assert (out / "results.md").read_text(encoding="utf-8") == markdown(summary)
    assert yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8")) == summary["config"]
    rows = [json.loads(line) for line in (out / "documents.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["first", "empty"]
    assert rows[0]["perplexity"] == pytest.approx(math.exp(1.5), rel=1e-15)
    assert rows[0]["bits_per_byte"] == pytest.approx(6.0 / 12 / math.log(2), rel=1e-15)
    assert (rows[0]["tokens"], rows[0]["words"], rows[1]["skipped"]) == (4, 3, "empty")
    assert rows[1]["perplexity"] is None and rows[1]["bits_per_byte"] is None
    import pyarrow.parquet as pq

    assert pq.read_table(out / "tokens.parquet").to_pydict() == results_of(summary).token_table
    assert (out / "position_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_leaves_out_what_there_is_not(tmp_path):
    written = write(results_of(summary_dict(), tokens=False), str(tmp_path / "no_plot"), plot=False)
    assert sorted(p.name for p in (tmp_path / "no_plot").iterdir()) == [
        "config.yaml", "documents.jsonl", "results.html", "results.json", "results.md"]
    assert sorted(p.name for p in written) == sorted(p.name for p in (tmp_path / "no_plot").iterdir())
    bare = Results(summary_dict(), [], PositionLoss.zeros(8), None)  # stream mode: no documents, nothing by position
    written = write(bare, str(tmp_path / "bare"), page=False)
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == ["config.yaml", "results.json", "results.md"]
    assert sorted(p.name for p in written) == ["config.yaml", "results.json", "results.md"]  # what the CLI lists


def test_write_replaces_earlier_files(tmp_path):
    first = summary_dict()
    write(results_of(first), str(tmp_path), plot=False)
    second = summary_dict()
    second["nll_sum"] = 7.25
    write(results_of(second, tokens=False), str(tmp_path), plot=False)
    assert json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["nll_sum"] == 7.25
    assert not (tmp_path / "tokens.parquet").exists()  # the first run's, not written by the second: deleted
    assert "| NLL sum (nats) | 7.25 |" in (tmp_path / "results.md").read_text(encoding="utf-8")


HOSTILE = {"model": "<svg onload=alert(1)>", "file": "runs/a|b<img src=x onerror=alert(2)>.jsonl",
           "group": "[click](javascript:alert(3))", "underscores": "__init__ of my_model", "other": "q4 ``` <script>x</script>",
           "newline": "two\nlines"}


def rendered(text: str) -> str:
    """The HTML a CommonMark viewer with GitHub's tables makes of Markdown that allows raw HTML."""
    markdown_it = pytest.importorskip("markdown_it")
    return markdown_it.MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"]).render(text)


def test_names_in_results_md_are_text_not_html():
    """Model, data, group and compared-model names from the run's inputs show in results.md as they are: no tag, link
    or emphasis of theirs renders, and no table loses or gains a cell (results.html escapes them too)."""
    import html

    s = summary_dict()
    s["model"]["name"] = HOSTILE["model"]
    s["data"]["data_files"] = [HOSTILE["file"]]
    s["groups"] = {name: s["groups"]["news"] for name in (HOSTILE["group"], HOSTILE["underscores"], HOSTILE["newline"])}
    s["compare"] = {HOSTILE["other"]: s["compare"]["other-model"]}
    page = rendered(markdown(s))
    for tag in ("<svg", "<img", "<script", "<a ", "<em>", "<strong>", "<code>"):
        assert tag not in page, tag
    text = html.unescape(page)
    for name in HOSTILE.values():
        assert name.replace("\n", "\\n") in text, name
    groups = page[page.index("By group"):].split("</table>")[0]
    assert groups.count("<tr>") == 4 and groups.count("<td>") == 3 * 6  # a header and 3 rows of 6 cells


def test_a_divergence_block_cannot_be_closed_by_a_name():
    from lm_ce.reports.tables import md_code

    lines = md_code(["Q = q4 ``` <script>x</script>", "``````"])
    page = rendered("\n".join(lines))
    assert lines[0] == "```````text" and page.count("<pre>") == 1 and "<script" not in page
