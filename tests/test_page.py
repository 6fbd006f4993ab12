"""results.html: one offline page whose figures are results.json's and whose documents of highest and lowest loss
are the right ones, each token coloured and titled with its own loss and top-1 guess; kept as the run goes, across
a stop and --resume, and with several processes. Checked structurally always, and in a real browser when one is
installed (Chromium, driven by Playwright)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lm_ce.cli import main as cli
from lm_ce.config.fields import Config
from lm_ce.reports import files as report_files
from lm_ce.reports import tables
from lm_ce.reports.page import loss_class
from lm_ce.rundir.outputs import readable_texts
from lm_ce.runner import evaluate
from lm_ce.scoring.scorer import Scorer
from lm_ce.sums.extremes import Extremes

from .conftest import chunked_settings, corpus_rows, make_jsonl


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_jsonl(tmp_path_factory.mktemp("page") / "docs.jsonl", corpus_rows(40))


def settings(model: str, data: str, out: Path | None, **fields) -> Config:
    return chunked_settings(model, data, out, **{"plot": False, **fields})


class Page(HTMLParser):
    """What a test reads of results.html: every tag's attributes, the documents' spans, table cells, style text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.docs: list[dict] = []  # {kind, index, name, spans: [(class, title, text)]}
        self.cells: list[list[str]] = []  # table rows
        self.style = ""
        self._in: list[str] = []
        self._span: list | None = None
        self._h3 = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "article":
            self.docs.append({"kind": attrs["class"].split()[1], "index": int(attrs["data-document"]), "name": "",
                              "spans": []})
        elif tag == "span" and self.docs and "text" in self._in_classes():
            self._span = [attrs.get("class"), attrs.get("title"), ""]
        elif tag == "h3":
            self._h3 = True
        elif tag == "tr":
            self.cells.append([])
        if tag not in ("meta", "br", "line", "circle", "rect", "polyline"):
            self._in.append(attrs.get("class") or tag)

    def _in_classes(self) -> list[str]:
        return [c for entry in self._in for c in entry.split()]

    def handle_endtag(self, tag):
        if tag == "span" and self._span is not None:
            self.docs[-1]["spans"].append(tuple(self._span))
            self._span = None
        if tag == "h3":
            self._h3 = False
        if self._in and tag not in ("meta", "br"):
            self._in.pop()

    def handle_data(self, data):
        if self._span is not None:
            self._span[2] += data
        elif self._h3:
            self.docs[-1]["name"] += data
        if self._in and self._in[-1] == "style":
            self.style += data
        if self._in and self._in[-1] in ("td", "n", "th") and self.cells:
            self.cells[-1].append(data)


def by_mean(rows: list[dict], highest: bool) -> list[dict]:
    scored = [r for r in rows if r["tokens"]]
    return sorted(scored, key=lambda r: ((-1 if highest else 1) * r["nll_sum"] / r["tokens"], r["index"]))


def tokens_by_document(table: dict) -> dict[int, list[tuple[int, float, str]]]:
    out: dict[int, list] = {}
    for doc, token_id, nll, top1 in zip(table["doc"], table["token_id"], table["nll"], table["top1"]):
        out.setdefault(doc, []).append((token_id, nll, top1))
    return out


