"""The run: documents -> token sequences -> windows -> batches scored on every process -> exact sums.

Device and process logic lives here and only here: accelerate gives each process its device and
rank; every process tokenizes a share of each chunk of documents, all of them plan the same
batches, each scores its own token-balanced share, and the float64 sums and integer counts are
gathered once per chunk. Per-token losses are float32, their sums float64.
"""
from __future__ import annotations

import logging
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from . import data, model as model_lib
from .config import Config, UsageError, check
from .loss import Head, head_of, logits_losses, token_losses
from .windows import Window, assign_batches, document_sequence, document_spans, plan_batches, stream_spans, windows_of

log = logging.getLogger("lm_ce")


@dataclass
class DocumentResult:
    index: int
    id: str | None = None
    group: str | None = None
    tokens: int = 0
    nll_sum: float = 0.0
    bytes: int = 0
    words: int = 0
    windows: int = 0
    skipped: str | None = None  # why nothing was scored: "empty" (no targets) or "not_text"


@dataclass
class Results:
    summary: dict  # what results.json holds
    documents: list[DocumentResult] = field(default_factory=list)


@dataclass
class Scorer:
    """What scoring a batch needs: the model's body and head, or the full model as a fallback."""

    model: torch.nn.Module
    head: Head | None  # None: the head cannot be split, use full logits
    device: torch.device
    pad_left: bool

    @property
    def body(self) -> torch.nn.Module:
        return self.model.base_model

    @torch.inference_mode()
    def losses(self, batch: list[Window]) -> list[torch.Tensor]:
        """Per-window float32 NLL of the scored targets of each window in the batch."""
        width = max(w.length for w in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        positions = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        rows, targets = [], []
        for r, w in enumerate(batch):
            off = width - w.length if self.pad_left else 0
            ids[r, off : off + w.length] = w.seq[w.start : w.b]
            positions[r, off : off + w.length] = torch.arange(w.length)
            mask[r, off : off + w.length] = 1
            first = r * width + off + w.n_context
            rows.append(torch.arange(first, first + w.n_scored))
            targets.append(w.seq[w.a + 1 : w.b + 1])
        rows_t = torch.cat(rows).to(self.device)
        targets_t = torch.cat(targets).to(self.device)
        # Right padding needs no mask: causal attention never lets a real token see a later pad.
        padded = bool((mask == 0).any())
        attention = mask.to(self.device) if (self.pad_left and padded) else None
        inputs = dict(input_ids=ids.to(self.device), position_ids=positions.to(self.device), attention_mask=attention)
        if self.head is not None:
            hidden = self.body(**inputs, use_cache=False).last_hidden_state
            out = token_losses(hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows_t), targets_t, self.head)
        else:
            logits = self.model(**inputs, use_cache=False).logits
            out = logits_losses(logits.reshape(-1, logits.shape[-1]).index_select(0, rows_t), targets_t)
        return list(out.nll.cpu().split([w.n_scored for w in batch]))


def probe_head(model: torch.nn.Module, head: Head | None, device: torch.device) -> tuple[Head | None, str]:
    """The head to use and why: the chunked head only if it reproduces the model's own logits."""
    if head is None:
        return None, "full logits (the output layer is not a plain linear layer)"
    vocab = head.weight.shape[0]
    ids = (torch.arange(12, device=device) * 7919 % vocab)[None]
    with torch.inference_mode():
        reference = torch.log_softmax(model(ids, use_cache=False).logits[0].float(), -1)
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[0]
        ours = torch.log_softmax(head.logits(hidden), -1)
    tolerance = 1e-3 if head.weight.dtype == torch.float32 else 5e-2
    error = (reference - ours).abs().max().item()
    if not error <= tolerance:
        log.warning("the chunked head differs from the model's logits by %.3g: using full logits instead", error)
        return None, f"full logits (chunked head probe differed by {error:.3g})"
    return head, "chunked"


