"""Byte attribution (scoring/bytespans.py) and the byte-level comparison of models with different tokenizers
(sums/bytegap.py, reports/bytecompare.py, `lm-ce compare`): spans against tests/bytes_reference.py on byte-level BPE,
SentencePiece-style byte fallback, a dummy prefix and a normalizer; tokens.parquet's spans in every mode; each
document's byte losses summing to its NLL, document gaps equal to the runs' bits-per-byte differences, and the byte
classes adding up to the gap, on text whose multi-byte characters split across tokens."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from lm_ce.cli import main as cli
from lm_ce.config.fields import Config
from lm_ce.reports import bytecompare
from lm_ce.reports import files as report
from lm_ce.runner import evaluate
from lm_ce.scoring.bytespans import EXACT, OFFSETS, SpanMaker, partition
from lm_ce.sums import bytegap

from . import bytes_reference as ref
from .conftest import SMALL, _training_corpus, make_jsonl, tiny_model_dir

MULTIBYTE = ["Ünïcödé: naïve café — “quotes” and ‘apostrophes’… 1–2 ±3 °C",
             "日本語のテキストです。中文文本。한국어 텍스트.",
             "Emoji: 😀 👩‍👩‍👧‍👦 🇫🇷 👍🏽 and rare 𓀀𓀁 hieroglyphs, math 𝔸𝔹 ∑∫.",
             "Visit https://example.org/path_(x)?a=1&b=2. Or www.test.com/a, or (http://x.y/z).",
             "Lines\nwith\n\n\nnewlines\r\nCRLF\tand tabs\t\tend  ",
             "\nStarts with a newline and ends with spaces   ",
             "1 starts with a digit; ﬁ ligature; ① circled; Ｈｅｌｌｏ full width; x² e\u0301 (combining)",
             "Plain ASCII text, with digits 12345 and 3.14159, and  two  double spaces."]


def sentencepiece_tokenizer(dummy_prefix: bool = False):
    """A SentencePiece-style BPE (▁ for a space, <0xHH> byte fallback, as Gemma's and Llama-2's), trained on the
    inline corpus; with dummy_prefix a ▁ is put before every text (Llama-2)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.train_from_iterator(_training_corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                                                    show_progress=False))
    spec = json.loads(tok.to_str())
    for b in range(256):
        spec["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(spec["model"]["vocab"]))
    tok = Tokenizer.from_str(json.dumps(spec))
    if dummy_prefix:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tokenizers(llama_tokenizer):
    """Byte-level BPE, SentencePiece-style with byte fallback, the same with a dummy prefix, and byte-level BPE behind
    an NFKC normalizer (the offsets path: ﬁ, ①, full-width letters change)."""
    from tokenizers import Tokenizer, normalizers
    from transformers import PreTrainedTokenizerFast

    nfkc = Tokenizer.from_str(llama_tokenizer.backend_tokenizer.to_str())
    nfkc.normalizer = normalizers.NFKC()
    return {"byte_level": llama_tokenizer, "sentencepiece": sentencepiece_tokenizer(),
            "dummy_prefix": sentencepiece_tokenizer(dummy_prefix=True),
            "nfkc": PreTrainedTokenizerFast(tokenizer_object=nfkc, bos_token="<s>", eos_token="</s>")}


@pytest.mark.parametrize("name", ["byte_level", "sentencepiece", "dummy_prefix", "nfkc"])
def test_spans_match_the_reference_and_partition_the_bytes(tokenizers, name, texts):
    """Every token's group span as the reference finds it; the groups cover every byte once; spreading random losses
    over them keeps each text's sum; characters split across tokens are handled (groups starting inside one)."""
    tok = tokenizers[name]
    maker = SpanMaker(tok)
    methods, split = set(), 0
    rng = np.random.default_rng(0)
    for text in [t for t in MULTIBYTE + texts if t]:
        ((ids, spans),) = maker.encode([text])
        want_ids, want, method = ref.token_byte_spans(tok, text)
        assert ids == want_ids
        assert [tuple(s) for s in spans.spans.tolist()] == want, (name, text)
        assert spans.method == (EXACT if method == "exact" else OFFSETS)
        methods.add(method)
        raw = text.encode("utf-8")
        assert ref.coverage(want, len(raw)) == (len(raw), 0)
        split += sum(1 for s, _ in set(want) if 0 < s < len(raw) and raw[s] & 0xC0 == 0x80)
        nll = rng.exponential(2.0, len(ids))
        mine = bytegap.byte_losses(len(raw), spans.spans[:, 0].numpy(), spans.spans[:, 1].numpy(), nll)
        np.testing.assert_allclose(mine, ref.per_byte_loss(len(raw), want, nll), rtol=1e-12, atol=1e-15)
        assert math.isclose(math.fsum(mine), math.fsum(nll), rel_tol=1e-12)
    assert methods == ({"exact", "offsets"} if name == "nfkc" else {"exact"})  # a dummy prefix: its space dropped
    if name in ("byte_level", "sentencepiece"):
        assert split > 10  # multi-byte characters cut into several tokens, each with its own bytes


def test_partition_groups_overlaps_empties_and_gaps():
    assert partition([(0, 2), (1, 3), (3, 4)]) == [(0, 3), (0, 3), (3, 4)]
    assert partition([None, (0, 2), (2, 2), (2, 5)]) == [(0, 2), (0, 2), (2, 5), (2, 5)]  # empty: the next group
    assert partition([(0, 2), None]) == [(0, 2), (0, 2)]  # at the end: the last group
    assert partition([(1, 2), (4, 6)], 8) == [(0, 4), (4, 8)]  # uncovered bytes: the group before (first: before)
    assert partition([(0, 3), (5, 6), (2, 6)]) == [(0, 6)] * 3  # reaching back merges groups
    assert partition([None, None]) == [(0, 0), (0, 0)]


@pytest.mark.parametrize("text,classes", [
    ("a1 .\n\té€", ["letters", "digits", "whitespace", "punctuation", "newline", "whitespace", "non_ascii", "non_ascii"]),
    ("see https://x.org/a_(b)). ok", None),
])
def test_byte_classes_match_the_reference(text, classes):
    user = [("quotes", "[\"“”]"), ("paren", r"\(b\)")]
    names, mine = bytegap.byte_classes(text, [(n, re.compile(p)) for n, p in user])
    want_names, want = ref.byte_classes(text, user)
    assert names == want_names and mine.tolist() == want.tolist()
    if classes:
        plain, per_char = bytegap.char_classes(text)
        assert [plain[k] for k in per_char] == classes


@pytest.fixture(scope="module")
def sp_model_dir(tmp_path_factory):
    """A tiny llama with the SentencePiece-style tokenizer: another tokenizer than the fixtures' byte-level one."""
    tok = sentencepiece_tokenizer()

    def init(model):
        model.lm_head.weight.normal_(0.0, 0.5)

    return tiny_model_dir(tmp_path_factory.mktemp("tiny_sp"), "LlamaForCausalLM", tok, seed=5, init=init,
                          num_key_value_heads=2, tie_word_embeddings=False, **SMALL)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, texts):
    rows = [{"text": t, "id": f"t{i}", "group": "multi" if i < len(MULTIBYTE) else "plain"}
            for i, t in enumerate(MULTIBYTE + [t for t in texts if t.strip()][:8])]
    rows[-1]["group"] = None  # the group (null): the groups' contributions still add up to the gap
    rows.append({"text": "", "id": "empty", "group": "plain"})
    return make_jsonl(tmp_path_factory.mktemp("bytes") / "docs.jsonl", rows)