def documents_section(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    return text[text.index('<section id="documents">'):text.index('<section id="run">')]


def test_page_names_the_extreme_documents_and_colours_their_tokens(tiny_llama_dir, corpus, tmp_path, llama_tokenizer):
    out = tmp_path / "run"
    results = evaluate(settings(tiny_llama_dir, corpus, out))
    report_files.write(results, str(out), plot=False)
    reference = evaluate(settings(tiny_llama_dir, corpus, None, save_tokens=True))  # every token, in memory
    summary = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]
    text_of = {json.loads(line)["id"]: json.loads(line)["text"] for line in Path(corpus).read_text().splitlines()}
    page = Page((out / "results.html").read_text(encoding="utf-8"))

    # offline: nothing to fetch, no script
    assert not [t for t, a in page.tags if t in ("script", "link", "img", "iframe", "object", "embed")]
    assert not [(t, a) for t, a in page.tags for k in ("src", "href", "srcset", "action") if k in a]
    assert "url(" not in page.style and "@import" not in page.style

    # the figures are results.json's
    cells = {r[0]: r[1] for r in page.cells if len(r) == 2}
    assert cells["mean loss (nats/token)"] == tables.fmt(summary["metrics"]["mean_loss"])
    assert cells["perplexity"] == tables.fmt(summary["metrics"]["perplexity"])
    assert cells["bits per byte"] == tables.fmt(summary["metrics"]["bits_per_byte"])
    assert cells["tokens scored"] == f"{summary['counts']['tokens']:,}"
    assert cells["NLL sum (nats)"] == tables.fmt(summary["nll_sum"])
    groups = {r[0]: r[1:] for r in page.cells if r and r[0] in summary["groups"]}
    for name, g in summary["groups"].items():
        assert groups[name] == [tables.fmt(g[k]) for k in ("documents", "tokens", "mean_loss", "perplexity",
                                                           "bits_per_byte")]
    assert sum(t == "circle" for t, _ in page.tags) == len(summary["by_position"])  # the plot's buckets

    # the 5 documents of highest and of lowest mean loss, in order, by id, from documents.jsonl's figures
    shown = {kind: [d for d in page.docs if d["kind"] == kind] for kind in ("highest", "lowest")}
    for kind in ("highest", "lowest"):
        expected = by_mean(rows, kind == "highest")[:5]
        assert [d["index"] for d in shown[kind]] == [r["index"] for r in expected]
        assert [d["name"].split()[0] for d in shown[kind]] == [r["id"] for r in expected]
    assert shown["highest"][0]["index"] != shown["lowest"][0]["index"]

    # each token coloured by its own loss, titled with its loss and top-1 guess; together they read as the text
    tokens = tokens_by_document(reference.token_table)
    for d in page.docs:
        expected = tokens[d["index"]]
        titles = " + ".join(title for _, title, _ in d["spans"])
        assert re.findall(r"loss (\d+\.\d+) nats", titles) == [f"{nll:.3f}" for _, nll, _ in expected]
        assert re.findall(r"top-1 guess: (\"(?:[^\"\\]|\\.)*\")", titles) == [
            json.dumps(top1, ensure_ascii=False) for _, _, top1 in expected]
        assert "".join(text for _, _, text in d["spans"]) == text_of[rows[d["index"]]["id"]]
        assert len(d["spans"]) == len(expected) - sum(1 for t in readable_texts([i for i, _, _ in expected],
                                                                                llama_tokenizer.decode) if not t)
        at = 0
        for cls, title, _ in d["spans"]:  # a span's colour: its token's loss (a split character's: the highest)
            k = title.count("loss ")
            assert cls == f"c{loss_class(max(nll for _, nll, _ in expected[at : at + k]))}"
            at += k
        assert at == len(expected)
    assert len({cls for d in page.docs for cls, _, _ in d["spans"]}) >= 3  # coloured, not one colour


def test_tokens_split_inside_a_character_read_whole(llama_tokenizer):
    ids = llama_tokenizer("Über naïve 🙂 café", add_special_tokens=False)["input_ids"]
    alone = [llama_tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in t for t in alone)  # the test can tell: decoded alone, some tokens are half characters
    texts = readable_texts(ids, llama_tokenizer.decode)
    assert len(texts) == len(ids) and "".join(texts) == llama_tokenizer.decode(ids)
    assert not any("\ufffd" in t for t in texts)


def test_keeping_extremes_chunk_by_chunk_equals_choosing_from_all():
    from lm_ce.sums.records import DocumentResult

    rows = [DocumentResult(index=i, id=f"d{i}", tokens=1 + i % 4, nll_sum=((i * 37) % 11) * (1 + i % 4) / 3.0)
            for i in range(50)]  # equal means too: the earlier document wins
    kept = Extremes(4)
    asked: list[set[int]] = []

    def tokens_of(wanted):
        asked.append(set(wanted))
        docs = sorted(wanted)
        return {"doc": docs, "token": [f"t{i}" for i in docs], "nll": [0.0] * len(docs), "top1": ["x"] * len(docs)}

    for start in range(0, 50, 7):
        kept.keep(rows[start : start + 7], tokens_of)
        assert len(kept.kept) <= 8
    whole = sorted(rows, key=lambda r: (-r.nll_sum / r.tokens, r.index))
    assert [d.index for d in kept.highest()] == [r.index for r in whole[:4]]
    whole = sorted(rows, key=lambda r: (r.nll_sum / r.tokens, r.index))
    assert [d.index for d in kept.lowest()] == [r.index for r in whole[:4]]
    assert all(d.text == [f"t{d.index}"] for d in kept.kept.values())  # tokens of the kept ones, asked for once
    assert sum(len(a) for a in asked) < 50