def resolve_lengths(cfg: Config, positions: int | None) -> tuple[int, int]:
    """(max_length, stride): the model's positions at most 2048 by default; never beyond them."""
    max_length = cfg.max_length or min(positions or 2048, 2048)
    if positions and max_length > positions:
        raise UsageError(
            f"--max-length {max_length} is beyond the model's {positions} positions; use --max-length {positions} or less"
        )
    stride = cfg.stride or max_length
    if stride > max_length:
        raise UsageError(f"--stride {stride} is larger than --max-length {max_length}; use a stride at most max_length")
    return max_length, stride


def prefix_id(cfg: Config, tokenizer) -> int | None:
    """The token placed before each document so its first token is predicted too."""
    choice = cfg.prefix_token
    if choice == "auto":
        choice = "none" if cfg.mode == "stream" else ("bos" if tokenizer.bos_token_id is not None else "eos")
    if choice == "none":
        return None
    token = tokenizer.bos_token_id if choice == "bos" else tokenizer.eos_token_id
    if token is None:
        raise UsageError(f"--prefix-token {choice}: the tokenizer has no {choice.upper()} token; use --prefix-token none")
    return token


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word perplexity."""
    return len(re.split(r"\s+", text))


def set_threads(cfg: Config, world: int, device: torch.device) -> int:
    """Intra-op threads: as asked, else the cores divided among the processes on this machine."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif device.type == "cpu" and world > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return torch.get_num_threads()


def chunks(iterable, size: int):
    chunk = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def evaluate(cfg: Config, model: torch.nn.Module | None = None, tokenizer=None) -> Results:
    """Score the configured data with the configured model; the returned summary is results.json."""
    from accelerate import Accelerator

    check(cfg)
    started = time.perf_counter()
    accelerator = Accelerator(cpu=not torch.cuda.is_available() and not _other_accelerator())
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    device = accelerator.device
    threads = set_threads(cfg, world, device)
    torch.manual_seed(cfg.seed)

    if model is None:
        with accelerator.main_process_first():
            model, tokenizer, info = model_lib.load(cfg, device, main)
    else:
        model.eval()
        device = next(model.parameters()).device
        info = model_lib.ModelInfo(
            cfg.model, "object", cfg.model, cfg.revision, str(next(model.parameters()).dtype).replace("torch.", ""),
            model_lib.max_positions(model.config), sum(p.numel() for p in model.parameters()),
        )
    max_length, stride = resolve_lengths(cfg, info.max_positions)
    prefix = prefix_id(cfg, tokenizer)
    head, head_note = probe_head(model, head_of(model), device)
    scorer = Scorer(model, head, device, cfg.padding_side == "left")
    budget = cfg.token_budget or cfg.batch_size * max_length
    loaded = time.perf_counter()

    documents: list[DocumentResult] = []
    totals = {"padding_tokens": 0, "input_tokens": 0, "windows": 0}
    progress = _Progress(main and cfg.progress)
    interrupted = False
    stream_bytes = 0
    try:
        if cfg.mode == "document":
            source = data.iter_documents(cfg)
            with ThreadPoolExecutor(1) as pool:  # tokenize the next chunk while this one is scored
                pending = None
                for docs in chunks(source, cfg.chunk_documents):
                    future = pool.submit(_tokenize_share, docs, tokenizer, prefix, rank, world)
                    if pending is not None:
                        _score_chunk(*pending, scorer, cfg, max_length, stride, budget, accelerator, documents, totals, progress)
                    pending = (docs, future)
                if pending is not None:
                    _score_chunk(*pending, scorer, cfg, max_length, stride, budget, accelerator, documents, totals, progress)
        else:
            docs = list(data.iter_documents(cfg))
            documents = [_result(d) for d in docs]
            texts = [d.text for d in docs if d.text is not None]  # empty rows still add a separator, as in the recipe
            for d, r in zip(docs, documents):
                if d.text is None:
                    r.skipped = "not_text"
            joined = cfg.separator.join(texts)
            stream_bytes = len(joined.encode("utf-8"))
            seq = ([prefix] if prefix is not None else []) + (tokenizer(joined, add_special_tokens=False)["input_ids"] if joined else [])
            windows = windows_of(-1, seq, stream_spans(len(seq), max_length, stride))
            stream = DocumentResult(index=-1)
            _score_windows(windows, scorer, cfg, budget, accelerator, {-1: stream}, totals, progress)
            stream_tokens, stream_nll = stream.tokens, stream.nll_sum
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: reporting what was scored so far")
    progress.close()
    finished = time.perf_counter()

    if cfg.mode == "document":
        scored = [d for d in documents if not d.skipped]
        nll_sum = math.fsum(d.nll_sum for d in scored)
        tokens = sum(d.tokens for d in scored)
        n_bytes = sum(d.bytes for d in scored)
    else:
        scored = [d for d in documents if not d.skipped]
        nll_sum, tokens, n_bytes = (stream_nll, stream_tokens, stream_bytes) if not interrupted else (0.0, 0, 0)
    if tokens == 0 and not interrupted:
        raise UsageError(
            f"nothing to score: all {len(documents)} documents tokenize to nothing (check --text-field '{cfg.text_field}')"
        )
    words = sum(d.words for d in scored)
    seconds = finished - loaded
    summary = {
        "nll_sum": nll_sum,
        "counts": {
            "tokens": tokens,
            "documents": len(scored),
            "skipped_documents": len(documents) - len(scored),
            "bytes": n_bytes,
            "words": words,
            "windows": totals["windows"],
            "input_tokens": totals["input_tokens"],
            "padding_tokens": totals["padding_tokens"],
        },
        "metrics": metrics(nll_sum, tokens, n_bytes, words),
        "timing": {
            "seconds": seconds,
            "tokens_per_second": tokens / seconds if seconds > 0 else None,
            "load_seconds": loaded - started,
            "total_seconds": finished - started,
        },
        "complete": not interrupted,
        "model": {**info.__dict__, "head": head_note},
        "data": {
            k: getattr(cfg, k)
            for k in ("dataset", "dataset_config", "split", "data_files", "text_field", "prompt_field",
                      "group_field", "id_field", "join_by", "streaming", "limit")
        },
        "settings": {
            "mode": cfg.mode,
            "max_length": max_length,
            "stride": stride,
            "prefix_token": cfg.prefix_token,
            "prefix_token_id": prefix,
            "separator": cfg.separator if cfg.mode == "stream" else None,
            "batch_size": cfg.batch_size,
            "token_budget": budget,
            "padding_side": cfg.padding_side,
        },
        "environment": environment(device, world, threads),
        "config": cfg.resolved(),
    }
    return Results(summary, documents if cfg.mode == "document" else [])


