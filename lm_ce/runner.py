"""The run: setup -> passes over the data -> scoring on every process -> summary.

Modules in data-flow order: config (what to run) -> data (documents) -> model (loading) -> setup (the
config resolved once) -> windows (sequences to windows to batches) -> scoring (one batch) -> parallel
(batches across processes, exact sums) -> longppl (each chunk's key tokens) -> passes (document and stream
passes) -> compare (other models) -> summary (results.json) -> report (files and tables). Device and process
logic stays here and in parallel.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from lm_ce.analysis.compare import compare_by_bytes, load_compared
from lm_ce.analysis.curve import context_curve
from lm_ce.analysis.longppl import load_evaluator
from lm_ce.config.checks import check_positions, checked
from lm_ce.config.fields import Config
from lm_ce.config.sources import entry_config, entry_words, words_of
from lm_ce.config.values import note, noted
from lm_ce.data.identity import DataIdentity
from lm_ce.data.reading import quiet_datasets
from lm_ce.data.shards import shard_of
from lm_ce.errors import UsageError
from lm_ce.model import load as model_lib
from lm_ce.model import fingerprint, placement
from lm_ce.reports.summary import Durations, record_identity, summarize
from lm_ce.rundir import checkpoint
from lm_ce.rundir import claims as outdir
from lm_ce.rundir.identity import Recorded, check_resume, model_record
from lm_ce.rundir.outputs import Outputs
from lm_ce.rundir.parts import TABLES, TableParts
from lm_ce.scoring.bytespans import SpanMaker
from lm_ce.scoring.parallel import Plan, unfinished_state
from lm_ce.scoring.passes import keep_freed_blocks, run_chunks, run_documents, run_stream
from lm_ce.scoring.progress import Costs, Progress, StopRequest
from lm_ce.scoring.scorer import Scorer
from lm_ce.scoring.setup import resolve, set_threads
from lm_ce.suite import check_suite, run_suite
from lm_ce.sums.bytegap import user_classes
from lm_ce.sums.extremes import Extremes, for_resumed_run
from lm_ce.sums.records import Results, Run
from lm_ce.tasks.passes import run_task

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("lm_ce")

T = TypeVar("T")
EVENTS = ("loaded", "scoring", "scored")  # what on_event is called with, in this order


def evaluate(cfg: Config, *, model: torch.nn.Module | None = None, tokenizer=None, rows=None, accelerator=None,
             on_event: Callable[[str], None] | None = None, owns_process: bool = False) -> Results:
    """Score the configured data (or the `rows` given) with the configured model (or the one given); the
    summary is results.json. `accelerator`: the processes to share the work with (a Trainer's), else a new one.
    A config with a suite scores each of its datasets in turn with this one model (see suite.py).

    owns_process: the caller owns the process (the command line, the benchmark's children): Ctrl-C and SIGTERM
    save and stop the run at the next batch (a second Ctrl-C aborts it) and glibc keeps freed blocks for reuse.
    Otherwise lm_ce is a guest: no signal handler, a Ctrl-C reaches the caller as KeyboardInterrupt once what is
    consistent is saved, and the allocator is left as it is.

    on_event(name) is called as each of EVENTS happens: after the model loads, when the scoring clock
    starts (after the head probe and the compared models), and when scoring ends (for benchmarks)."""
    emit = on_event or (lambda name: None)
    if noted(cfg, "prepared"):  # by the caller, just before it claimed the output directory
        note(cfg, prepared=False)
    else:
        prepare(cfg)
    started = time.perf_counter()
    accelerator = accelerator or _accelerator()
    with outdir.claim(cfg):  # checked and locked before anything loads; released at the end, also on error
        threads = set_threads(cfg, accelerator.num_processes, accelerator.device)
        torch.manual_seed(cfg.seed)
        state = None if cfg.suite else _saved_state(cfg, accelerator.num_processes)
        read = None if cfg.suite else _data_read(cfg, state, in_memory=rows is not None)  # checked before loading
        model, tokenizer, info = _model(cfg, model, tokenizer, accelerator)
        fits(cfg, info.max_positions)
        emit("loaded")
        loaded = Loaded(model, tokenizer, info, accelerator, threads, owns_process)
        if cfg.suite:
            return run_suite(cfg, lambda entry: _score_entry(entry, loaded, emit))
        return _score(cfg, loaded, state, read, started, emit, rows)


def prepare(cfg: Config) -> None:
    """Every check that needs no model: the settings (once per Config), each suite entry's data and directory. The
    command line and lm_ce.evaluate make them before they claim the output directory; the evaluate they call next
    finds them made."""
    checked(cfg)
    check_suite(cfg)
    user_classes(cfg.byte_classes, words_of(cfg)("byte_classes"))
    note(cfg, prepared=True)


def with_model(cfg: Config, work: Callable[[Callable[[Config], Results], Loaded], T], owns_process: bool = False) -> T:
    """Load cfg's model once and give `work` a function that scores any config with it, each in its own output
    directory, claimed and resumable as a suite entry's is (lm-ce explain's steps); what `work` returns.
    `owns_process` as for `evaluate`."""
    checked(cfg)
    accelerator = _accelerator()
    threads = set_threads(cfg, accelerator.num_processes, accelerator.device)
    torch.manual_seed(cfg.seed)
    model, tokenizer, info = _model(cfg, None, None, accelerator)
    loaded = Loaded(model, tokenizer, info, accelerator, threads, owns_process)

    def score(entry: Config) -> Results:
        check_positions(entry, info.max_positions, words_of(entry))
        return _score_entry(entry, loaded, lambda name: None)

    return work(score, loaded)


def fits(cfg: Config, positions: int | None) -> None:
    """The config, or every entry of its suite, checked against the model's positions before anything is scored."""
    if not cfg.suite:
        check_positions(cfg, positions, words_of(cfg))
    for number, entry in enumerate(cfg.suite or [], 1):
        check_positions(entry_config(cfg, entry), positions, entry_words(cfg, number, entry))


def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available() and not _other_accelerator())