def test_a_stopped_and_resumed_run_shows_the_same_documents(tiny_llama_dir, corpus, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    report_files.write(evaluate(settings(tiny_llama_dir, corpus, whole)), str(whole), plot=False)
    calls = {"n": 0}
    score = Scorer.score

    def score_then_signal(self, batch, tally):
        calls["n"] += 1
        if calls["n"] == 40:  # inside a later chunk
            os.kill(os.getpid(), signal.SIGINT)
        return score(self, batch, tally)

    monkeypatch.setattr(Scorer, "score", score_then_signal)
    out = tmp_path / "stopped"
    args = ["--model", tiny_llama_dir, "--data-files", corpus, "--id-field", "id", "--group-field", "group",
            "--max-length", "24", "--stride", "12", "--batch-size", "2", "--chunk-documents", "8", "--no-plot",
            "--output-dir", str(out), "--no-progress"]
    assert cli.main(args) == 130
    assert 'class="warn"' in (out / "results.html").read_text()  # the interrupted page says so
    monkeypatch.setattr(Scorer, "score", score)
    assert cli.main(args + ["--resume"]) == 0
    assert documents_section(out / "results.html") == documents_section(whole / "results.html")

    # a state saved without the documents' tokens: the resumed page shows none, and says why
    calls["n"] = 0
    monkeypatch.setattr(Scorer, "score", score_then_signal)
    off = tmp_path / "off"
    assert cli.main([*args[:-3], "--output-dir", str(off), "--no-progress", "--no-page"]) == 130
    assert not (off / "results.html").exists()
    monkeypatch.setattr(Scorer, "score", score)
    assert cli.main([*args[:-3], "--output-dir", str(off), "--no-progress", "--resume"]) == 0
    section = documents_section(off / "results.html")
    assert "<span" not in section and "resumed from a state saved without" in section


def test_other_modes_and_settings_say_why_no_documents(tiny_llama_dir, corpus, tmp_path):
    out = tmp_path / "stream"
    report_files.write(evaluate(settings(tiny_llama_dir, corpus, out, mode="stream", stride=None, group_field=None)),
                 str(out), plot=False)
    section = documents_section(out / "results.html")
    assert "<span" not in section and "stream mode the documents are joined" in section
    out = tmp_path / "none"
    report_files.write(evaluate(settings(tiny_llama_dir, corpus, out, page_documents=0, limit=8)), str(out), plot=False)
    assert "--page-documents is 0" in documents_section(out / "results.html")
    assert cli.main(["--model", tiny_llama_dir, "--data-files", corpus, "--page-documents", "-1"]) == 2


def browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(browser() is None, reason="no Chromium installed (apt-get install chromium)")
def test_the_page_loads_offline_in_a_browser(tiny_llama_dir, corpus, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    out = tmp_path / "run"
    report_files.write(evaluate(settings(tiny_llama_dir, corpus, out, limit=16)), str(out), plot=False)
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=browser(), args=["--no-sandbox"])
        try:
            context = chromium.new_context(offline=True)
            page = context.new_page()
            errors, requests = [], []
            page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto((out / "results.html").as_uri())
            page.wait_for_load_state("load")
            assert errors == []
            assert requests == [(out / "results.html").as_uri()]  # the page itself, nothing else
            assert page.locator("article.highest").count() == 5 and page.locator("article.lowest").count() == 5
            first = page.locator("article.highest .text span").first
            assert re.match(r"loss \d+\.\d+ nats; top-1 guess: ", first.get_attribute("title"))
            colour = first.evaluate("e => getComputedStyle(e).backgroundColor")
            assert colour not in ("rgba(0, 0, 0, 0)", "transparent")  # the inline style applies
            assert page.locator("svg circle").count() > 0
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            assert (tmp_path / "page.png").stat().st_size > 10_000
        finally:
            chromium.close()


@pytest.mark.slow  # a real 2-process launch
def test_several_processes_show_the_same_documents(tiny_llama_dir, corpus, tmp_path, capsys):
    from .test_distributed import run_distributed, run_single

    args = ["--model", tiny_llama_dir, "--data-files", corpus, "--id-field", "id", "--max-length", "24", "--stride",
            "12", "--batch-size", "2", "--chunk-documents", "8", "--no-plot"]
    run_single(args, tmp_path / "one", capsys)
    run_distributed(args, tmp_path / "many")
    one, many = (Page((tmp_path / d / "results.html").read_text(encoding="utf-8")).docs for d in ("one", "many"))
    assert [(d["kind"], d["index"], d["name"]) for d in many] == [(d["kind"], d["index"], d["name"]) for d in one]
    assert len(one) == 10
    for a, b in zip(one, many):
        assert [text for _, _, text in a["spans"]] == [text for _, _, text in b["spans"]]
        losses = [[float(x) for x in re.findall(r"loss (\d+\.\d+)", " ".join(t for _, t, _ in d["spans"]))]
                  for d in (a, b)]
        assert losses[1] == pytest.approx(losses[0], abs=1.5e-3)  # batches differ: float rounding, then 3 decimals


def test_shards_merged_show_the_documents_of_the_single_run(tiny_llama_dir, corpus, tmp_path, capsys):
    base = ["--model", tiny_llama_dir, "--data-files", corpus, "--id-field", "id", "--max-length", "24", "--stride",
            "12", "--chunk-documents", "8", "--no-progress", "--no-plot"]
    assert cli.main(base + ["--output-dir", str(tmp_path / "one")]) == 0
    for k in range(2):
        assert cli.main(base + ["--shard", f"{k}/2", "--output-dir", str(tmp_path / f"s{k}")]) == 0
    assert cli.main(["merge", str(tmp_path / "s1"), str(tmp_path / "s0"), "--output-dir", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    assert documents_section(tmp_path / "m" / "results.html") == documents_section(tmp_path / "one" / "results.html")
    assert "<span" in documents_section(tmp_path / "m" / "results.html")


def test_long_documents_show_their_first_tokens_only(tiny_llama_dir, corpus, tmp_path, monkeypatch):
    from lm_ce.reports import page
    from lm_ce.rundir import outputs
    from lm_ce.sums import extremes

    for module in (extremes, outputs, page):
        monkeypatch.setattr(module, "SHOWN_TOKENS", 7)
    out = tmp_path / "run"
    report_files.write(evaluate(settings(tiny_llama_dir, corpus, out, limit=16)), str(out), plot=False)
    reference = tokens_by_document(evaluate(settings(tiny_llama_dir, corpus, None, limit=16, save_tokens=True)).token_table)
    text = (out / "results.html").read_text(encoding="utf-8")
    docs = Page(text).docs
    assert len(docs) == 10
    for d in docs:
        losses = re.findall(r"loss (\d+\.\d+) nats", " + ".join(title for _, title, _ in d["spans"]))
        assert losses == [f"{nll:.3f}" for _, nll, _ in reference[d["index"]][:7]]
        assert f"The first 7 of its {len(reference[d['index']])} scored tokens" in text


def test_top1_from_the_tiled_head_is_the_float64_argmax():
    """The hover's top-1 guess: the tiled head's argmax over every vocabulary slice (ties: the earlier id)."""
    import torch

    from lm_ce.scoring.head import Head, token_losses

    torch.manual_seed(0)
    weight, hidden = torch.randn(5000, 32), torch.randn(300, 32) * 3
    weight[4100] = weight[7]  # a tie across slices
    hidden[0] = weight[7] * 40
    targets = torch.randint(0, 5000, (300,))
    expected = (hidden.double() @ weight.double().t()).argmax(-1)
    assert expected[0] == 7
    for block in (None, 1024, 777):
        out = token_losses(hidden, targets, Head(weight), want_top1=True, vocab_block=block)
        assert torch.equal(out.top1, expected), block
        assert torch.equal(out.nll, token_losses(hidden, targets, Head(weight), vocab_block=block).nll)