def _other_accelerator() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def _result(doc: data.Document) -> DocumentResult:
    return DocumentResult(index=doc.index, id=doc.id, group=doc.group)


def _tokenize_share(docs: list[data.Document], tokenizer, prefix: int | None, rank: int, world: int) -> dict:
    """{document index: (S, first_target)} for this process's share (every world-th) of a chunk."""
    mine = [d for i, d in enumerate(docs) if i % world == rank and d.text]
    plain = [d for d in mine if d.prompt is None]
    out = {}
    if plain:
        encoded = tokenizer([d.text for d in plain], add_special_tokens=False)["input_ids"]
        head = [prefix] if prefix is not None else []
        for d, ids in zip(plain, encoded):
            out[d.index] = (head + ids, len(head))
    for d in mine:
        if d.prompt is not None:
            out[d.index] = document_sequence(tokenizer, d.text, prefix, d.prompt)
    return out


def _score_chunk(docs, future, scorer, cfg, max_length, stride, budget, accelerator, documents, totals, progress):
    """Score one chunk of documents; per-document sums land in `documents` on every process."""
    from accelerate.utils import gather_object

    sequences = future.result()
    if accelerator.num_processes > 1:
        sequences = {k: v for part in gather_object([sequences]) for k, v in part.items()}
    results = {d.index: _result(d) for d in docs}
    windows = []
    for d in docs:
        r = results[d.index]
        if d.text is None:
            r.skipped = "not_text"
            continue
        seq, first = sequences.get(d.index, ([], 0))
        spans = document_spans(len(seq), first, max_length, stride)
        if not spans:
            r.skipped = "empty"
            continue
        r.bytes, r.words, r.windows = len(d.text.encode("utf-8")), count_words(d.text), len(spans)
        windows += windows_of(d.index, seq, spans)
    _score_windows(windows, scorer, cfg, budget, accelerator, results, totals, progress)
    documents.extend(results[d.index] for d in docs)


