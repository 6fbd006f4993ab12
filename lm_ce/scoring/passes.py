"""The passes over the data: documents one by one (document mode), one joined stream (stream mode), or
one joined text cut into chunks (llama-cpp and gptq modes).

Document mode reads the data in chunks; each process tokenizes its share of the next chunk in a
background thread while the current chunk is scored.
"""
from __future__ import annotations

import ctypes
import logging
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from lm_ce.config.protocols import detokenized
from lm_ce.data import documents as data
from lm_ce.errors import UsageError
from lm_ce.scoring.bytespans import SpanMaker, joined_bytes, text_bytes
from lm_ce.scoring.parallel import Plan, gather, score_windows
from lm_ce.scoring.windows import (
    Window,
    adds_bos,
    document_sequence,
    document_spans,
    gptq_spans,
    llama_cpp_spans,
    stream_spans,
    windows_of,
    without_double_prefix,
)
from lm_ce.sums.records import DocumentResult, RowSums, Run
from lm_ce.sums.signals import add_to_rows

log = logging.getLogger("lm_ce")

try:  # glibc's malloc, free and malloc_trim (give_back_freed_memory, keep_freed_blocks); absent elsewhere
    _LIBC = ctypes.CDLL("libc.so.6")  # this module's own handle: the types set below are not seen by other users
    _LIBC.malloc_trim  # noqa: B018
    _LIBC.malloc.restype, _LIBC.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    _LIBC.free.argtypes = [ctypes.c_void_p]
except (OSError, AttributeError):
    _LIBC = None
DYNAMIC_MMAP_MAX = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the most its own threshold rises to

COSTLY = 8  # input tokens read per token scored from which the cost is said before scoring (a small --stride)


@dataclass
class TokenSequence:
    """One document's token sequence S and where its targets start."""

    ids: list[int]
    first_target: int
    doubled: bool = False  # the text's own leading prefix token was removed
    bytes: torch.Tensor | None = None  # each token's byte span and owner (bytespans.sequence_bytes), for tokens.parquet


TOKENIZE_BATCH = 64  # documents per tokenizer call in the background tokenization


def run_documents(plan: Plan, run: Run, tokenizer) -> bool:
    """Chunks of documents: tokenize the next chunk while this one is scored. True when stopped early."""
    rank, world = plan.accelerator.process_index, plan.accelerator.num_processes
    mine = document_chunks(plan, run.chunks_done)
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for docs in mine:
            future = pool.submit(tokenize_share, docs, tokenizer, plan.setup.prefix, rank, world, plan.cfg.detokenizer,
                                 plan.byte_spans)
            if pending is not None and _score_chunk(*pending, plan, run):
                return True
            pending = (docs, future)
        if pending is not None and _score_chunk(*pending, plan, run):
            return True
    return False


def document_chunks(plan: Plan, done: int):
    """The chunks of documents this run scores (a shard's own), from its `done`-th on: a resumed run starts at its
    first unfinished chunk, and the documents before it are skipped, not read."""
    first = plan.shard.chunk(done) if plan.shard else done
    source = data.iter_documents(plan.cfg, plan.rows, start=first * plan.cfg.chunk_documents, read=plan.read)
    return (docs for c, docs in enumerate(chunks(source, plan.cfg.chunk_documents), start=first)
            if not plan.shard or plan.shard.owns(c))


def run_stream(plan: Plan, run: Run, tokenizer) -> bool:
    """One token stream of all documents joined by the separator, windows every `stride` tokens."""
    docs = list(data.iter_documents(plan.cfg, plan.rows, read=plan.read))
    refuse_blank(docs, plan.cfg.text_field)
    texts = [d.text for d in docs if d.text is not None]  # empty rows still add a separator, as in the recipe
    run.stream_bytes = len(plan.cfg.separator.join(texts).encode("utf-8"))
    seq, doubled = stream_sequence(plan, tokenizer, texts)
    _say_doubled(run, int(doubled))
    spans = stream_spans(len(seq), plan.setup.max_length, plan.setup.stride)
    windows = windows_of(-1, seq, spans, plan.setup.window_first, _joined_bytes(plan, seq, docs))
    say_cost(windows, plan)
    stopped = score_windows(windows, plan, run, {-1: DocumentResult(index=-1)})
    _joined_documents(docs, run, plan, stopped)
    plan.chunk_added()
    return stopped


