"""The run: setup -> passes over the data -> scoring on every process -> summary.

Modules in data-flow order: config (what to run) -> data (documents) -> model (loading) -> setup (the
config resolved once) -> windows (sequences to windows to batches) -> scoring (one batch) -> parallel
(batches across processes, exact sums) -> passes (document and stream passes) -> compare (other models)
-> summary (results.json) -> report (files and tables). Device and process logic stays here and in parallel.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable

import torch

from . import checkpoint, model as model_lib, placement
from .compare import compare_by_bytes, load_compared
from .config import Config, UsageError, check
from .parallel import Plan
from .passes import run_documents, run_stream
from .progress import Progress, StopRequest
from .records import Results, Run
from .scoring import Scorer
from .setup import resolve, set_threads
from .summary import Durations, summarize

log = logging.getLogger("lm_ce")

EVENTS = ("loaded", "scoring", "scored")  # what on_event is called with, in this order


def evaluate(cfg: Config, *, model: torch.nn.Module | None = None, tokenizer=None, rows=None, accelerator=None,
             on_event: Callable[[str], None] | None = None) -> Results:
    """Score the configured data (or the `rows` given) with the configured model (or the one given); the
    summary is results.json. `accelerator`: the processes to share the work with (a Trainer's), else a new one.

    on_event(name) is called as each of EVENTS happens: after the model loads, when the scoring clock
    starts (after the head probe and the compared models), and when scoring ends (for benchmarks)."""
    from accelerate import Accelerator

    emit = on_event or (lambda name: None)
    check(cfg)
    started = time.perf_counter()
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available() and not _other_accelerator())
    threads = set_threads(cfg, accelerator.num_processes, accelerator.device)
    torch.manual_seed(cfg.seed)
    state = _saved_state(cfg, accelerator.num_processes)
    model, tokenizer, info = _model(cfg, model, tokenizer, accelerator)
    emit("loaded")
    setup = resolve(cfg, model=model, tokenizer=tokenizer, info=info, device=_device_of(model),
                    processes=accelerator.num_processes, threads=threads)
    if cfg.compile:  # compiled per new input shape on first use; pays on long runs of similar batches
        model.base_model.compile(dynamic=True)
    compared = load_compared(cfg, tokenizer=tokenizer, setup=setup, accelerator=accelerator)
    scorer = Scorer(model, setup.head, setup.device, cfg.padding_side == "left", compared.same_tokens,
                    want_top1=cfg.save_tokens)
    accelerator.wait_for_everyone()  # processes finish loading at different times: scoring starts when all have
    emit("scoring")
    loaded = time.perf_counter()
    with StopRequest() as stop:
        plan = Plan(cfg, setup, scorer, accelerator, Progress(accelerator.is_main_process and cfg.progress), stop, rows)
        run = state["run"] if state else Run(tally=plan.new_tally())
        stopped = _passes(plan, run, tokenizer, done=bool(state and state.get("complete")))
    finished = time.perf_counter()
    emit("scored")
    if cfg.output_dir and accelerator.is_main_process:
        checkpoint.save(cfg.output_dir, checkpoint.state_of(cfg, run, setup.processes, complete=not stopped))
        if stopped:
            log.warning("progress saved in %s: rerun the same command with --resume to continue", cfg.output_dir)
    results = summarize(cfg, run=run, stopped=stopped, setup=setup, info=info, tokenizer=tokenizer,
                        durations=Durations(load=loaded - started, scoring=finished - loaded, total=finished - started))
    for name in compared.by_bytes:
        results.summary.setdefault("compare", {})[name] = compare_by_bytes(cfg, name, results.summary)
    return results


def _passes(plan: Plan, run: Run, tokenizer, done: bool) -> bool:
    """The pass the mode asks for, unless the saved run is complete. True when stopped early."""
    try:
        if done:
            log.info("the saved run in %s is complete: reporting it", plan.cfg.output_dir)
            return False
        if plan.cfg.mode == "document":
            return run_documents(plan, run, tokenizer)
        return run_stream(plan, run, tokenizer)
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