def _score_windows(windows, scorer, cfg, budget, accelerator, results, totals, progress) -> None:
    """Each process scores its share of the batches; sums are gathered into `results` at the end."""
    from accelerate.utils import gather_object

    world, rank = accelerator.num_processes, accelerator.process_index
    batches = plan_batches(windows, cfg.batch_size, budget)
    share = assign_batches(batches, world)[rank] if batches else []
    progress.add_total(sum(w.n_scored for w in windows))
    partial: dict[int, list] = {}  # doc -> [nll float64, tokens]
    padding = inputs = 0
    for batch in share:  # equal length on every process; None is a step with nothing to score
        done = torch.zeros(2, dtype=torch.float64)
        if batch is not None:
            for w, nll in zip(batch, scorer.losses(batch)):
                total = float(nll.double().sum())
                if not math.isfinite(total):
                    raise FloatingPointError(
                        f"non-finite loss in document {w.doc} (window over tokens {w.start}..{w.b}): "
                        "the model produced NaN/inf logits; check the checkpoint and --dtype"
                    )
                entry = partial.setdefault(w.doc, [0.0, 0])
                entry[0] += total
                entry[1] += w.n_scored
                done += torch.tensor([w.n_scored, total], dtype=torch.float64)
            width = max(w.length for w in batch)
            inputs += sum(w.length for w in batch)
            padding += width * len(batch) - sum(w.length for w in batch)
        if world > 1:
            done = accelerator.reduce(done.to(accelerator.device), reduction="sum").cpu()
        progress.update(int(done[0]), float(done[1]))
    counts = torch.tensor([padding, inputs, sum(len(b) for b in share if b)], dtype=torch.long)
    parts = [partial]
    if world > 1:
        counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
        parts = gather_object([partial])
    totals["padding_tokens"] += int(counts[0])
    totals["input_tokens"] += int(counts[1])
    totals["windows"] += int(counts[2])
    for part in parts:  # the same order on every process: sums are identical everywhere
        for doc, (nll, tokens) in sorted(part.items()):
            results[doc].nll_sum += nll
            results[doc].tokens += tokens


class _Progress:
    """tqdm over scored tokens with the running perplexity; silent off the main process."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.nll = 0.0
        self.tokens = 0

    def add_total(self, n: int) -> None:
        if self.enabled and self.bar is None:  # opened when there is work, not before the data loads
            from tqdm.auto import tqdm

            self.bar = tqdm(total=0, unit="tok", unit_scale=True, dynamic_ncols=True, desc="scoring")
        if self.bar is not None:
            self.bar.total += n
            self.bar.refresh()

    def update(self, tokens: int, nll: float) -> None:
        self.tokens += tokens
        self.nll += nll
        if self.bar is not None and tokens:
            self.bar.update(tokens)
            self.bar.set_postfix(ppl=f"{math.exp(self.nll / max(self.tokens, 1)):.4g}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def metrics(nll_sum: float, tokens: int, n_bytes: int, words: int) -> dict:
    """All the figures from the exact sums: nats/token, perplexity, bits per token/byte, byte and word perplexity."""
    ln2 = math.log(2)

    def ratio(n):
        return nll_sum / n if n else None

    def exp(x):
        if x is None:
            return None
        return math.exp(x) if x < 700 else math.inf

    mean = ratio(tokens)
    per_byte = ratio(n_bytes)
    return {
        "mean_loss": mean,
        "perplexity": exp(mean),
        "bits_per_token": mean / ln2 if mean is not None else None,
        "bits_per_byte": per_byte / ln2 if per_byte is not None else None,
        "byte_perplexity": exp(per_byte),
        "word_perplexity": exp(ratio(words)),
    }


def environment(device: torch.device, world: int, threads: int) -> dict:
    """Library versions and hardware, so a figure can be traced to what produced it."""
    import platform

    import accelerate
    import datasets
    import transformers

    from . import __version__

    return {
        "lm_ce": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "processes": world,
        "threads_per_process": threads,
    }
