"""What lm_ce borrows from other libraries' internals, in one place. Each use is checked against the releases it was
written and tested for (RANGES) and against the attribute being there; outside them, or when the internal is gone,
the public path is taken, which gives the same figures (at some cost in memory or speed, or a note left unsaid).

May import: errors.
"""
from __future__ import annotations

import functools
import importlib.metadata
import inspect
import re
import types

# [oldest, newest) release of each library whose internals below are known; pyproject.toml holds the oldest.
RANGES = {
    "datasets": ((2, 19), (6, 0)),  # ArrowReader.get_file_instructions, Dataset._indices, its Arrow stream files
    "transformers": ((4, 56), (6, 0)),  # the vocabulary and merges a fast tokenizer keeps after building (5.x)
    "accelerate": ((1, 1), (2, 0)),  # a module's _hf_hook, a mixed-precision model's _original_forward
    "torch": ((2, 4), (3, 0)),  # torch.ops.mkldnn's half-precision support probes
}
_MISSING = object()


def release(library: str) -> tuple[int, int] | None:
    """(major, minor) of an installed library, or None when it is not installed or its version is not X.Y..."""
    try:
        found = re.match(r"(\d+)\.(\d+)", importlib.metadata.version(library))
    except importlib.metadata.PackageNotFoundError:
        return None
    return (int(found[1]), int(found[2])) if found else None


@functools.cache
def _within(library: str, low: tuple[int, int], high: tuple[int, int]) -> bool:
    version = release(library)
    return version is not None and low <= version < high


def within(library: str) -> bool:
    """Whether the installed `library` is a release whose internals lm_ce reads (RANGES)."""
    return _within(library, *RANGES[library])


# datasets: the Arrow files of a prepared split, read a record batch at a time (data/arrow.py, data/reading.py)
def file_instructions(prepared) -> list[dict] | None:
    """datasets' file instructions for a prepared builder's train split ({'filename', 'skip', 'take'} each), or
    None: then the split is read through `as_dataset`, the public path."""
    if not within("datasets"):
        return None
    try:
        from datasets.arrow_reader import ArrowReader

        return ArrowReader(prepared.cache_dir, prepared.info).get_file_instructions(
            prepared.dataset_name, "train", prepared.info.splits.values())
    except (ImportError, AttributeError, TypeError):  # renamed, moved or its signature changed
        return None


DATASET_INDICES = "_indices"  # a Dataset's selection or shuffle over its files' rows (None: none)


def plain_files(dataset) -> bool:
    """Whether a datasets.Dataset's rows are its Arrow files' rows in order (no selection or shuffle on top), as
    datasets' private `_indices` tells; False when that cannot be known (the Dataset is then iterated)."""
    if not within("datasets"):
        return False
    return getattr(dataset, DATASET_INDICES, _MISSING) is None


def arrow_streams() -> bool:
    """Whether datasets' cache files can be read as Arrow IPC streams directly (the format its ArrowWriter writes)."""
    return within("datasets")


# transformers / tokenizers: tables a fast tokenizer keeps after building its Rust tokenizer (model/load.py)
BUILD_TABLES = ("_vocab", "_merges", "_vocab_scores")


def drop_build_tables(tokenizer) -> list[str]:
    """Delete the Python vocabulary and merge list that transformers (5.x) keeps on a fast tokenizer after building
    its Rust tokenizer from them (125 MB at Gemma-3's 262k vocabulary; nothing reads them again). The names dropped;
    none outside RANGES (they are kept: more memory, the same tokens)."""
    if not within("transformers") or not getattr(tokenizer, "is_fast", False):
        return []
    if getattr(tokenizer, "backend_tokenizer", None) is None:  # the Rust tokenizer is not built
        return []
    dropped = [name for name in BUILD_TABLES if name in vars(tokenizer)]
    for name in dropped:
        delattr(tokenizer, name)
    return dropped


# accelerate: where a placed module computes (model/placement.py), a mixed-precision wrapper (integrations/api.py)
def hook_of(module):
    """The accelerate hook on a module (its execution device says where it computes), or None: then the module's
    weights say where it computes."""
    return getattr(module, "_hf_hook", None) if within("accelerate") else None


def original_forward(model):
    """The forward under the autocast wrapper accelerate puts on a mixed-precision model (a Trainer's with
    bf16/fp16), or None when the model has none. Outside RANGES, or without accelerate's `_original_forward`, the
    wrapper is unwrapped through `__wrapped__`, which functools.wraps sets on each layer of it."""
    wrapped = model.__dict__.get("forward")
    if wrapped is None:
        return None
    if within("accelerate") and model.__dict__.get("_original_forward") is not None:
        return model.__dict__["_original_forward"]
    function = getattr(wrapped, "__func__", None)
    if function is None or getattr(function, "__wrapped__", None) is None:
        return None
    return types.MethodType(inspect.unwrap(function), model)


# torch: whether the CPU has half-precision kernels (scoring/setup.py)
def cpu_half_kernels(dtype) -> bool | None:
    """Whether oneDNN has fast kernels for a half-precision dtype on this CPU, or None when torch cannot tell
    (then nothing is said about it)."""
    import torch

    if not within("torch"):
        return None
    names = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}
    try:
        return bool(getattr(torch.ops.mkldnn, names[dtype])()) if dtype in names else True
    except (AttributeError, RuntimeError):
        return None