@dataclass(frozen=True)
class Loaded:
    """The model once loaded, and the processes: shared by every dataset of a suite."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    info: model_lib.ModelInfo
    accelerator: Accelerator
    threads: int
    owns_process: bool = False  # the command line's: signal handlers, the allocator (see evaluate)


def _score_entry(cfg: Config, loaded: Loaded, emit: Callable[[str], None]) -> Results:
    """One dataset of a suite, in its own output directory (claimed as a run's is)."""
    with outdir.claim(cfg):
        state = _resumable(cfg, loaded.accelerator.num_processes)
        return _score(cfg, loaded, state, _data_read(cfg, state), time.perf_counter(), emit)


def _score(cfg: Config, loaded: Loaded, state: dict | None, read: DataIdentity, started: float,
           emit: Callable[[str], None], rows=None) -> Results:
    """One dataset (the configured one, or the `rows` given; `read`: the data as taken at the start) scored with
    the loaded model: setup, passes, state saved, summary."""
    model, tokenizer, accelerator = loaded.model, loaded.tokenizer, loaded.accelerator
    setup = resolve(cfg, model=model, tokenizer=tokenizer, info=loaded.info, device=_device_of(model),
                    processes=accelerator.num_processes, threads=loaded.threads)
    if cfg.compile:  # compiled per new input shape on first use; pays on long runs of similar batches
        model.base_model.compile(dynamic=True)
    compared = load_compared(cfg, tokenizer=tokenizer, setup=setup, accelerator=accelerator)
    shows = shows_documents(cfg)
    scorer = Scorer(model, setup.head, setup.device, cfg.padding_side == "left", compared.same_tokens,
                    want_top1=cfg.save_tokens or shows, want_signals=cfg.min_k is not None)
    evaluator = load_evaluator(cfg, setup=setup, scorer=scorer, tokenizer=tokenizer, accelerator=accelerator,
                               positions=loaded.info.max_positions)
    others = {**compared.models, **(evaluator.models if evaluator else {})}
    recorded = Recorded(read, {"model": model_record(loaded.info), **others})
    if state:  # every model the run reads, by content, as the run recorded it at its start
        check_resume(state["identity"], {"models": recorded.models}, cfg.output_dir)
    accelerator.wait_for_everyone()  # processes finish loading at different times: scoring starts when all have
    emit("scoring")
    loaded_at = time.perf_counter()
    progress = Progress(accelerator.is_main_process and cfg.progress, main=accelerator.is_main_process,
                        costs=Costs.of(model))
    shard = shard_of(cfg)
    outputs = Outputs(Path(cfg.output_dir) if cfg.output_dir else None, accelerator.is_main_process,
                      cfg.mode == "document", tokenizer, save_tokens=cfg.save_tokens)
    tables = TableParts(outputs.directory, accelerator.is_main_process, TABLES[cfg.task])  # words.parquet and the like
    with StopRequest(handle_signals=loaded.owns_process) as stop, quiet_datasets():
        plan = Plan(cfg, setup, scorer, accelerator, progress, stop, rows, outputs=outputs, shard=shard,
                    evaluator=evaluator, identity=recorded,
                    byte_spans=SpanMaker(tokenizer) if cfg.save_tokens else None)
        run = state["run"] if state else Run(tally=plan.new_tally(), shard=str(shard) if shard else None)
        if state:
            begun = run.chunks_done > 0 or run.partial is not None
            run.extremes = for_resumed_run(run.extremes, cfg.page_documents, begun) if shows else None
        elif shows:
            run.extremes = Extremes(cfg.page_documents)
        if state and run.shard != (str(shard) if shard else None):
            raise UsageError(f"--resume: {cfg.output_dir} holds shard {run.shard} of the documents, not "
                             f"{shard}; resume it as that shard, or use another --output-dir")
        outputs.start(run)
        if cfg.output_dir and accelerator.is_main_process and not state:  # lm_ce's marker before any row is written:
            # a stop before the first periodic save leaves a run that resumes, not files that look like a stranger's
            checkpoint.save(cfg.output_dir, checkpoint.state_of(cfg, run, setup.processes, complete=False,
                                                                identity=recorded.header()))
        if loaded.owns_process:
            keep_freed_blocks()
        try:
            try:
                stopped = _passes(plan, run, tokenizer, tables, done=bool(state and (state["complete"] or run.passes_done)))
            finally:
                outputs.close()
            run.passes_done = not stopped
            finished = time.perf_counter()  # the run's timing; the curve times itself (context_curve.seconds)
            if cfg.context_curve and not stopped:
                stopped = context_curve(plan, tokenizer, run)
        except KeyboardInterrupt:  # from Python (the command line's Ctrl-C is a stop: see StopRequest)
            _save_interrupted(plan, run)
            raise
        if read.streamed:  # read as it went: the figures are of the recorded content if no file changed meanwhile
            read.check_unchanged("as a stream")
    emit("scored")
    if cfg.output_dir and accelerator.is_main_process:
        checkpoint.save(cfg.output_dir, checkpoint.state_of(cfg, run, setup.processes, complete=not stopped,
                                                            identity=recorded.header()))
        if stopped:
            log.warning("progress saved in %s: rerun the same command with --resume to continue", cfg.output_dir)
    durations = Durations(load=loaded_at - started, scoring=finished - loaded_at, total=finished - started)
    results = summarize(cfg, run=run, stopped=stopped, setup=setup, info=loaded.info,
                        durations=durations, outputs=outputs)
    record_identity(results.summary, cfg, recorded.header())
    score = functools.partial(evaluate, owns_process=loaded.owns_process)  # stops as the run itself does
    results.tables, results.table_files = tables.results()
    for name in compared.by_bytes:
        results.summary.setdefault("compare", {})[name] = compare_by_bytes(cfg, name, results, score=score, rows=rows)
        results.summary["compare"][name]["model"] = compared.models[f"--compare-to {name}"]
    return results


def shows_documents(cfg: Config) -> bool:
    """Whether the run keeps the tokens of results.html's documents of highest and lowest loss (document mode, with
    an output directory to write the page to)."""
    return bool(cfg.page and cfg.page_documents > 0 and cfg.mode == "document" and cfg.output_dir and cfg.task == "perplexity")


def _resumable(cfg: Config, processes: int) -> dict | None:
    """A suite dataset's saved state with --resume, when it has one (datasets not reached yet start afresh)."""
    saved = [Path(cfg.output_dir or ".") / name for name in (checkpoint.STATE, checkpoint.LEGACY)]
    if cfg.resume and cfg.output_dir and any(p.is_file() for p in saved):
        return _saved_state(cfg, processes)
    return None


def _passes(plan: Plan, run: Run, tokenizer, tables: TableParts, done: bool) -> bool:
    """The pass the mode (or the task) asks for, unless the saved run is complete. True when stopped early."""
    try:
        if done:
            log.info("the saved run in %s has scored all its data: %s", plan.cfg.output_dir,
                     "going on with --context-curve" if plan.cfg.context_curve else "reporting it")
            return False
        if plan.cfg.task != "perplexity":
            return run_task(plan, run, tokenizer, tables)
        if plan.cfg.mode == "document":
            return run_documents(plan, run, tokenizer)
        if plan.cfg.mode == "stream":
            return run_stream(plan, run, tokenizer)
        return run_chunks(plan, run, tokenizer)
    except KeyboardInterrupt:
        if not plan.stop.handle_signals:  # a guest's Ctrl-C is the caller's
            raise
        log.warning("aborted: the figures cover the chunks finished before the stop")
        return True
    finally:
        plan.progress.close()


def _data_read(cfg: Config, state: dict | None, in_memory: bool = False) -> DataIdentity:
    """The data as this run reads it, taken now (local files hashed: remembered while unchanged); a resumed run's
    checked against what it recorded at its start (a Hub dataset is then read at the commit it started on)."""
    saved = state["identity"] if state else {}
    read = DataIdentity.taken(cfg, in_memory=in_memory, saved=saved.get("data"))
    if state:
        check_resume(saved, {"data": read.record()}, cfg.output_dir)
    return read


def _save_interrupted(plan: Plan, run: Run) -> None:
    """A KeyboardInterrupt from Python: save the run's progress when its records are consistent and newer than the
    last save (it may arrive while a finished chunk is added to them: the last save then stands)."""
    cfg, accelerator = plan.cfg, plan.accelerator
    if not cfg.output_dir or not accelerator.is_main_process:
        return
    if plan.settled and not plan.saved_inside:
        checkpoint.save(cfg.output_dir, unfinished_state(plan, run))
    log.warning("interrupted: progress saved in %s; evaluate again with resume=True to continue", cfg.output_dir)


def _saved_state(cfg: Config, processes: int) -> dict | None:
    """The state to resume from (with --resume), checked to be resumable with this many processes."""
    state = checkpoint.load(cfg) if cfg.resume else None
    if state and state["run"].partial is not None and state["processes"] != processes:
        raise UsageError(
            f"--resume: {cfg.output_dir} was stopped inside a chunk with {state['processes']} processes, whose batches "
            f"depend on that number; resume it with {state['processes']} processes"
        )
    return state


def _model(cfg: Config, model, tokenizer, accelerator) -> tuple[torch.nn.Module, object, model_lib.ModelInfo]:
    """(model, tokenizer, info): loaded as configured, or the objects given (put in eval mode; lm_ce.evaluate
    puts them back in the modes it found)."""
    if model is None:
        # A download or a GGUF cache is made once, by the main process; a local directory is read by all at once,
        # once the main process has hashed its weight files (the others then find the sha256 remembered on disk).
        first = contextlib.nullcontext() if os.path.isdir(cfg.model) else accelerator.main_process_first()
        if os.path.isdir(cfg.model) and accelerator.num_processes > 1:
            with accelerator.main_process_first():
                fingerprint.file_weights(cfg.model)
        with first:
            return model_lib.load(cfg, accelerator.device, accelerator.is_main_process)
    if cfg.attn_implementation:
        raise UsageError("attn_implementation applies to a model lm_ce loads; load this one with "
                         "attn_implementation=... (or call its set_attn_implementation) instead")
    model.eval()
    info = model_lib.ModelInfo(
        cfg.model, "object", cfg.model, cfg.revision, str(next(model.parameters()).dtype).replace("torch.", ""),
        model_lib.max_positions(model.config), sum(p.numel() for p in model.parameters()),
        device_map=placement.device_map_of(model), weights=_object_weights(cfg, model),
        tokenizer=fingerprint.tokenizer_fingerprint(tokenizer), attn_implementation=model_lib.attn_implementation(model),
    )
    return model, tokenizer, info


def _object_weights(cfg: Config, model: torch.nn.Module) -> dict:
    """A model object's fingerprint: its parameters' bytes hashed (1.1 s for 540 MB on 2 cores), where the run records
    it (an output directory: results.json, a resume); without one nothing is recorded, so nothing is spent."""
    if cfg.output_dir:
        return fingerprint.parameter_weights(model)
    return {"method": "parameters-sha256", "sha256": None,
            "note": "not computed: the run writes no output directory (output_dir) to record it in"}


def _device_of(model: torch.nn.Module) -> torch.device:
    """Where a batch's inputs go: the input embedding's device (with a device map, its execution device)."""
    return placement.input_device(model)


def _other_accelerator() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
