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


def share(items: list, rank: int, world: int) -> list:
    """Every world-th item from `rank` on, padded with None to the longest share (every process takes as many steps)."""
    steps = -(-len(items) // world)
    mine = items[rank::world]
    return mine + [None] * (steps - len(mine))


def in_lockstep(plan: Plan, mine: list, work: Callable[[object], tuple[object, int, float]]) -> list | None:
    """This process's share worked through step by step (`work(step)` -> (output, tokens, NLL) for the progress bar);
    all processes' outputs, gathered in rank order, or None when a stop was asked for (by any process) before the
    last step. The chunk is then left unfinished: a resume scores it again."""
    accelerator = plan.accelerator
    world = accelerator.num_processes
    out = []
    for step, item in enumerate(mine):
        tokens, nll = 0, 0.0
        if item is not None:
            value, tokens, nll = work(item)
            out.append(value)
        flags = torch.tensor([tokens, nll, float(plan.stop.requested)], dtype=torch.float64)
        if world > 1:
            flags = accelerator.reduce(flags.to(accelerator.device), reduction="sum").cpu()
        plan.progress.update(int(flags[0]), float(flags[1]))
        if flags[2] > 0 and step + 1 < len(mine):
            return None
    return [x for part in gather(out, plan) for x in part]
