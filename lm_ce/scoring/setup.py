"""What the config resolves to once the model is known: one frozen record that the rest of the run reads.

Lengths, the prefix token, the batch token budget, threads and the head (chunked, or full logits when
the chunked head cannot reproduce the model: probe.probe_head) are each decided here, once; a model that is not
causal, and left padding that would change a model's figures, are refused here (probe.check_causal,
probe.check_left_padding).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from lm_ce import compat
from lm_ce.config.fields import Config
from lm_ce.config.protocols import PROTOCOLS
from lm_ce.config.sources import words_of
from lm_ce.model.load import ModelInfo, check_vocabulary
from lm_ce.scoring.head import Head, head_of
from lm_ce.scoring.probe import check_causal, check_left_padding, probe_head
from lm_ce.scoring.windows import adds_bos

log = logging.getLogger("lm_ce")

CPU_TOKEN_BUDGET = 4096  # measured on a 2-core CPU: larger batches of long windows run slower (cache)


@dataclass(frozen=True)
class Setup:
    """The settings of one run, resolved from the config and the model."""

    device: torch.device
    processes: int
    threads: int
    max_length: int
    stride: int
    prefix: int | None  # the token placed before each document (None: no prefix)
    budget: int  # padded input tokens per batch at most
    head: Head | None  # None: the output layer cannot be split, full logits are used
    head_note: str  # which head path and why, for results.json
    window_first: int | None = None  # the token put at every window's first input position (None: the text's own)


def resolve(cfg: Config, *, model: torch.nn.Module, tokenizer, info: ModelInfo, device: torch.device,
            processes: int, threads: int) -> Setup:
    """The run's settings: checked against the model (vocabulary, lengths, prefix) and probed (head)."""
    check_vocabulary(model, tokenizer, info.name)
    max_length, stride = resolve_lengths(cfg, info.max_positions)
    choice = probe_head(model, head_of(model), device)
    check_causal(model, device, info.name)
    if cfg.padding_side == "left" and cfg.batch_size > 1:
        check_left_padding(model, choice.head, device, info.name)
    if device.type == "cpu":
        note_cpu_half_precision(next(model.parameters()).dtype)
    prefix = prefix_id(cfg, tokenizer)
    return Setup(
        device=device,
        processes=processes,
        threads=threads,
        max_length=max_length,
        stride=stride,
        prefix=prefix,
        window_first=window_first_id(cfg, tokenizer, prefix),
        budget=cfg.token_budget or default_budget(cfg.batch_size, max_length, device),
        head=choice.head,
        head_note=choice.note,
    )


def resolve_lengths(cfg: Config, positions: int | None) -> tuple[int, int]:
    """(max_length, stride): the model's positions at most 2048 by default; never beyond them (checks.check_positions
    refused those once the model loaded)."""
    max_length = cfg.max_length or min(positions or 2048, 2048)
    stride = cfg.stride or (max(1, max_length // 2) if PROTOCOLS[cfg.protocol].half_stride else max_length)
    return max_length, stride


def prefix_id(cfg: Config, tokenizer) -> int | None:
    """The token placed before each document so its first token is predicted too (document mode by
    default; stream mode only when asked; llama-cpp and gptq modes never: BOS is where the tokenizer puts it)."""
    if cfg.mode in ("llama-cpp", "gptq") or cfg.bos_policy == "none":
        return None
    if cfg.prefix_token == "auto" and cfg.mode == "stream":
        return None
    return _token(cfg, tokenizer)


def window_first_id(cfg: Config, tokenizer, prefix: int | None) -> int | None:
    """The token every window's first input position holds: the prefix token with --bos-policy
    every-window; BOS in llama-cpp chunks when the tokenizer adds BOS (llama-perplexity's rule); else none."""
    if cfg.bos_policy == "every-window":
        return prefix if prefix is not None else _token(cfg, tokenizer)
    if cfg.mode == "llama-cpp" and adds_bos(tokenizer):
        return tokenizer.bos_token_id
    return None


def _token(cfg: Config, tokenizer) -> int | None:
    """The token --prefix-token names (auto: BOS, else EOS), or a UsageError when the tokenizer has none."""
    choice = cfg.prefix_token
    if choice == "auto":
        choice = "bos" if tokenizer.bos_token_id is not None else "eos"
    if choice == "none":
        return None
    token = tokenizer.bos_token_id if choice == "bos" else tokenizer.eos_token_id
    w = words_of(cfg)
    if token is None and cfg.prefix_token == "auto":
        raise w.error(
            f"{w('prefix_token', 'auto')}: the tokenizer has neither a BOS nor an EOS token; use "
            f"{w('prefix_token', 'none')} (then the first token of each document is context, not scored)"
        )
    if token is None:
        raise w.error(f"{w('prefix_token', choice)}: the tokenizer has no {choice.upper()} token; use "
                      f"{w('prefix_token', 'none')}")
    return token


def default_budget(batch_size: int, max_length: int, device: torch.device) -> int:
    """Input tokens per batch: batch_size full windows on accelerators, at most CPU_TOKEN_BUDGET on CPUs."""
    budget = batch_size * max_length
    return min(budget, CPU_TOKEN_BUDGET) if device.type == "cpu" else budget


def set_threads(cfg: Config, world: int, device: torch.device) -> int:
    """Intra-op threads: as asked, else (on CPU, unless OMP_NUM_THREADS is set) the cores available to this
    process divided among the processes on this machine, so that they do not oversubscribe the cores."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
        note_too_many_threads(cfg.threads, local, cpu_cores())
    elif device.type == "cpu" and (world > 1 or "OMP_NUM_THREADS" not in os.environ):
        torch.set_num_threads(max(1, cpu_cores() // local))
    return torch.get_num_threads()


def cpu_cores() -> int:
    """The CPU cores this process may run on (taskset and Slurm limit them), else the machine's."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


_said_threads = False


def note_too_many_threads(threads: int, processes: int, cores: int) -> None:
    """Say once (from the first process on this machine) when --threads asks for more threads than there are
    cores: the threads then compete for them, which is slower; the figures are the same."""
    global _said_threads
    if _said_threads or threads * processes <= cores or int(os.environ.get("LOCAL_RANK", 0)) != 0:
        return
    _said_threads = True
    each = f" for each of {processes} processes" if processes > 1 else ""
    log.warning("--threads %d%s is more than the %d CPU cores available: the threads compete for the cores (slower, "
                "same figures); use --threads %d or less", threads, each, cores, max(1, cores // processes))


_said_half_precision = False


def cpu_has_native(dtype: torch.dtype) -> bool | None:
    """Whether oneDNN has fast kernels for a half-precision dtype on this CPU (x86: AVX-512 or AMX; Arm: its
    BF16/FP16 extensions), or None when torch cannot tell. A cheap check: no arithmetic is timed."""
    return compat.cpu_half_kernels(dtype)


def note_cpu_half_precision(dtype: torch.dtype) -> None:
    """Say once when a model computes in a half precision this CPU has no native arithmetic for."""
    global _said_half_precision
    if _said_half_precision or dtype not in (torch.bfloat16, torch.float16) or cpu_has_native(dtype) is not False:
        return
    _said_half_precision = True
    name = str(dtype).replace("torch.", "")
    log.warning("this CPU has no native %s arithmetic: the model runs emulated, slower than --dtype float32 (about "
                "2x on an AVX2 CPU here), which is also the more exact: use --dtype float32", name)