def stream_sequence(plan: Plan, tokenizer, texts: list[str]) -> tuple[list[int], bool]:
    """(S, doubled) of stream mode: the prefix (if any) and the texts joined by the separator, tokenized once."""
    joined = plan.cfg.separator.join(detokenized(plan.cfg.detokenizer, t) for t in texts)
    ids, doubled = without_double_prefix(tokenizer(joined, add_special_tokens=False)["input_ids"] if joined else [],
                                         plan.setup.prefix)
    return ([plan.setup.prefix] if plan.setup.prefix is not None else []) + ids, doubled


def run_chunks(plan: Plan, run: Run, tokenizer) -> bool:
    """llama-cpp and gptq modes: the documents joined by the separator, tokenized once, cut into chunks of
    max_length tokens (the remainder dropped, at most --chunks of them)."""
    cfg, n_ctx = plan.cfg, plan.setup.max_length
    docs = list(data.iter_documents(cfg, plan.rows, read=plan.read))
    refuse_blank(docs, cfg.text_field)
    joined = cfg.separator.join(detokenized(cfg.detokenizer, d.text) for d in docs if d.text is not None)
    seq, doubled = chunk_sequence(cfg.mode, tokenizer, joined)
    _say_doubled(run, int(doubled))
    if cfg.mode == "llama-cpp" and len(seq) < 2 * n_ctx:  # llama-perplexity refuses these too
        raise UsageError(f"--mode llama-cpp: the text tokenizes to {len(seq)} tokens; llama-perplexity needs at least "
                         f"2 x max_length = {2 * n_ctx}; give more text or a smaller --max-length")
    spans = (llama_cpp_spans if cfg.mode == "llama-cpp" else gptq_spans)(len(seq), n_ctx, cfg.chunks)
    if not spans:
        raise UsageError(f"--mode gptq: the text tokenizes to {len(seq)} tokens, less than one chunk of {n_ctx}; give "
                         "more text or a smaller --max-length")
    windows = windows_of(-1, seq, spans, plan.setup.window_first, _joined_bytes(plan, seq, docs))
    if not any(w.n_scored for w in windows):  # e.g. --mode llama-cpp --max-length 2
        why = "a chunk scores the second half of its targets only" if cfg.mode == "llama-cpp" else "a chunk has no target"
        raise UsageError(f"--mode {cfg.mode} --max-length {n_ctx}: chunks of {n_ctx} tokens score nothing ({why}); use "
                         "--max-length 3 or more (llama.cpp's and GPTQ's own runs use 512 and 2048)")
    scored = [tokenizer.decode(w.seq[w.a + 1 : w.b + 1]) for w in windows]  # what the figures per byte/word cover
    run.stream_bytes = sum(len(t.encode("utf-8")) for t in scored)
    run.stream_words = sum(count_words(t) for t in scored)
    stopped = score_windows(windows, plan, run, {-1: DocumentResult(index=-1)})
    _joined_documents(docs, run, plan, stopped)
    plan.chunk_added()
    return stopped


def chunk_sequence(mode: str, tokenizer, text: str) -> tuple[list[int], bool]:
    """(ids, doubled) of the joined text, tokenized once: llama-cpp puts BOS in front only when the tokenizer adds
    BOS (and nothing else); gptq takes the tokenizer's default special tokens as they are. A second BOS that
    the text itself began with is removed."""
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    if mode == "llama-cpp":
        ids, doubled = without_double_prefix(tokenizer(text, add_special_tokens=False)["input_ids"] if text else [], bos)
        return ([bos] if bos is not None else []) + ids, doubled
    ids = tokenizer(text)["input_ids"]
    if bos is not None and ids[:2] == [bos, bos]:
        return ids[1:], True
    return ids, False


