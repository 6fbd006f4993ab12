"""The two passes over the data: documents one by one (document mode), or one joined stream (stream mode).

Document mode reads the data in chunks; each process tokenizes its share of the next chunk in a
background thread while the current chunk is scored.
"""
from __future__ import annotations

import re
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from . import data
from .parallel import Plan, gather, score_windows
from .records import DocumentResult, Run
from .windows import document_sequence, document_spans, stream_spans, windows_of


TOKENIZE_BATCH = 64  # documents per tokenizer call in the background tokenization


def run_documents(plan: Plan, run: Run, tokenizer) -> bool:
    """Chunks of documents: tokenize the next chunk while this one is scored. True when stopped early."""
    rank, world = plan.accelerator.process_index, plan.accelerator.num_processes
    source = data.iter_documents(plan.cfg, plan.rows)
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for index, docs in enumerate(chunks(source, plan.cfg.chunk_documents)):
            if index < run.chunks_done:  # finished before a resume: read, not tokenized
                continue
            future = pool.submit(tokenize_share, docs, tokenizer, plan.setup.prefix, rank, world)
            if pending is not None and _score_chunk(*pending, plan, run):
                return True
            pending = (docs, future)
        if pending is not None and _score_chunk(*pending, plan, run):
            return True
    return False


def run_stream(plan: Plan, run: Run, tokenizer) -> bool:
    """One token stream of all documents joined by the separator, windows every `stride` tokens."""
    docs = list(data.iter_documents(plan.cfg, plan.rows))
    texts = [d.text for d in docs if d.text is not None]  # empty rows still add a separator, as in the recipe
    joined = plan.cfg.separator.join(texts)
    run.stream_bytes = len(joined.encode("utf-8"))
    prefix = [plan.setup.prefix] if plan.setup.prefix is not None else []
    seq = prefix + (tokenizer(joined, add_special_tokens=False)["input_ids"] if joined else [])
    spans = stream_spans(len(seq), plan.setup.max_length, plan.setup.stride)
    stopped = score_windows(windows_of(-1, seq, spans), plan, run, {-1: DocumentResult(index=-1)})
    run.documents = [_document_result(d) for d in docs]
    for d, r in zip(docs, run.documents):
        r.words = count_words(d.text) if d.text is not None else 0
        r.skipped = "not_text" if d.text is None else None
    return stopped


def tokenize_share(docs: list[data.Document], tokenizer, prefix: int | None, rank: int, world: int) -> dict:
    """{document index: (S, first_target)} for this process's share (every world-th) of a chunk; S an int64
    tensor (8 bytes a token, where a list of Python ints takes about 36: a chunk's memory is its tokens)."""
    mine = [d for i, d in enumerate(docs) if i % world == rank and d.text]
    plain = [d for d in mine if d.prompt is None]
    out = {}
    head = [prefix] if prefix is not None else []
    for part in range(0, len(plain), TOKENIZE_BATCH):  # the tokenizer's own output never holds the whole chunk
        batch = plain[part : part + TOKENIZE_BATCH]
        for d, ids in zip(batch, tokenizer([d.text for d in batch], add_special_tokens=False)["input_ids"]):
            out[d.index] = (torch.tensor(head + ids, dtype=torch.long), len(head))
    for d in mine:
        if d.prompt is not None:
            seq, first = document_sequence(tokenizer, d.text, prefix, d.prompt)
            out[d.index] = (torch.tensor(seq, dtype=torch.long), first)
    return out


def _score_chunk(docs: list[data.Document], future: Future, plan: Plan, run: Run) -> bool:
    """Score one chunk of documents and add it to the run. True when stopped inside it."""
    sequences = {k: v for part in gather(future.result(), plan) for k, v in part.items()}
    results = {d.index: _document_result(d) for d in docs}
    windows = []
    for d in docs:
        r = results[d.index]
        if d.text is None:
            r.skipped = "not_text"
            continue
        seq, first = sequences.get(d.index, ([], 0))
        spans = document_spans(len(seq), first, plan.setup.max_length, plan.setup.stride)
        if not spans:
            r.skipped = "empty"
            continue
        r.bytes, r.words, r.windows = len(d.text.encode("utf-8")), count_words(d.text), len(spans)
        windows += windows_of(d.index, seq, spans)
    if score_windows(windows, plan, run, results):
        return True
    run.documents.extend(results[d.index] for d in docs)
    run.chunks_done += 1
    return False


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