def run(model: str, data: str, out, **fields) -> str:
    cfg = Config(**{"model": model, "data_files": [data], "id_field": "id", "group_field": "group", "max_length": 48,
                    "batch_size": 4, "progress": False, "plot": False, "output_dir": str(out), "save_tokens": True,
                    **fields})
    report.write(evaluate(cfg), str(out), plot=False)
    return str(out)


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, sp_model_dir, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("byte_runs")
    return {"a": run(tiny_llama_dir, corpus, root / "a"), "b": run(sp_model_dir, corpus, root / "b")}


def rows_of(directory: str) -> pd.DataFrame:
    frame = pd.read_json(f"{directory}/documents.jsonl", lines=True)
    return frame[frame["skipped"].isna()].set_index("index")


def test_every_document_s_byte_losses_sum_to_its_nll(runs, corpus):
    """tokens.parquet's spans in the scored text: spread over the bytes, each document's losses give its NLL."""
    texts = {i: json.loads(line)["text"] for i, line in enumerate(open(corpus, encoding="utf-8"))}
    for directory in runs.values():
        tokens = pd.read_parquet(f"{directory}/tokens.parquet")
        assert {"byte_start", "byte_end", "owner", "seq_index"} <= set(tokens.columns)
        for index, row in rows_of(directory).iterrows():
            part = tokens[tokens["doc"] == index]
            n = len(texts[index].encode("utf-8"))
            losses = bytegap.byte_losses(n, part["byte_start"].to_numpy(), part["byte_end"].to_numpy(),
                                         part["nll"].to_numpy().astype(np.float64))
            assert math.isclose(math.fsum(losses), row["nll_sum"], rel_tol=1e-9)
            assert (part["owner"] == index).all()
            covered = sorted(set(zip(part["byte_start"], part["byte_end"])))  # every byte scored once (a prefix token)
            assert covered[0][0] == 0 and covered[-1][1] == n
            assert all(x[1] == y[0] for x, y in zip(covered, covered[1:]))


