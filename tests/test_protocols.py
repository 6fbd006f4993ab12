"""Protocols by name: each one's scored positions pinned on small hand-checked sequences, then the runs
against the float64 reference (llama-cpp, gptq, every-window BOS, lm-eval-wikitext, double BOS)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from lm_ce.config.fields import Config
from lm_ce.config.protocols import PROTOCOLS, WINDOW_FIELDS, wikitext_detokenized
from lm_ce.config.sources import build_config, config_for
from lm_ce.data import documents as data
from lm_ce.errors import UsageError
from lm_ce.reports import tables as report
from lm_ce.runner import evaluate
from lm_ce.scoring.setup import resolve_lengths
from lm_ce.scoring.windows import (
    Window,
    adds_bos,
    document_spans,
    gptq_spans,
    llama_cpp_spans,
    stream_spans,
    without_double_prefix,
)

from .reference import (
    document_windows,
    encode,
    gptq_windows,
    llama_cpp_windows,
    reference_nll,
    reference_tokens,
    stream_windows,
)

REL = 1e-5


def scored(spans) -> list[int]:
    """The indices j of S whose token is scored, in order."""
    return [j for _, a, b in spans for j in range(a + 1, b + 1)]


# --- scored positions, by hand ---------------------------------------------------------------------------------

def test_llama_cpp_scores_the_second_half_of_whole_chunks():
    # n_ctx 4: chunk positions 4/2+1 .. 3, i.e. only the last token of each chunk; S[8], S[9] are the remainder
    assert llama_cpp_spans(10, 4) == [(0, 2, 3), (4, 6, 7)]
    assert scored(llama_cpp_spans(10, 4)) == [3, 7]
    # n_ctx 6: chunk positions 4, 5 of chunks at 0 and 6; S[12] is the remainder
    assert scored(llama_cpp_spans(13, 6)) == [4, 5, 10, 11]
    assert scored(llama_cpp_spans(13, 6, chunks=1)) == [4, 5]
    assert llama_cpp_spans(5, 6) == []
    # the inputs of a chunk are its first n_ctx - 1 tokens (the last one's logits predict nothing scored)
    w = Window(0, torch.arange(10, 20), 4, 6, 7, 0, first_id=1)
    assert w.inputs().tolist() == [1, 15, 16]  # BOS in place of the chunk's first token S[4] = 14


def test_gptq_scores_every_token_of_whole_chunks_but_the_first():
    assert gptq_spans(10, 4) == [(0, 0, 3), (4, 4, 7)]
    assert scored(gptq_spans(10, 4)) == [1, 2, 3, 5, 6, 7]
    assert scored(gptq_spans(12, 4, chunks=2)) == [1, 2, 3, 5, 6, 7]
    assert gptq_spans(3, 4) == []


def test_lm_eval_and_hf_docs_positions():
    # lm-eval: S = [prefix] + 9 tokens, max_length 4: every token 1..9 once; the last window keeps 4 inputs
    assert document_spans(10, 1, 4, 4) == [(0, 0, 4), (4, 4, 8), (5, 8, 9)]
    assert scored(document_spans(10, 1, 4, 4)) == list(range(1, 10))
    # hf-docs: 10 tokens, max_length 4, stride 2: S[0] never scored, the first token of each window only as context
    assert stream_spans(10, 4, 2) == [(0, 0, 3), (2, 3, 5), (4, 5, 7), (6, 7, 9)]
    assert scored(stream_spans(10, 4, 2)) == list(range(1, 10))


def test_every_window_puts_the_prefix_in_place_of_the_oldest_context_token():
    seq = torch.tensor([1] + list(range(101, 110)))  # S[0] is the prefix 1
    spans = document_spans(10, 1, 4, 2)
    assert spans == [(0, 0, 4), (2, 4, 6), (4, 6, 8), (5, 8, 9)]
    inputs = [Window(0, seq, *s, 0, first_id=1).inputs().tolist() for s in spans]
    assert inputs == [[1, 101, 102, 103], [1, 103, 104, 105], [1, 105, 106, 107], [1, 106, 107, 108]]
    assert scored(spans) == list(range(1, 10))  # the scored set does not change
    assert Window(0, seq, 2, 4, 6, 0).inputs().tolist() == [102, 103, 104, 105]  # without: S[start:b]


def test_double_prefix_is_removed_once():
    assert without_double_prefix([5, 5, 7], 5) == ([5, 7], True)
    assert without_double_prefix([6, 7], 5) == ([6, 7], False)
    assert without_double_prefix([5, 7], None) == ([5, 7], False)


# --- the protocol table and its fields ----------------------------------------------------------------------------

def test_every_protocol_sets_every_window_field_and_flags_override():
    for name, p in PROTOCOLS.items():
        assert set(WINDOW_FIELDS) <= set(p.fields), name
        assert p.quote
        cfg = config_for(protocol=name)
        for key, value in {**p.fields, **p.data}.items():
            assert getattr(cfg, key) == value, (name, key)
    cfg = build_config(["--protocol", "llama-cpp", "--max-length", "256", "--chunks", "3"])
    assert (cfg.mode, cfg.max_length, cfg.chunks) == ("llama-cpp", 256, 3)
    assert build_config(["--protocol", "gptq"]).max_length == 2048
    assert build_config([]) == Config()  # the default protocol is today's document mode
    assert resolve_lengths(config_for(protocol="hf-docs", max_length=64), 128) == (64, 32)
    assert resolve_lengths(config_for(protocol="hf-docs", max_length=64, stride=48), 128) == (64, 48)
    assert resolve_lengths(config_for(max_length=64), 128) == (64, 64)
    manual = (Path(__file__).parent.parent / "docs" / "windows-and-protocols.md").read_text()
    for name, p in PROTOCOLS.items():  # the manual's protocol table says what to quote each one as
        assert f"| `{name}`" in manual and p.quote in manual, name


@pytest.mark.parametrize("args,needle", [
    (["--protocol", "llama"], "choose one of"),
    (["--protocol", "gptq", "--stride", "5"], "takes no --stride"),
    (["--protocol", "hf-docs", "--chunks", "2"], "--chunks counts"),
    (["--protocol", "llama-cpp", "--bos-policy", "every-window"], "--bos-policy applies"),
    (["--bos-policy", "none", "--prefix-token", "bos"], "contradict"),
    (["--bos-policy", "every-window", "--prefix-token", "none"], "needs --prefix-token"),
    (["--mode", "gptq", "--prompt-field", "q"], "--prompt-field needs --mode document"),
])
def test_conflicting_protocol_fields_are_refused(args, needle):
    with pytest.raises(UsageError, match=re.escape(needle)):
        build_config(args)


# --- the wikitext detokenizer ------------------------------------------------------------------------------------

PAGE = (" = Valkyrie Bridge = \n \n The bridge , built in 1 @,@ 204 days , is 3 @.@ 5 km long ( about 2 @-@ 3 miles ) . "
        "It 's the city 's pride ; critics call it \" grand \" . \n \n = = History = = \n \n = = = Early years = = = \n"
        " Temperatures reach 40 ° C ! Why ? Nobody knows : the N engineers ' notes are lost . \n")


def test_wikitext_detokenizer_by_hand():
    out = wikitext_detokenized(PAGE)
    assert "1,204 days" in out and "3.5 km" in out and "2-3 miles" in out
    assert "(about 2-3 miles)" in out and '"grand"' in out
    assert "It's the city's pride; critics" in out
    assert "== History ==" in out and "=== Early years ===" in out
    assert "40°C! Why? Nobody knows: the 1 engineers' notes" in out
    assert "\n\n" in out and " \n" not in out


def test_wikitext_detokenizer_equals_lm_eval():
    preprocess = pytest.importorskip("lm_eval.tasks.wikitext.preprocess_wikitext")
    for page in (PAGE, PAGE.replace("\n", " \n "), "a ' b ' c /' 5/ ( x ) [ y ] { z }", ""):
        assert wikitext_detokenized(page) == preprocess.wikitext_detokenizer({"page": page})


# --- data: a .txt file is read whole under llama-cpp --------------------------------------------------------------

def test_txt_read_whole_under_llama_cpp(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(b"line one\r\nline two\n\n")
    b.write_bytes("caf\u00e9\nend".encode())
    docs = list(data.iter_documents(config_for(protocol="llama-cpp", data_files=[str(a), str(b)])))
    assert [d.text for d in docs] == ["line one\r\nline two\n", "caf\u00e9\nend"]  # one trailing newline dropped
    assert len(list(data.iter_documents(config_for(data_files=[str(a)])))) > 1  # other modes: line by line


# --- runs against the float64 reference ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bos_tokenizer(llama_tokenizer_dir):
    """The llama-style tokenizer made to add BOS by default, as Llama's does."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    assert adds_bos(tok) and tok("a", add_special_tokens=False)["input_ids"][0] != tok.bos_token_id
    return tok


