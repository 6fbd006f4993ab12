"""The run: documents -> token sequences -> windows -> batches scored on every process -> exact sums.

Device and process logic lives here and only here: accelerate gives each process its device and
rank; every process tokenizes a share of each chunk of documents, all of them plan the same
batches, each scores its own token-balanced share, and the float64 sums and integer counts are
gathered once per chunk. Per-token losses are float32, their sums float64.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from . import checkpoint, data, model as model_lib, stats
from .config import Config, UsageError, check
from .loss import Head, head_of, logits_losses, pair_losses, token_losses
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
    positions: stats.PositionLoss | None = None
    tokens: list[dict] = field(default_factory=list)  # column -> tensor blocks, with --save-tokens


@dataclass
class Tally:
    """What scoring accumulates; one per process per chunk, merged into the run's."""

    docs: dict = field(default_factory=dict)  # doc -> [nll float64, tokens, sum of squares]
    windows: list = field(default_factory=list)  # (doc, first target, nll, tokens): clusters for the stderr
    positions: stats.PositionLoss | None = None
    compares: list = field(default_factory=list)  # stats.Comparison per --compare-to model
    tokens: list = field(default_factory=list)  # per batch: dict of columns (with --save-tokens)
    padding: int = 0
    inputs: int = 0
    batches_done: list = field(default_factory=list)  # global batch ids of the current chunk
    tokens_per_process: list = field(default_factory=list)

    def merge(self, other: "Tally") -> None:
        for doc, (nll, n, sq) in other.docs.items():
            mine = self.docs.setdefault(doc, [0.0, 0, 0.0])
            mine[0] += nll
            mine[1] += n
            mine[2] += sq
        self.windows += other.windows
        if other.positions is not None:
            if self.positions is None:
                self.positions = stats.PositionLoss.zeros(len(other.positions.nll))
            self.positions.nll += other.positions.nll
            self.positions.count += other.positions.count
        for mine, theirs in zip(self.compares, other.compares):
            mine.merge(theirs)
        self.tokens += other.tokens
        self.padding += other.padding
        self.inputs += other.inputs
        self.batches_done += other.batches_done