def test_byte_comparison_adds_up(runs, tmp_path):
    """The gap is B's bits per byte minus A's; each document's gap is the difference of the runs' figures for it;
    the classes' contributions, and each document's, add up to the gap; the files are written."""
    out = tmp_path / "cmp"
    assert cli.main(["compare", runs["a"], runs["b"], "--output-dir", str(out), "--byte-class", "quotes=[\"“”‘’]"]) == 0
    c = json.loads((out / "comparison.json").read_text())
    a, b = (json.loads(open(f"{runs[k]}/results.json").read()) for k in ("a", "b"))
    block = c["bytes"]
    assert not c["same_tokens"]
    assert math.isclose(block["gap_bits_per_byte"], b["metrics"]["bits_per_byte"] - a["metrics"]["bits_per_byte"],
                        rel_tol=1e-12, abs_tol=1e-15)
    assert abs(math.fsum(block["classes"].values()) - block["gap_bits_per_byte"]) < 1e-12
    assert list(block["classes"])[0] == "quotes" and block["class_bytes"]["quotes"] > 0
    assert sum(block["class_bytes"].values()) == block["bytes"] == a["counts"]["bytes"]
    assert block["byte_sum_relative_error"] < 1e-9
    docs = pd.read_json(out / "documents.jsonl", lines=True).set_index("index")
    ra, rb = rows_of(runs["a"]), rows_of(runs["b"])
    want = (rb["nll_sum"] - ra["nll_sum"]) / (ra["bytes"] * math.log(2))
    np.testing.assert_allclose(docs["bits_per_byte_gap"], want.loc[docs.index], rtol=1e-12)
    gaps = docs[[f"gap_{k}" for k in block["classes"]]].sum(axis=1)
    np.testing.assert_allclose(gaps, docs["bits_per_byte_gap"], rtol=1e-9, atol=1e-12)
    assert math.isclose(sum(g["contribution"] for g in block["groups"].values()), block["gap_bits_per_byte"], rel_tol=1e-9)
    assert block["groups"]["(null)"]["documents"] == 1
    spans = block["aligned_spans_top"]
    assert spans and all(s["tokens_a"].startswith("|") and s["tokens_b"].endswith("|") for s in spans)
    page = (out / "comparison.html").read_text(encoding="utf-8")
    assert 'id="heatmap"' in page and page.count("<article") == 10 and "title=\"A " in page
    assert "Byte by byte" in (out / "comparison.md").read_text(encoding="utf-8")


def test_class_contributions_against_the_reference(runs, corpus):
    """The classes' contributions as the reference decomposes the same per-byte losses."""
    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    comparison, _ = bytecompare.compare(runs["a"], runs["b"])
    tokens = {k: pd.read_parquet(f"{runs[k]}/tokens.parquet") for k in runs}
    classes, losses = [], {"a": [], "b": []}
    for i in rows_of(runs["a"]).index:
        names, cls = ref.byte_classes(texts[i])
        classes.append(cls)
        n = len(texts[i].encode("utf-8"))
        for k in runs:
            t = tokens[k][tokens[k]["doc"] == i]
            spans = list(zip(t["byte_start"].tolist(), t["byte_end"].tolist()))
            losses[k].append(ref.per_byte_loss(n, spans, t["nll"].to_numpy().astype(np.float64)))
    want = ref.class_decomposition(classes, losses["a"], losses["b"], names, comparison["bytes"]["bytes"])
    for name in names:
        assert math.isclose(comparison["bytes"]["classes"][name], want["classes"][name], rel_tol=1e-9, abs_tol=1e-14)


def test_byte_comparison_needs_saved_spans_and_documents(runs, tiny_llama_dir, corpus, tmp_path):
    plain = run(tiny_llama_dir, corpus, tmp_path / "plain", save_tokens=False)
    c, extra = bytecompare.compare(plain, runs["b"])
    assert extra is None and "bytes" not in c and any("--save-tokens" in n for n in c["notes"])
    with pytest.raises(Exception, match="NAME=REGEX"):
        bytecompare.compare(runs["a"], runs["b"], ["quotes"])
    with pytest.raises(Exception, match="taken"):
        bytecompare.compare(runs["a"], runs["b"], ["digits=[0-9]"])