def _joined_bytes(plan: Plan, seq: list[int], docs: list[data.Document]) -> torch.Tensor | None:
    """Each token's byte span in the joined text and the document owning it (--save-tokens), else None."""
    if plan.byte_spans is None:
        return None
    parts = [(d.index, detokenized(plan.cfg.detokenizer, d.text)) for d in docs if d.text is not None]
    return joined_bytes(plan.byte_spans, seq, parts, plan.cfg.separator)


def refuse_blank(docs: list[data.Document], text_field: str) -> None:
    """A joined pass of rows that are all empty or whitespace would score only separators and whitespace: refused."""
    if any(data.has_text(d) for d in docs) or all(d.text is None for d in docs):  # the summary names the latter
        return
    raise UsageError(f"nothing to score: the {len(docs):,} rows of field '{text_field}' are empty or whitespace only; "
                     "check --text-field")


def _joined_documents(docs: list[data.Document], run: Run, plan: Plan, stopped: bool) -> None:
    """The rows of a joined pass, for counts (documents, skipped, words); finished: its tokens written out. An empty
    or whitespace-only row is part of the joined text, as in the recipe, but counted as a skipped (empty) document
    with no words."""
    run.rows = RowSums()
    for d in docs:
        r = _document_result(d)
        r.skipped = "not_text" if d.text is None else None if data.has_text(d) else "empty"
        r.words = count_words(d.text) if r.skipped is None else 0
        run.rows.add(r)
    if not stopped:
        plan.outputs.add_chunk(run, [])


def _say_doubled(run: Run, n: int) -> None:
    """Count texts whose own leading prefix token was removed; say so once per run."""
    if n and not run.doubled_prefix:
        log.warning("a text began with the prefix token itself (BOS/EOS in the text, e.g. chat-templated data, or "
                    "added by the tokenizer): the duplicate is removed; counts.double_prefix_removed says how often")
    run.doubled_prefix += n


def tokenize_share(docs: list[data.Document], tokenizer, prefix: int | None, rank: int, world: int,
                   detokenizer: str = "none", byte_spans: SpanMaker | None = None) -> dict[int, TokenSequence]:
    """{document index: TokenSequence} for this process's share (every world-th) of a chunk; each S an int64 tensor
    (8 bytes a token, where a list of Python ints takes about 36: a chunk's memory is its tokens). With
    `byte_spans`, each token's byte span in its scored text too (one tokenizer call that also gives offsets)."""
    mine = [d for i, d in enumerate(docs) if i % world == rank and data.has_text(d)]
    plain = [d for d in mine if d.prompt is None]
    out = {}
    head = [prefix] if prefix is not None else []
    for part in range(0, len(plain), TOKENIZE_BATCH):  # the tokenizer's own output never holds the whole chunk
        batch = plain[part : part + TOKENIZE_BATCH]
        texts = [detokenized(detokenizer, d.text) for d in batch]
        if byte_spans is not None and byte_spans.usable:
            encoded, spans = zip(*byte_spans.encode(texts))
        else:
            encoded, spans = tokenizer(texts, add_special_tokens=False)["input_ids"], [None] * len(batch)
        for d, ids, text_spans in zip(batch, encoded, spans):
            ids, doubled = without_double_prefix(ids, prefix)
            seq = torch.tensor(head + ids, dtype=torch.long)
            where = text_bytes(byte_spans, len(seq), 0 if doubled else len(head), text_spans, d.index)
            out[d.index] = TokenSequence(seq, len(head), doubled, where)
    for d in mine:
        if d.prompt is not None:
            text = detokenized(detokenizer, d.text)
            seq, first = document_sequence(tokenizer, text, prefix, d.prompt)
            where = text_bytes(byte_spans, len(seq), first, None, d.index, prompted=(d.prompt, text))
            out[d.index] = TokenSequence(torch.tensor(seq, dtype=torch.long), first, bytes=where)
    return out


