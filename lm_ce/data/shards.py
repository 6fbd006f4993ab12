"""Shards: independent runs over every N-th chunk of the documents, for job arrays; `lm-ce merge` joins them.

A shard takes whole chunks (--chunk-documents consecutive documents), chunk c going to shard c % N. Each chunk
is planned and batched exactly as in one run over all documents, so every document's sums, and the merged
figures, are the same as that run's; document indices stay global.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from lm_ce.config.fields import Config
from lm_ce.errors import UsageError


@dataclass(frozen=True)
class Shard:
    index: int  # K, from 0
    count: int  # N

    def owns(self, chunk: int) -> bool:
        return chunk % self.count == self.index

    def chunk(self, j: int) -> int:
        """The index, among all the data's chunks, of this shard's j-th chunk (from 0)."""
        return self.index + j * self.count

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_of(cfg: Config) -> Shard | None:
    """The shard cfg.shard names: K/N, or auto from Slurm's array (SLURM_ARRAY_TASK_ID counted from
    SLURM_ARRAY_TASK_MIN, of SLURM_ARRAY_TASK_COUNT)."""
    if cfg.shard is None:
        return None
    if cfg.shard != "auto":
        k, n = (int(x) for x in cfg.shard.split("/"))
        return Shard(k, n)
    task, count, low = (os.environ.get(f"SLURM_ARRAY_TASK_{k}") for k in ("ID", "COUNT", "MIN"))
    if not _whole(task) or not _whole(count):
        raise UsageError("--shard auto reads SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT, which are not set (or not "
                         "whole numbers): run it in a Slurm array (sbatch --array=0-99), or give --shard K/N")
    if int(count) < 1:
        raise UsageError(f"--shard auto: SLURM_ARRAY_TASK_COUNT is {count}, no task at all; run it in a Slurm array "
                         "of at least one task (sbatch --array=0-99), or give --shard K/N")
    if low not in (None, "") and not _whole(low):
        raise UsageError(f"--shard auto: SLURM_ARRAY_TASK_MIN is {low!r}, not a whole number; run it in a Slurm "
                         "array, or give --shard K/N")
    k = int(task) - int(low or 0)
    if not 0 <= k < int(count):
        raise UsageError(f"--shard auto: SLURM_ARRAY_TASK_ID {task} is not one of {count} tasks counted from "
                         f"SLURM_ARRAY_TASK_MIN {low or 0}; use --array=0-{int(count) - 1} (consecutive ids), or "
                         "give --shard K/N")
    return Shard(k, int(count))


def _whole(value: str | None) -> bool:
    return value is not None and re.fullmatch(r"[0-9]+", value) is not None
