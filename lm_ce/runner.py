"""The run: setup -> passes over the data -> scoring on every process -> summary.

Modules in data-flow order: config (what to run) -> data (documents) -> model (loading) -> setup (the
config resolved once) -> windows (sequences to windows to batches) -> scoring (one batch) -> parallel
(batches across processes, exact sums) -> longppl (each chunk's key tokens) -> passes (document and stream
passes) -> compare (other models) -> summary (results.json) -> report (files and tables). Device and process
logic stays here and in parallel.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lm_ce.analysis.compare import compare_by_bytes, load_compared
from lm_ce.analysis.curve import check_lengths, context_curve
from lm_ce.analysis.longppl import load_evaluator
from lm_ce.config.checks import check
from lm_ce.config.fields import Config
from lm_ce.data.shards import shard_of
from lm_ce.errors import UsageError
from lm_ce.model import load as model_lib
from lm_ce.model import placement
from lm_ce.reports.summary import Durations, summarize
from lm_ce.rundir import checkpoint
from lm_ce.rundir import claims as outdir
from lm_ce.rundir.outputs import Outputs
from lm_ce.rundir.parts import TABLES, TableParts
from lm_ce.scoring.parallel import Plan
from lm_ce.scoring.passes import reuse_freed_memory, run_chunks, run_documents, run_stream
from lm_ce.scoring.progress import Progress, StopRequest
from lm_ce.scoring.scorer import Scorer
from lm_ce.scoring.setup import resolve, set_threads
from lm_ce.suite import check_suite, run_suite
from lm_ce.sums.extremes import Extremes, for_resumed_run
from lm_ce.sums.records import Results, Run
from lm_ce.tasks.passes import run_task

log = logging.getLogger("lm_ce")

EVENTS = ("loaded", "scoring", "scored")  # what on_event is called with, in this order


def evaluate(cfg: Config, *, model: torch.nn.Module | None = None, tokenizer=None, rows=None, accelerator=None,
             on_event: Callable[[str], None] | None = None) -> Results:
    """Score the configured data (or the `rows` given) with the configured model (or the one given); the
    summary is results.json. `accelerator`: the processes to share the work with (a Trainer's), else a new one.
    A config with a suite scores each of its datasets in turn with this one model (see suite.py).

    on_event(name) is called as each of EVENTS happens: after the model loads, when the scoring clock
    starts (after the head probe and the compared models), and when scoring ends (for benchmarks)."""
    from accelerate import Accelerator

    emit = on_event or (lambda name: None)
    check(cfg)
    check_suite(cfg)
    started = time.perf_counter()
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available() and not _other_accelerator())
    with outdir.claim(cfg):  # checked and locked before anything loads; released at the end, also on error
        threads = set_threads(cfg, accelerator.num_processes, accelerator.device)
        torch.manual_seed(cfg.seed)
        state = None if cfg.suite else _saved_state(cfg, accelerator.num_processes)
        model, tokenizer, info = _model(cfg, model, tokenizer, accelerator)
        emit("loaded")
        loaded = Loaded(model, tokenizer, info, accelerator, threads)
        if cfg.suite:
            return run_suite(cfg, lambda entry: _score_entry(entry, loaded, emit))
        return _score(cfg, loaded, state, started, emit, rows)


@dataclass(frozen=True)
class Loaded:
    """The model once loaded, and the processes: shared by every dataset of a suite."""

    model: torch.nn.Module
    tokenizer: object
    info: model_lib.ModelInfo
    accelerator: object  # accelerate.Accelerator
    threads: int


def _score_entry(cfg: Config, loaded: Loaded, emit: Callable[[str], None]) -> Results:
    """One dataset of a suite, in its own output directory (claimed as a run's is)."""
    with outdir.claim(cfg):
        return _score(cfg, loaded, _resumable(cfg, loaded.accelerator.num_processes), time.perf_counter(), emit)


def _score(cfg: Config, loaded: Loaded, state: dict | None, started: float, emit: Callable[[str], None],
           rows=None) -> Results:
    """One dataset (the configured one, or the `rows` given) scored with the loaded model: setup, passes, state
    saved, summary."""
    model, tokenizer, accelerator = loaded.model, loaded.tokenizer, loaded.accelerator
    setup = resolve(cfg, model=model, tokenizer=tokenizer, info=loaded.info, device=_device_of(model),
                    processes=accelerator.num_processes, threads=loaded.threads)
    if cfg.context_curve:
        check_lengths(cfg.context_curve, loaded.info.max_positions)
    if cfg.compile:  # compiled per new input shape on first use; pays on long runs of similar batches
        model.base_model.compile(dynamic=True)
    compared = load_compared(cfg, tokenizer=tokenizer, setup=setup, accelerator=accelerator)
    shows = shows_documents(cfg)
    scorer = Scorer(model, setup.head, setup.device, cfg.padding_side == "left", compared.same_tokens,
                    want_top1=cfg.save_tokens or shows, want_signals=cfg.min_k is not None)
    evaluator = load_evaluator(cfg, setup=setup, scorer=scorer, tokenizer=tokenizer, accelerator=accelerator)
    accelerator.wait_for_everyone()  # processes finish loading at different times: scoring starts when all have
    emit("scoring")
    loaded_at = time.perf_counter()
    progress = Progress(accelerator.is_main_process and cfg.progress, main=accelerator.is_main_process)
    shard = shard_of(cfg)
    outputs = Outputs(Path(cfg.output_dir) if cfg.output_dir else None, accelerator.is_main_process,
                      cfg.mode == "document", tokenizer, save_tokens=cfg.save_tokens)
    tables = TableParts(outputs.directory, accelerator.is_main_process, TABLES[cfg.task])  # words.parquet and the like
    with StopRequest() as stop:
        plan = Plan(cfg, setup, scorer, accelerator, progress, stop, rows, outputs=outputs, shard=shard,
                    evaluator=evaluator)
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
            checkpoint.save(cfg.output_dir, checkpoint.state_of(cfg, run, setup.processes, complete=False))
        try:
            stopped = _passes(plan, run, tokenizer, tables, done=bool(state and state.get("complete")))
        finally:
            outputs.close()
        finished = time.perf_counter()  # the run's timing; the curve times itself (context_curve.seconds)
        curve = context_curve(plan, tokenizer) if cfg.context_curve and not stopped else None
    emit("scored")
    if cfg.output_dir and accelerator.is_main_process:
        checkpoint.save(cfg.output_dir, checkpoint.state_of(cfg, run, setup.processes, complete=not stopped))
        if stopped:
            log.warning("progress saved in %s: rerun the same command with --resume to continue", cfg.output_dir)
    durations = Durations(load=loaded_at - started, scoring=finished - loaded_at, total=finished - started)
    results = summarize(cfg, run=run, stopped=stopped, setup=setup, info=loaded.info,
                        durations=durations, outputs=outputs)
    results.tables, results.table_files = tables.results()
    if curve is not None:
        results.summary["context_curve"] = curve
    for name in compared.by_bytes:
        results.summary.setdefault("compare", {})[name] = compare_by_bytes(cfg, name, results, score=evaluate)
    return results


def shows_documents(cfg: Config) -> bool:
    """Whether the run keeps the tokens of results.html's documents of highest and lowest loss (document mode, with
    an output directory to write the page to)."""
    return bool(cfg.page and cfg.page_documents > 0 and cfg.mode == "document" and cfg.output_dir and cfg.task == "perplexity")


def _resumable(cfg: Config, processes: int) -> dict | None:
    """A suite dataset's saved state with --resume, when it has one (datasets not reached yet start afresh)."""
    if cfg.resume and cfg.output_dir and (Path(cfg.output_dir) / checkpoint.STATE).is_file():
        return _saved_state(cfg, processes)
    return None


def _passes(plan: Plan, run: Run, tokenizer, tables: TableParts, done: bool) -> bool:
    """The pass the mode (or the task) asks for, unless the saved run is complete. True when stopped early."""
    try:
        if done:
            log.info("the saved run in %s is complete: reporting it", plan.cfg.output_dir)
            return False
        reuse_freed_memory()
        if plan.cfg.task != "perplexity":
            return run_task(plan, run, tokenizer, tables)
        if plan.cfg.mode == "document":
            return run_documents(plan, run, tokenizer)
        if plan.cfg.mode == "stream":
            return run_stream(plan, run, tokenizer)
        return run_chunks(plan, run, tokenizer)
    except KeyboardInterrupt:
        log.warning("aborted: the figures cover the chunks finished before the stop")
        return True
    finally:
        plan.progress.close()


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
        # A download or a GGUF cache is made once, by the main process; a local directory is read by all at once.
        first = contextlib.nullcontext() if os.path.isdir(cfg.model) else accelerator.main_process_first()
        with first:
            return model_lib.load(cfg, accelerator.device, accelerator.is_main_process)
    model.eval()
    info = model_lib.ModelInfo(
        cfg.model, "object", cfg.model, cfg.revision, str(next(model.parameters()).dtype).replace("torch.", ""),
        model_lib.max_positions(model.config), sum(p.numel() for p in model.parameters()),
        device_map=placement.device_map_of(model),
    )
    return model, tokenizer, info


def _device_of(model: torch.nn.Module) -> torch.device:
    """Where a batch's inputs go: the input embedding's device (with a device map, its execution device)."""
    return placement.input_device(model)


def _other_accelerator() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