@pytest.mark.parametrize("mode,separator", [("stream", "\n\n"), ("stream", " "), ("gptq", "\n\n"), ("llama-cpp", "\n\n")])
def test_joined_passes_keep_spans_and_owners(tiny_llama_dir, corpus, tmp_path, mode, separator):
    """A joined pass's tokens: each target's span in the joined text (S[seq_index] is the token) and the document
    owning its first byte (with a space as separator, tokens such as " The" straddle two documents); the owners'
    NLL adds up to the run's."""
    fields = {"mode": mode, "max_length": 16 if mode != "stream" else 48, "separator": separator}
    if mode == "stream":
        fields["stride"] = 24
    directory = run(tiny_llama_dir, corpus, tmp_path / mode, **fields)
    tokens = pd.read_parquet(f"{directory}/tokens.parquet")
    summary = json.loads(open(f"{directory}/results.json").read())
    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    joined = separator.join(texts).encode("utf-8")
    owner = ref.joined_owner(texts, separator)
    assert (tokens["owner"].to_numpy() == owner[tokens["byte_start"].to_numpy()]).all()
    straddling = owner[tokens["byte_start"].to_numpy()] != owner[tokens["byte_end"].to_numpy() - 1]
    assert straddling.any() == (separator == " ")
    assert math.isclose(tokens.groupby("owner")["nll"].sum().sum(), summary["nll_sum"], rel_tol=1e-6)
    assert (tokens["byte_end"] <= len(joined)).all() and (tokens["byte_start"] < tokens["byte_end"]).all()
    assert tokens["seq_index"].is_monotonic_increasing and tokens["seq_index"].min() >= 1


def test_compare_to_another_tokenizer_adds_the_byte_block(tiny_llama_dir, sp_model_dir, corpus, runs, tmp_path):
    """--compare-to a model of another tokenizer, with --save-tokens: compare.<name>.bytes as lm-ce compare gives it
    for the two runs, and its heatmap in results.html."""
    out = tmp_path / "with"
    cfg = Config(model=tiny_llama_dir, data_files=[corpus], id_field="id", group_field="group", max_length=48,
                 batch_size=4, progress=False, plot=False, output_dir=str(out), save_tokens=True,
                 compare_to=[sp_model_dir], byte_classes=["quotes=[\"“”‘’]"])
    results = evaluate(cfg)
    report.write(results, str(out), plot=False)
    block = results.summary["compare"][sp_model_dir]["bytes"]
    want, _ = bytecompare.compare(runs["a"], runs["b"], ["quotes=[\"“”‘’]"])
    assert math.isclose(block["gap_bits_per_byte"], want["bytes"]["gap_bits_per_byte"], rel_tol=1e-9)
    for name, value in want["bytes"]["classes"].items():
        assert math.isclose(block["classes"][name], value, rel_tol=1e-9, abs_tol=1e-14)
    assert abs(math.fsum(block["classes"].values()) - block["gap_bits_per_byte"]) < 1e-12
    page = (out / "results.html").read_text(encoding="utf-8")
    assert "Byte by byte" in page and 'class="h' in page
    assert "Byte by byte" in (out / "results.md").read_text(encoding="utf-8")
    plain = evaluate(Config(model=tiny_llama_dir, data_files=[corpus], max_length=48, progress=False,
                            compare_to=[sp_model_dir]))
    assert "--save-tokens" in plain.summary["compare"][sp_model_dir]["bytes"]["note"]


def test_spans_of_a_prompted_document_are_in_its_text(tiny_llama_dir, write_jsonl, tmp_path):
    """--prompt-field: the targets' spans are in the continuation (its bytes, as counted), and cover it; the prompt's
    trailing whitespace, moved to the continuation when encoding, is no byte of it."""
    rows = [{"prompt": "Question: what is 2+2? ", "text": "Answer: 4 😀 done."},
            {"prompt": "Über café\n", "text": "naïve 交叉熵 end"}]
    directory = run(tiny_llama_dir, write_jsonl(rows), tmp_path / "p", prompt_field="prompt", id_field=None,
                    group_field=None)
    tokens = pd.read_parquet(f"{directory}/tokens.parquet")
    for index, row in rows_of(directory).iterrows():
        part = tokens[tokens["doc"] == index]
        n = len(rows[index]["text"].encode("utf-8"))
        assert part["byte_start"].min() == 0 and part["byte_end"].max() == n == row["bytes"]
        losses = bytegap.byte_losses(n, part["byte_start"].to_numpy(), part["byte_end"].to_numpy(),
                                     part["nll"].to_numpy().astype(np.float64))
        assert math.isclose(math.fsum(losses), row["nll_sum"], rel_tol=1e-9)
