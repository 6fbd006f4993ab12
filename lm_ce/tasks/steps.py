"""A chunk of a task's work shared by the processes: every process takes the same number of steps (its share,
padded), agreeing after each whether to stop, then their outputs are gathered; and what a finished chunk adds."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lm_ce.scoring.parallel import Plan, gather
from lm_ce.sums.records import DocSums, DocumentResult, WindowSums


@dataclass
class ChunkOut:
    """What a finished chunk adds to the run: its rows in order, their token sums, and its tables' columns."""

    results: list[DocumentResult]
    sums: dict[int, DocSums]
    windows: list[WindowSums]
    tables: dict[str, dict[str, list]] = field(default_factory=dict)
    surprisals: dict[int, list[float]] = field(default_factory=dict)  # surprisal: each document's words, in nats
    tokens_per_process: list[int] = field(default_factory=list)


def share(items: list, rank: int, world: int) -> list:
    """Every world-th item from `rank` on, padded with None to the longest share (every process takes as many steps)."""
    steps = -(-len(items) // world)
    mine = items[rank::world]
    return mine + [None] * (steps - len(mine))


def in_lockstep(plan: Plan, mine: list, work: Callable[[object], tuple[object, int, float]]) -> tuple[list, list] | None:
    """This process's share worked through step by step (`work(step)` -> (output, tokens, NLL) for the progress bar):
    (all processes' outputs in rank order, each process's tokens), or None when a stop was asked for (by any process)
    before the last step. The chunk is then left unfinished: a resume scores it again."""
    accelerator = plan.accelerator
    world = accelerator.num_processes
    out, scored = [], 0
    for step, item in enumerate(mine):
        tokens, nll = 0, 0.0
        if item is not None:
            value, tokens, nll = work(item)
            out.append(value)
            scored += tokens
        flags = torch.tensor([tokens, nll, float(plan.stop.requested)], dtype=torch.float64)
        if world > 1:
            flags = accelerator.reduce(flags.to(accelerator.device), reduction="sum").cpu()
        plan.progress.update(int(flags[0]), float(flags[1]))
        if flags[2] > 0 and step + 1 < len(mine):
            return None
    parts = gather((out, scored), plan)
    return [x for part, _ in parts for x in part], [n for _, n in parts]