@dataclass
class Scorer:
    """What scoring a batch needs: the model's body and head (or full logits as a fallback), and the models compared."""

    model: torch.nn.Module
    head: Head | None  # None: the head cannot be split, use full logits
    device: torch.device
    pad_left: bool
    others: list = field(default_factory=list)  # (model, head) of each --compare-to model with the same tokenizer
    want_top1: bool = False

    @torch.inference_mode()
    def score(self, batch: list[Window], tally: Tally) -> tuple[int, float]:
        """Score a batch into the tally: (tokens, NLL sum). Out of memory: score each half instead."""
        try:
            return self._score(batch, tally)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if len(batch) == 1 or not _out_of_memory(e):
                raise
            _release_memory(self.device)
            if not getattr(self, "_warned", False):
                log.warning("out of memory on a batch of %d windows: splitting batches in halves and retrying", len(batch))
                self._warned = True
            half = len(batch) // 2
            first, second = self.score(batch[:half], tally), self.score(batch[half:], tally)
            return first[0] + second[0], first[1] + second[1]

    def _score(self, batch: list[Window], tally: Tally) -> tuple[int, float]:
        width = max(w.length for w in batch)
        # Right padding needs no mask and no position ids: causal attention never lets a real token see a
        # later pad, and the default positions 0..width-1 are right for every real token. (Explicit ids
        # with zeros on the pads read as packed sequences to transformers, which then builds a slower mask.)
        left = self.pad_left and any(w.length < width for w in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        if left:
            positions = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
        rows, targets, in_window = [], [], []
        for r, w in enumerate(batch):
            off = width - w.length if left else 0
            ids[r, off : off + w.length] = w.seq[w.start : w.b]
            if left:
                positions[r, off : off + w.length] = torch.arange(w.length)
                mask[r, off : off + w.length] = 1
            first = r * width + off + w.n_context
            rows.append(torch.arange(first, first + w.n_scored))
            in_window.append(torch.arange(w.n_context, w.length))
            targets.append(w.seq[w.a + 1 : w.b + 1])
        rows_t = torch.cat(rows).to(self.device)
        targets_t = torch.cat(targets).to(self.device)
        inputs = dict(input_ids=ids.to(self.device), position_ids=None, attention_mask=None)
        if left:
            inputs.update(position_ids=positions.to(self.device), attention_mask=mask.to(self.device))
        compared = []
        if self.others:
            hidden = _hidden(self.model, inputs, rows_t)
            for other, other_head in self.others:
                pair = pair_losses(hidden, self.head, _hidden(other, inputs, rows_t), other_head, targets_t)
                compared.append(pair)
            nll, top1 = compared[0].nll, compared[0].top1
        elif self.head is not None:
            out = token_losses(_hidden(self.model, inputs, rows_t), targets_t, self.head, want_top1=self.want_top1)
            nll, top1 = out.nll, out.top1
        else:
            logits = self.model(**inputs, use_cache=False).logits
            out = logits_losses(logits.reshape(-1, logits.shape[-1]).index_select(0, rows_t), targets_t, self.want_top1)
            nll, top1 = out.nll, out.top1
        nll = nll.cpu()
        in_window_t = torch.cat(in_window)
        sizes = [w.n_scored for w in batch]
        batch_nll = 0.0
        for w, part in zip(batch, nll.split(sizes)):
            total = float(part.double().sum())
            if not math.isfinite(total):
                raise FloatingPointError(
                    f"non-finite loss in document {w.doc}, window over tokens {w.start}..{w.b} (targets "
                    f"{w.target_offset}..{w.target_offset + w.n_scored - 1}): the model produced NaN/inf; "
                    "check the checkpoint, or use --dtype float32 (float16 overflows easily)"
                )
            entry = tally.docs.setdefault(w.doc, [0.0, 0, 0.0])
            entry[0] += total
            entry[1] += w.n_scored
            entry[2] += float(part.double().square().sum())
            tally.windows.append((w.doc, w.target_offset, total, w.n_scored))
            batch_nll += total
        tally.positions.add(in_window_t, nll)
        for comparison, pair in zip(tally.compares, compared):
            comparison.add(pair.other_nll.cpu(), pair.kl.cpu(), (pair.top1 == pair.other_top1).cpu())
        if self.want_top1:
            columns = {
                "doc": torch.cat([torch.full((w.n_scored,), w.doc) for w in batch]),
                "position": torch.cat([torch.arange(w.target_offset, w.target_offset + w.n_scored) for w in batch]),
                "token_id": targets_t.cpu(),
                "nll": nll,
                "top1_id": top1.cpu(),
                "window_position": in_window_t,
            }
            for k, pair in enumerate(compared):
                columns[f"nll_{k + 1}"] = pair.other_nll.cpu()
                columns[f"kl_{k + 1}"] = pair.kl.cpu()
                columns[f"top1_id_{k + 1}"] = pair.other_top1.cpu()
            tally.tokens.append(columns)
        tally.inputs += sum(w.length for w in batch)
        tally.padding += width * len(batch) - sum(w.length for w in batch)
        return sum(sizes), batch_nll


def _hidden(model: torch.nn.Module, inputs: dict, rows: torch.Tensor) -> torch.Tensor:
    """Final hidden states of the scored positions only (the head is applied to these alone)."""
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)


def _out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "not enough memory" in text


def _release_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
    if not bool(torch.isfinite(reference).all()):  # a broken model: the NaN guard will name where it shows
        return head, "chunked (probe inconclusive: the model's own logits are not finite)"
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
    if token is None and cfg.prefix_token == "auto":
        raise UsageError(
            "--prefix-token auto: the tokenizer has neither a BOS nor an EOS token; use --prefix-token none "
            "(then the first token of each document is context, not scored)"
        )
    if token is None:
        raise UsageError(f"--prefix-token {choice}: the tokenizer has no {choice.upper()} token; use --prefix-token none")
    return token