@pytest.fixture(scope="module")
def txt_files(tmp_path_factory, texts):
    d = tmp_path_factory.mktemp("txt")
    paths = []
    for i, text in enumerate(texts[8:11]):
        path = d / f"part{i}.txt"
        path.write_text(text + "\n", encoding="utf-8")
        paths.append(str(path))
    return paths


def run_with(model, tokenizer, **fields):
    return evaluate(config_for(model="tiny", progress=False, save_tokens=True, **fields), model=model, tokenizer=tokenizer)


@pytest.mark.parametrize("adds", [True, False])
@pytest.mark.parametrize("protocol,n_ctx,chunks", [("llama-cpp", 16, None), ("llama-cpp", 24, 5), ("gptq", 32, None)])
def test_chunk_protocols_match_reference(tiny_llama, llama_tokenizer, bos_tokenizer, txt_files, write_jsonl, texts,
                                         protocol, n_ctx, chunks, adds):
    tokenizer = bos_tokenizer if adds else llama_tokenizer
    # llama-cpp: each .txt file whole, its trailing newline dropped; gptq: dataset rows; both joined by "\n\n"
    files = txt_files if protocol == "llama-cpp" else [write_jsonl([{"text": t} for t in texts[8:11]])]
    res = run_with(tiny_llama, tokenizer, protocol=protocol, data_files=files, max_length=n_ctx, chunks=chunks,
                   batch_size=3)
    joined = "\n\n".join(texts[8:11])
    seq = ([tokenizer.bos_token_id] if adds else []) + encode(tokenizer, joined)
    if protocol == "llama-cpp":
        windows, first_id = llama_cpp_windows(len(seq), n_ctx, chunks), tokenizer.bos_token_id if adds else None
    else:
        windows, first_id = gptq_windows(len(seq), n_ctx), None
    nll, count = reference_nll(tiny_llama, seq, windows, first_id=first_id)
    assert res.summary["counts"]["tokens"] == count == len(windows) * (n_ctx // 2 - 1 if protocol == "llama-cpp" else n_ctx - 1)
    assert math.isclose(res.summary["nll_sum"], nll, rel_tol=REL)
    table = res.token_table
    assert table["token_id"] == [seq[j] for _, a, b in windows for j in range(a + 1, b + 1)]
    assert res.summary["settings"]["protocol"] == protocol
    if protocol == "llama-cpp":  # llama-perplexity's error: ppl * sqrt((E[nll^2] - E[nll]^2) / (N - 1))
        rows = reference_tokens(tiny_llama, seq, windows, first_id=first_id)
        mean = sum(r["nll"] for r in rows) / count
        var = sum(r["nll"] ** 2 for r in rows) / count - mean * mean
        expected = math.exp(mean) * math.sqrt(var / (count - 1))
        assert math.isclose(res.summary["uncertainty"]["llama_cpp_perplexity_error"], expected, rel_tol=1e-4)
        printed = re.search(r"PPL = ([\d.]+) \+/- ([\d.]+)", report.table(res.summary))  # as llama-perplexity prints it
        assert math.isclose(float(printed[1]), math.exp(mean), rel_tol=1e-6)
        assert math.isclose(float(printed[2]), expected, rel_tol=1e-4)


@pytest.mark.parametrize("mode,max_length,stride", [("document", 16, 16), ("document", 16, 8), ("stream", 16, 8)])
def test_every_window_bos_matches_reference(tiny_llama, llama_tokenizer, write_jsonl, texts, mode, max_length, stride):
    docs = [t for t in texts if t][3:11]
    path = write_jsonl([{"text": t} for t in docs])
    res = run_with(tiny_llama, llama_tokenizer, mode=mode, data_files=[path], max_length=max_length, stride=stride,
                   bos_policy="every-window", batch_size=4)
    bos = llama_tokenizer.bos_token_id
    assert res.summary["settings"]["window_first_token_id"] == bos
    nll, count = 0.0, 0
    if mode == "document":
        for text in docs:
            seq = [bos] + encode(llama_tokenizer, text)
            n, c = reference_nll(tiny_llama, seq, document_windows(len(seq), 1, max_length, stride), first_id=bos)
            nll, count = nll + n, count + c
        plain = run_with(tiny_llama, llama_tokenizer, mode=mode, data_files=[path], max_length=max_length, stride=stride)
        assert plain.summary["counts"]["tokens"] == count  # the same scored tokens as --bos-policy first
        assert plain.summary["counts"]["input_tokens"] == res.summary["counts"]["input_tokens"]  # max_length inputs kept
    else:
        seq = encode(llama_tokenizer, "\n\n".join(docs))
        nll, count = reference_nll(tiny_llama, seq, stream_windows(len(seq), max_length, stride), first_id=bos)
    assert res.summary["counts"]["tokens"] == count
    assert math.isclose(res.summary["nll_sum"], nll, rel_tol=REL)


def test_double_bos_is_removed_and_counted(tiny_llama, llama_tokenizer, write_jsonl, caplog):
    texts = ["<s>Hello world. The quick brown fox.", "Hello world. The quick brown fox.", "<s>Is it raining?"]
    res = run_with(tiny_llama, llama_tokenizer, data_files=[write_jsonl([{"text": t} for t in texts])], max_length=16)
    by_index = {d.index: d for d in res.documents}
    assert by_index[0].tokens == by_index[1].tokens and by_index[0].nll_sum == pytest.approx(by_index[1].nll_sum, rel=1e-6)
    assert res.summary["counts"]["double_prefix_removed"] == 2
    assert sum("duplicate is removed" in r.message for r in caplog.records) == 1


def test_lm_eval_wikitext_scores_the_detokenized_page_and_counts_the_stored_one(tiny_llama, llama_tokenizer, write_jsonl):
    pages = [PAGE, PAGE.replace("Valkyrie", "Orchid") * 2]
    res = run_with(tiny_llama, llama_tokenizer, protocol="lm-eval-wikitext", data_files=[write_jsonl([{"page": p} for p in pages])],
                   max_length=32)
    assert res.summary["settings"]["headline"] == "word_perplexity"
    bos = llama_tokenizer.bos_token_id
    nll, count = 0.0, 0
    for page in pages:
        seq = [bos] + encode(llama_tokenizer, wikitext_detokenized(page))
        n, c = reference_nll(tiny_llama, seq, document_windows(len(seq), 1, 32, 32))
        nll, count = nll + n, count + c
    assert res.summary["counts"]["tokens"] == count
    assert math.isclose(res.summary["nll_sum"], nll, rel_tol=REL)
    words = sum(len(re.split(r"\s+", p)) for p in pages)
    assert res.summary["counts"]["words"] == words
    assert res.summary["counts"]["bytes"] == sum(len(p.encode()) for p in pages)
    assert math.isclose(res.summary["metrics"]["word_perplexity"], math.exp(nll / words), rel_tol=REL)
    assert "headline (lm-eval-wikitext: word_perplexity)" in report.table(res.summary).splitlines()[1]
    import lm_ce  # the Python API: pages given in memory, the protocol's text field

    same = lm_ce.evaluate(tiny_llama, llama_tokenizer, pages, protocol="lm-eval-wikitext", max_length=32, progress=False)
    assert (same.summary["nll_sum"], same.summary["counts"]) == (res.summary["nll_sum"], res.summary["counts"])


def test_lm_eval_wikitext_equals_lm_eval_itself(tiny_llama_dir, write_jsonl):
    """lm-eval's own pieces: its wikitext detokenizer and process_results, HFLM.loglikelihood_rolling, and the
    weighted perplexity its word_perplexity aggregates to."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks.wikitext import preprocess_wikitext as task

    pages = [PAGE, PAGE.replace("Valkyrie", "Orchid") * 3, " = Short = \n A page ( with a note ) . \n"]
    lm = HFLM(pretrained=tiny_llama_dir, backend="causal", max_length=32, batch_size=2, device="cpu", dtype="float32")
    requests = [Instance(request_type="loglikelihood_rolling", doc={"page": p},
                         arguments=(task.wikitext_detokenizer({"page": p}),), idx=i) for i, p in enumerate(pages)]
    loglikelihoods = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    scored = [task.process_results({"page": p}, [ll])["word_perplexity"] for p, ll in zip(pages, loglikelihoods)]
    expected = math.exp(-sum(ll for ll, _ in scored) / sum(words for _, words in scored))
    res = evaluate(config_for(protocol="lm-eval-wikitext", model=tiny_llama_dir, progress=False, max_length=32,
                              data_files=[write_jsonl([{"page": p} for p in pages])]))
    assert res.summary["counts"]["words"] == sum(words for _, words in scored)
    assert math.isclose(res.summary["metrics"]["word_perplexity"], expected, rel_tol=1e-5)