def _score_chunk(docs: list[data.Document], future: Future, plan: Plan, run: Run) -> bool:
    """Score one chunk of documents and add it to the run. True when stopped inside it."""
    sequences = {k: v for part in gather(future.result(), plan) for k, v in part.items()}
    keys = None
    if plan.evaluator is not None:  # before the chunk is scored: a stop inside leaves the run at the chunk's start
        keys = plan.evaluator.key_tokens(sequences, {d.index: d.text for d in docs if d.index in sequences}, plan)
        if keys is None:
            return True
    results = {d.index: _document_result(d) for d in docs}
    windows = []
    for d in docs:
        r = results[d.index]
        if d.text is None:
            r.skipped = "not_text"
            continue
        if not data.has_text(d):  # "" or whitespace only: nothing to score, not even its tokens
            r.skipped = "empty"
            continue
        sequence = sequences.get(d.index, TokenSequence([], 0))
        spans = document_spans(len(sequence.ids), sequence.first_target, plan.setup.max_length, plan.setup.stride)
        if not spans:
            r.skipped = "empty"
            continue
        r.bytes, r.words, r.windows = len(d.text.encode("utf-8")), count_words(d.text), len(spans)
        windows += windows_of(d.index, sequence.ids, spans, plan.setup.window_first, sequence.bytes)
    doubled = sum(s.doubled for s in sequences.values())
    say_cost(windows, plan, f" (in this chunk of {len(docs):,} document{'s' if len(docs) != 1 else ''})")
    if score_windows(windows, plan, run, results):
        return True
    _say_doubled(run, doubled)
    rows = [results[d.index] for d in docs]
    if plan.cfg.min_k is not None:
        add_to_rows(rows, docs, run.tally, plan.cfg.min_k)
    if keys is not None:
        for r in rows:
            r.longppl = None if r.skipped else keys[r.index]
    plan.outputs.add_chunk(run, rows)
    for r in rows:
        run.rows.add(r)
    run.chunks_done += 1
    plan.chunk_added()
    give_back_freed_memory()
    return False


def give_back_freed_memory() -> None:
    """Return the heap's free pages to the system after a chunk. glibc keeps them: a chunk's tensors and lists of
    other sizes than the last one's then take new pages, and resident memory crept up by about 1.4 KB a document
    (552 to 594 MB from 10^4 to 4*10^4 documents; flat with this). A no-op without glibc."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def keep_freed_blocks() -> None:
    """Let glibc keep freed blocks of up to 32 MB for reuse, as it does by itself once a block that large has been
    freed (its dynamic mmap threshold rises to that block's size, the trim threshold to twice that): one such block
    is allocated and freed. glibc starts at 128 KB and maps each larger tensor anew, faulting its pages in again
    every batch: 2-8x the page faults and up to 30% slower scoring on a tiny model (loading a model of any size
    usually frees such blocks already). No setting is made: mallopt would fix the thresholds for the life of the
    process and turn glibc's own adjustment off, and thresholds the user set (mallopt, MALLOC_MMAP_THRESHOLD_) turn
    it off themselves, so they stay as set. Only the command line calls this (it owns its process). No-op without
    glibc."""
    if _LIBC is not None:
        _LIBC.free(_LIBC.malloc(DYNAMIC_MMAP_MAX - (64 << 10)))  # its mapped size, page-rounded, stays under the max


def say_cost(windows: list[Window], plan: Plan, which: str = "") -> None:
    """Once per run, before scoring: when the windows read COSTLY times more tokens than they score, say how
    many windows and tokens that is, and estimate the time after the first batch."""
    scored, read = sum(w.n_scored for w in windows), sum(w.length for w in windows)
    if plan.progress.cost_said or not scored or read < COSTLY * scored:
        return
    plan.progress.cost_said = True
    max_length, stride = plan.setup.max_length, plan.setup.stride
    if plan.progress.main:
        log.warning(
            "--stride %d with --max-length %d: %s windows%s read %s input tokens to score %s, %.0f per scored token "
            "(--stride %d reads about 1): the time estimate follows the first batch, updated as the run goes",
            stride, max_length, f"{len(windows):,}", which, f"{read:,}", f"{scored:,}", read / scored, max_length,
        )
    plan.progress.estimate_after_next_batch()


def _document_result(doc: data.Document) -> DocumentResult:
    return DocumentResult(index=doc.index, id=doc.id, group=doc.group)


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word perplexity."""
    return len(re.split(r"\s+", text))


def chunks(iterable, size: int):
    """Lists of `size` consecutive items (the last one shorter)."""
    chunk = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