CPU_TOKEN_BUDGET = 4096  # measured on a 2-core CPU: larger batches of long windows run slower (cache)


def default_budget(batch_size: int, max_length: int, device: torch.device) -> int:
    """Input tokens per batch: batch_size full windows on accelerators, at most CPU_TOKEN_BUDGET on CPUs."""
    budget = batch_size * max_length
    return min(budget, CPU_TOKEN_BUDGET) if device.type == "cpu" else budget


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word perplexity."""
    return len(re.split(r"\s+", text))


def set_threads(cfg: Config, world: int, device: torch.device) -> int:
    """Intra-op threads: as asked, else (on CPU, unless OMP_NUM_THREADS is set) the cores available to this
    process divided among the processes on this machine, so that they do not oversubscribe the cores."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif device.type == "cpu" and (world > 1 or "OMP_NUM_THREADS" not in os.environ):
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # taskset/Slurm
        torch.set_num_threads(max(1, (cores or 1) // local))
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


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map text to the same ids (then two models can be compared token by token)."""
    return a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids


class _Stop:
    """Ctrl-C / SIGTERM ask the run to save and stop at the next batch; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested: saving progress after the current batch (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass
class Run:
    """Everything a run has computed so far: what the state file holds and the reports are made from."""

    documents: list = field(default_factory=list)  # DocumentResult of finished chunks
    tally: Tally = field(default_factory=Tally)  # merged sums of finished chunks
    chunks_done: int = 0
    partial: Tally | None = None  # the current chunk's merged sums, when stopped inside it
    windows: int = 0
    stream_bytes: int = 0
    tokens_per_process: list = field(default_factory=list)


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
    state = checkpoint.load(cfg) if cfg.resume else None
    if state and state["run"].partial is not None and state["processes"] != world:
        raise UsageError(
            f"--resume: {cfg.output_dir} was stopped inside a chunk with {state['processes']} processes, whose batches "
            f"depend on that number; resume it with {state['processes']} processes"
        )

    if model is None:
        # A download or a GGUF cache is made once, by the main process; a local directory is read by all at once.
        first = contextlib.nullcontext() if os.path.isdir(cfg.model) else accelerator.main_process_first()
        with first:
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
    if cfg.compile:  # compiled per new input shape on first use; pays on long runs of similar batches
        model.base_model.compile(dynamic=True)
    others, by_bytes = _load_compared(cfg, tokenizer, head, device, accelerator)
    scorer = Scorer(model, head, device, cfg.padding_side == "left", others, want_top1=cfg.save_tokens)
    budget = cfg.token_budget or default_budget(cfg.batch_size, max_length, device)
    accelerator.wait_for_everyone()  # processes finish loading at different times: scoring starts when all have
    loaded = time.perf_counter()

    plan = _Plan(cfg, scorer, max_length, stride, budget, accelerator, len(others))
    run = state["run"] if state else Run(tally=plan.new_tally())
    progress = _Progress(main and cfg.progress)
    stopped = False
    with _Stop() as stop:
        plan.stop = stop
        try:
            if state and state.get("complete"):
                log.info("the saved run in %s is complete: reporting it", cfg.output_dir)
            elif cfg.mode == "document":
                stopped = _run_documents(cfg, tokenizer, prefix, plan, run, progress)
            else:
                stopped = _run_stream(cfg, tokenizer, prefix, plan, run, progress)
        except KeyboardInterrupt:
            stopped = True
            log.warning("aborted: the figures cover the chunks finished before the stop")
    progress.close()
    finished = time.perf_counter()
    if cfg.output_dir and main:
        checkpoint.save(cfg.output_dir, _state(cfg, run, world, complete=not stopped))
        if stopped:
            log.warning("progress saved in %s: rerun the same command with --resume to continue", cfg.output_dir)

    results = _results(cfg, run, stopped, info, head_note, max_length, stride, prefix, budget, device, world, threads,
                       loaded - started, finished - loaded, finished - started, tokenizer)
    for name in by_bytes:
        results.summary.setdefault("compare", {})[name] = _compare_by_bytes(cfg, name, results.summary)
    return results


def _other_accelerator() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def _load_compared(cfg: Config, tokenizer, head, device, accelerator) -> tuple[list, list]:
    """([(model, head)] of --compare-to models sharing our tokenizer, [names of those that do not])."""
    same, other = [], []
    for name in cfg.compare_to or []:
        with accelerator.main_process_first():
            m, t, _ = model_lib.load(dataclasses.replace(cfg, model=name), device, accelerator.is_main_process)
        h = head_of(m)
        if same_tokenizer(tokenizer, t) and h is not None and head is not None and h.weight.shape[0] == head.weight.shape[0]:
            same.append((m, h))
        else:
            other.append(name)
            del m
    if same and head is None:
        raise UsageError("--compare-to needs the first model's output layer to be a plain linear layer")
    return same, other


def _compare_by_bytes(cfg: Config, name: str, summary: dict) -> dict:
    """A model with another tokenizer: scored on its own, compared by bits per byte only."""
    other = evaluate(dataclasses.replace(cfg, model=name, compare_to=None, save_tokens=False, output_dir=None, resume=False))
    bpb, first = other.summary["metrics"]["bits_per_byte"], summary["metrics"]["bits_per_byte"]
    return {
        "note": "tokenizers differ: compared by bits per byte only (no per-token KL or agreement)",
        "tokens": other.summary["counts"]["tokens"],
        "bits_per_byte": bpb,
        "delta_bits_per_byte": bpb - first if bpb is not None and first is not None else None,
        "perplexity": other.summary["metrics"]["perplexity"],
    }


@dataclass
class _Plan:
    """The fixed parts of scoring: settings, the scorer, and the processes."""

    cfg: Config
    scorer: Scorer
    max_length: int
    stride: int
    budget: int
    accelerator: object
    n_compared: int
    stop: _Stop | None = None
    last_save: float = field(default_factory=time.monotonic)

    def new_tally(self) -> Tally:
        return Tally(positions=stats.PositionLoss.zeros(self.max_length),
                     compares=[stats.Comparison() for _ in range(self.n_compared)])


def _run_documents(cfg: Config, tokenizer, prefix, plan: _Plan, run: Run, progress) -> bool:
    """Chunks of documents: tokenize the next chunk while this one is scored. True when stopped early."""
    accelerator = plan.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    source = data.iter_documents(cfg)
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for index, docs in enumerate(chunks(source, cfg.chunk_documents)):
            if index < run.chunks_done:  # finished before a resume: read, not tokenized
                continue
            future = pool.submit(_tokenize_share, docs, tokenizer, prefix, rank, world)
            if pending is not None and _score_chunk(*pending, plan, run, progress):
                return True
            pending = (docs, future)
        if pending is not None and _score_chunk(*pending, plan, run, progress):
            return True
    return False


def _run_stream(cfg: Config, tokenizer, prefix, plan: _Plan, run: Run, progress) -> bool:
    """One token stream of all documents joined by the separator, windows every `stride` tokens."""
    docs = list(data.iter_documents(cfg))
    texts = [d.text for d in docs if d.text is not None]  # empty rows still add a separator, as in the recipe
    joined = cfg.separator.join(texts)
    run.stream_bytes = len(joined.encode("utf-8"))
    seq = ([prefix] if prefix is not None else []) + (tokenizer(joined, add_special_tokens=False)["input_ids"] if joined else [])
    results = {-1: DocumentResult(index=-1)}
    stopped = _score_windows(windows_of(-1, seq, stream_spans(len(seq), plan.max_length, plan.stride)), plan, run, progress, results)
    run.documents = [_result(d) for d in docs]
    for d, r in zip(docs, run.documents):
        r.words = count_words(d.text) if d.text is not None else 0
        r.skipped = "not_text" if d.text is None else None
    return stopped


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


def _score_chunk(docs, future, plan: _Plan, run: Run, progress) -> bool:
    """Score one chunk of documents and add it to the run. True when stopped inside it."""
    from accelerate.utils import gather_object

    accelerator = plan.accelerator
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
        spans = document_spans(len(seq), first, plan.max_length, plan.stride)
        if not spans:
            r.skipped = "empty"
            continue
        r.bytes, r.words, r.windows = len(d.text.encode("utf-8")), count_words(d.text), len(spans)
        windows += windows_of(d.index, seq, spans)
    if _score_windows(windows, plan, run, progress, results):
        return True
    run.documents.extend(results[d.index] for d in docs)
    run.chunks_done += 1
    return False


def _score_windows(windows: list[Window], plan: _Plan, run: Run, progress, results: dict) -> bool:
    """Each process scores its share of the batches; the chunk's sums are gathered and added to the run.

    Every process takes the same number of steps, with an all-reduce per step (global progress, and
    the flags that save or stop all processes at the same batch). True when stopped inside."""
    from accelerate.utils import gather_object

    accelerator, cfg = plan.accelerator, plan.cfg
    world, rank = accelerator.num_processes, accelerator.process_index
    batches = plan_batches(windows, _batch_size(cfg.batch_size, len(windows), world), plan.budget)
    resumed = run.partial or plan.new_tally()
    done_before = set(resumed.batches_done)
    todo = [i for i in range(len(batches)) if i not in done_before]
    shares = assign_batches([batches[i] for i in todo], world) if todo else [[] for _ in range(world)]
    ids_of = {id(batches[i]): i for i in todo}
    mine = shares[_share_of(rank, shares, run.tokens_per_process)]
    tally = plan.new_tally()
    progress.add_total(sum(w.n_scored for w in windows), sum(resumed.docs[d][1] for d in resumed.docs))
    stopped = False
    for step, batch in enumerate(mine):
        tokens, nll = 0, 0.0
        if batch is not None:
            tokens, nll = plan.scorer.score(batch, tally)
            tally.batches_done.append(ids_of[id(batch)])
        flags = torch.tensor([tokens, nll, _due(plan), float(plan.stop.requested)], dtype=torch.float64)
        if world > 1:
            flags = accelerator.reduce(flags.to(accelerator.device), reduction="sum").cpu()
        progress.update(int(flags[0]), float(flags[1]))
        if flags[3] > 0 and step + 1 < len(mine):
            stopped = True
            break
        if flags[2] > 0 and step + 1 < len(mine):  # a periodic save inside the chunk
            _save_partial(plan, run, resumed, tally)
    parts = gather_object([tally]) if world > 1 else [tally]
    merged = resumed
    for part in parts:  # rank order: the same sums on every process
        merged.merge(part)
    run.tokens_per_process = [a + sum(v[1] for v in p.docs.values()) for a, p in
                              zip(run.tokens_per_process or [0] * len(parts), parts)]
    if stopped:
        run.partial = merged
        return True
    run.partial = None
    _canonical_sums(merged)
    for doc, (nll, n, _) in merged.docs.items():
        results[doc].nll_sum += nll
        results[doc].tokens += n
    merged.batches_done = []
    run.tally.merge(merged)
    run.windows += len(windows)
    return False


def _batch_size(batch_size: int, n_windows: int, world: int) -> int:
    """Smaller batches when there are few windows for many processes, so none is left idle (this changes
    batch composition, hence float rounding, against a single-process run; the tokens stay the same)."""
    if world == 1:
        return batch_size
    return max(1, min(batch_size, -(-n_windows // (2 * world))))


def _share_of(rank: int, shares: list, done: list) -> int:
    """Which share this process takes: the heaviest goes to the process with the fewest tokens so far
    (ties: the lower rank), so that many small chunks do not each give process 0 the most work."""
    world = len(shares)
    done = done if len(done) == world else [0] * world
    heavy = sorted(range(world), key=lambda s: (-sum(w.n_scored for b in shares[s] if b for w in b), s))
    light = sorted(range(world), key=lambda r: (done[r], r))
    return heavy[light.index(rank)]


def _canonical_sums(tally: Tally) -> None:
    """Each document's NLL summed over its windows in target order, whichever process scored them: the
    same float64 sums with any number of processes (merging per-process sums would round differently)."""
    tally.windows.sort(key=lambda w: (w[0], w[1]))
    sums: dict = {}
    for doc, _, nll, _ in tally.windows:
        sums[doc] = sums.get(doc, 0.0) + nll
    for doc, total in sums.items():
        tally.docs[doc][0] = total


def _due(plan: _Plan) -> float:
    """1.0 on the main process when a periodic save is due (summed over processes, so all see it)."""
    if not plan.cfg.output_dir or not plan.accelerator.is_main_process:
        return 0.0
    if time.monotonic() - plan.last_save < plan.cfg.checkpoint_seconds:
        return 0.0
    plan.last_save = time.monotonic()
    return 1.0


def _save_partial(plan: _Plan, run: Run, resumed: Tally, tally: Tally) -> None:
    """Save the run with the current chunk's progress so far (collective: every process calls it)."""
    from accelerate.utils import gather_object

    parts = gather_object([tally]) if plan.accelerator.num_processes > 1 else [tally]
    if plan.accelerator.is_main_process:
        merged = copy.deepcopy(resumed)
        for part in parts:
            merged.merge(part)
        snapshot = dataclasses.replace(run, partial=merged)
        checkpoint.save(plan.cfg.output_dir, _state(plan.cfg, snapshot, plan.accelerator.num_processes, complete=False))


def _state(cfg: Config, run: Run, world: int, complete: bool) -> dict:
    """What the state file holds: the run, what it was, and whether it finished."""
    return {"fingerprint": checkpoint.fingerprint(cfg), "config": cfg.resolved(), "run": run, "processes": world,
            "complete": complete}


class _Progress:
    """tqdm over scored tokens with the running perplexity; silent off the main process."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.nll = 0.0
        self.tokens = 0

    def add_total(self, n: int, done: int = 0) -> None:
        if self.enabled and self.bar is None:  # opened when there is work, not before the data loads
            from tqdm.auto import tqdm

            self.bar = tqdm(total=0, unit="tok", unit_scale=True, dynamic_ncols=True, desc="scoring")
        if self.bar is not None:
            self.bar.total += n
            if done:
                self.bar.update(done)
            self.bar.refresh()

    def update(self, tokens: int, nll: float) -> None:
        self.tokens += tokens
        self.nll += nll
        if self.bar is not None and tokens:
            self.bar.update(tokens)
            self.bar.set_postfix(ppl=f"{math.exp(min(self.nll / max(self.tokens, 1), 700)):.4g}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _results(cfg, run: Run, stopped, info, head_note, max_length, stride, prefix, budget, device, world, threads,
             load_seconds, seconds, total_seconds, tokenizer) -> Results:
    """The summary (results.json) and the breakdowns of a run."""
    tally = copy.deepcopy(run.tally)
    if run.partial is not None and cfg.mode == "stream":  # a stopped stream has only partial sums
        tally.merge(run.partial)
    if cfg.mode == "document":  # stopped inside a chunk: the report covers the finished chunks only
        documents = run.documents
        scored = [d for d in documents if not d.skipped]
        nll_sum = math.fsum(d.nll_sum for d in scored)
        tokens = sum(d.tokens for d in scored)
        n_bytes = sum(d.bytes for d in scored)
        words = sum(d.words for d in scored)
    else:
        documents = run.documents
        scored = [d for d in documents if not d.skipped]
        nll_sum = math.fsum(v[0] for v in tally.docs.values())
        tokens = sum(v[1] for v in tally.docs.values())
        n_bytes = run.stream_bytes if not stopped else 0
        words = sum(d.words for d in scored) if not stopped else 0
    if tokens == 0 and not stopped:
        if all(d.skipped == "not_text" for d in documents):
            raise UsageError(f"nothing to score: no row has a string in field '{cfg.text_field}'; check --text-field")
        raise UsageError(
            f"nothing to score: all {len(documents)} documents tokenize to nothing (check --text-field '{cfg.text_field}')"
        )
    if cfg.mode == "document" and len(scored) >= 2:
        clusters = stats.Clustered([d.nll_sum for d in scored], [d.tokens for d in scored])
        unit = "documents"
    else:
        clusters = stats.Clustered([w[2] for w in tally.windows], [w[3] for w in tally.windows])
        unit = "windows"
    sum_sq = math.fsum(v[2] for v in tally.docs.values())
    summary = {
        "nll_sum": nll_sum,
        "counts": {
            "tokens": tokens,
            "documents": len(scored),
            "skipped_documents": len(documents) - len(scored),
            "bytes": n_bytes,
            "words": words,
            "windows": run.windows,
            "input_tokens": tally.inputs,
            "padding_tokens": tally.padding,
            "tokens_per_process": run.tokens_per_process,
        },
        "metrics": metrics(nll_sum, tokens, n_bytes, words),
        "uncertainty": stats.uncertainty(clusters, sum_sq, unit),
        "timing": {
            "seconds": seconds,
            "tokens_per_second": tokens / seconds if seconds > 0 else None,
            "load_seconds": load_seconds,
            "total_seconds": total_seconds,
        },
        "complete": not stopped,
        "by_position": tally.positions.buckets() if tally.positions is not None else [],
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
    if cfg.group_field and cfg.mode == "document":
        summary["groups"] = stats.groups(scored)
    if tally.compares:
        summary["compare"] = {
            name: c.summary(nll_sum, n_bytes) for name, c in zip([n for n in cfg.compare_to or []], tally.compares)
        }
    token_rows = _token_rows(tally.tokens, documents, tokenizer) if cfg.save_tokens else []
    return Results(summary, documents if cfg.mode == "document" else [], tally.positions, token_rows)


def _token_rows(blocks: list[dict], documents: list[DocumentResult], tokenizer) -> list[dict]:
    """Token columns in document order, with the token texts and document ids added."""
    if not blocks:
        return []
    columns = {k: torch.cat([b[k] for b in blocks]) for k in blocks[0]}
    order = torch.argsort(columns["doc"] * (1 << 32) + columns["position"])
    columns = {k: v[order] for k, v in columns.items()}
    ids = {d.index: d.id for d in documents}
    vocab: dict[int, str] = {}

    def text(i: int) -> str:
        if i not in vocab:
            vocab[i] = tokenizer.decode([i])
        return vocab[i]

    out = {k: v.tolist() for k, v in columns.items()}
    out["doc_id"] = [ids.get(d) for d in out["doc"]]
    out["token"] = [text(i) for i in out["token_id"]]
    out["top1"] = [text(i) for i in out["top1_id"]]
    return [out]


def metrics(nll_sum: float, tokens: int, n_bytes: int, words: int) -> dict:
    """All the figures from the exact sums: nats/token, perplexity, bits per token/byte, byte and word perplexity."""
    ln2 = math.log(2)

    def ratio(n):
        return nll_sum / n if n else None

    def exp(x):
        return None if x is None else stats.exp_capped(x)

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
