"""The Python API: `lm_ce.evaluate(model, tokenizer, data, **settings)` on objects already in memory.

The same run as the command line (lm_ce.runner.evaluate); the model is used as it is, where it is, and
given back in the train/eval modes it had (and with its mixed-precision wrapper, if any, which scoring sets
aside); the global RNG and thread count are restored too, and accelerate's process-wide state when lm_ce started
it. lm_ce is a guest here: no signal handler (a Ctrl-C reaches the caller as KeyboardInterrupt), no allocator,
logger or plotting-backend setting left behind.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from lm_ce import compat, runner
from lm_ce.config.fields import Config, resolve_path, with_protocol
from lm_ce.config.sources import from_settings
from lm_ce.data.reading import MEMORY
from lm_ce.errors import UsageError
from lm_ce.reports import files as report
from lm_ce.rundir import claims as outdir
from lm_ce.sums.records import Results

SOURCE = "lm_ce.evaluate"


def evaluate(model: torch.nn.Module, tokenizer, data=None, /, **settings) -> Results:
    """Exact perplexity and bits per byte of `model` on `data`: a list of strings (or of row dicts), a
    datasets.Dataset or IterableDataset (text in `text_field`), a file path, or None (the data the settings name).

    `settings` are Config fields (max_length=1024, mode="stream", output_dir="runs/x", ...); unknown ones are
    refused. Nothing is written unless output_dir is given; then the files of the command line are."""
    return evaluate_with(model, tokenizer, data, settings)


def evaluate_with(model: torch.nn.Module, tokenizer, data, settings: dict, *, accelerator=None) -> Results:
    """`evaluate`, sharing the work with the processes of `accelerator` (a Trainer's) when given."""
    check_objects(model, tokenizer, SOURCE)
    rows, settings = data_settings(data, settings)
    cfg = from_settings({"model": name_of(model), **settings}, SOURCE)
    if rows is not None and cfg.resume:
        raise UsageError(f"{SOURCE}: resume=True needs data read from files or the Hub, not rows in memory")
    runner.prepare(cfg)  # the checks the claim's advice needs first (evaluate finds them made)
    with kept_accelerate_state(accelerator), outdir.claim(cfg):  # held until the reports are written, as the CLI does
        with kept_state(model):
            results = runner.evaluate(cfg, model=model, tokenizer=tokenizer, rows=rows, accelerator=accelerator)
        if cfg.output_dir and _main_process(accelerator):
            report.write(results, cfg.output_dir, plot=cfg.plot, page=cfg.page)
    return results


def check_objects(model, tokenizer, source: str) -> None:
    """A loaded model and tokenizer, not their names: lm_ce.evaluate scores objects in memory (the command line's
    --model loads one by name)."""
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{source}: model must be a loaded model (a torch.nn.Module, e.g. "
                         f"AutoModelForCausalLM.from_pretrained(...)), got {_kind(model)}; to load one by name, use the "
                         "command line's --model")
    check_tokenizer(tokenizer, source)


def check_tokenizer(tokenizer, source: str) -> None:
    """A tokenizer object (AutoTokenizer.from_pretrained(...)), not its name or None."""
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)) or not callable(tokenizer):
        raise UsageError(f"{source}: tokenizer must be the model's tokenizer (AutoTokenizer.from_pretrained(...)), got "
                         f"{_kind(tokenizer)}")


def _kind(value) -> str:
    return "None" if value is None else f"{value!r}"[:60] if isinstance(value, (str, os.PathLike)) else (
        f"a {type(value).__name__}")


def data_settings(data, settings: dict) -> tuple[object | None, dict]:
    """(rows to read in memory or None, settings with the data's fields): a path becomes data_files."""
    if data is None:
        return None, settings
    if "data_files" in settings:
        raise UsageError(f"{SOURCE}: data is given, so leave out data_files")
    if isinstance(data, (str, os.PathLike)):
        if not Path(resolve_path(str(data))).is_file():
            raise UsageError(
                f"{SOURCE}: data {str(data)[:80]!r} is no file; give a list of strings for texts, or the path of "
                "a .jsonl, .json, .txt, .csv or .parquet file"
            )
        return None, {**settings, "data_files": [str(data)]}
    if settings.get("dataset", MEMORY) != MEMORY:
        raise UsageError(f"{SOURCE}: data is given in memory, so leave out dataset")
    text_field = with_protocol(settings).get("text_field", Config.text_field)  # lm-eval-wikitext's is "page"
    if isinstance(data, (list, tuple)):
        if not all(isinstance(item, (str, Mapping)) for item in data):
            raise UsageError(f"{SOURCE}: data must be a list of strings (texts) or of dicts (rows with '{text_field}')")
        rows = [item if isinstance(item, Mapping) else {text_field: item} for item in data]
    elif _is_dataset(data):
        rows = data
    else:
        raise UsageError(
            f"{SOURCE}: data is a {type(data).__name__}; give a list of strings, a datasets.Dataset or "
            "IterableDataset, or a file path (an iterator would be used up after one run)"
        )
    return rows, {**settings, "dataset": MEMORY, "dataset_config": None}


def _is_dataset(data) -> bool:
    import datasets

    return isinstance(data, (datasets.Dataset, datasets.IterableDataset))


def name_of(model: torch.nn.Module) -> str:
    """How the model is named in the report: where it was loaded from, else its class."""
    return getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None) or type(model).__name__


@contextlib.contextmanager
def kept_state(model: torch.nn.Module) -> Iterator[None]:
    """Give back the model's train/eval mode of every module, the global RNG state and the thread count."""
    modes = [(module, module.training) for module in model.modules()]
    threads = torch.get_num_threads()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices), plain_forward(model):
            yield
    finally:
        for module, training in modes:
            module.training = training
        torch.set_num_threads(threads)


@contextlib.contextmanager
def kept_accelerate_state(accelerator) -> Iterator[None]:
    """accelerate's process-wide states (PartialState, AcceleratorState, GradientState) given back as they were when
    lm_ce starts its own Accelerator (no `accelerator` given): one left started would make the caller's later
    Accelerator(mixed_precision="bf16") fail ("already initialized ... restart your runtime")."""
    if accelerator is not None:  # a Trainer's: its state is the caller's own
        yield
        return
    from accelerate.state import AcceleratorState, GradientState, PartialState

    kept = [(cls._shared_state, dict(cls._shared_state)) for cls in (PartialState, AcceleratorState, GradientState)]
    try:
        yield
    finally:
        for shared, before in kept:
            shared.clear()
            shared.update(before)


@contextlib.contextmanager
def plain_forward(model: torch.nn.Module) -> Iterator[None]:
    """The model without the autocast wrapper accelerate puts on a mixed-precision model's forward (a Trainer's
    with bf16/fp16), so the figures are those of the weights as they are, as the CLI computes them; put back after."""
    wrapped, original = model.__dict__.get("forward"), compat.original_forward(model)
    if original is None:
        yield
        return
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped


def _main_process(accelerator) -> bool:
    if accelerator is not None:
        return accelerator.is_main_process
    from accelerate import PartialState

    return PartialState().is_main_process
