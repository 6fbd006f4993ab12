"""Scoring windows on every process: the only module that knows about processes.

All processes plan the same batches; each scores its token-balanced share, taking the same number
of steps with one all-reduce per step (global progress, and the flags that save or stop every
process at the same batch); the chunk's float64 sums are gathered once and put in canonical order,
so the figures do not depend on the number of processes.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lm_ce.config.fields import Config
from lm_ce.data.shards import Shard
from lm_ce.rundir import checkpoint
from lm_ce.rundir.identity import Recorded
from lm_ce.rundir.outputs import Outputs
from lm_ce.scoring.bytespans import SpanMaker
from lm_ce.scoring.progress import Progress, StopRequest
from lm_ce.scoring.scorer import Scorer
from lm_ce.scoring.setup import Setup
from lm_ce.scoring.windows import Window, assign_batches, plan_batches
from lm_ce.sums import stats
from lm_ce.sums.divergence import Divergence
from lm_ce.sums.records import DocumentResult, Run, Tally

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class Plan:
    """The fixed parts of scoring: the config, its settings, the scorer, the processes, and what watches them."""

    cfg: Config
    setup: Setup
    scorer: Scorer
    accelerator: Accelerator
    progress: Progress
    stop: StopRequest
    rows: object = None  # rows given in memory (lm_ce.evaluate), read instead of what cfg names
    outputs: Outputs | None = None  # where finished rows and tokens go
    shard: Shard | None = None  # the share of the documents this run scores (--shard)
    evaluator: object = None  # longppl.Evaluator: finds each chunk's key tokens (--longppl-evaluator)
    identity: Recorded | None = None  # what the run reads, as its saved state records it
    byte_spans: SpanMaker | None = None  # each token's byte span kept for tokens.parquet (--save-tokens), else None
    last_save: float = field(default_factory=time.monotonic)
    # What a KeyboardInterrupt may save (from Python, where it arrives between any two bytecodes): the run's records
    # are consistent except while a finished chunk is added to them (`settled` False until the pass says it is
    # done), and a periodic save inside the current chunk holds newer progress than they do (`saved_inside`).
    settled: bool = True
    saved_inside: bool = False

    def chunk_added(self) -> None:
        """The pass has added a finished chunk to the run in full: its records are consistent again."""
        self.settled, self.saved_inside = True, False

    @property
    def read(self):
        """The data as the run recorded it (data.identity.DataIdentity), for reading.load_rows to check against."""
        return self.identity.data if self.identity else None

    def new_tally(self) -> Tally:
        return Tally(positions=stats.PositionLoss.zeros(self.setup.max_length),
                     compares=[Divergence() for _ in self.scorer.others])


def gather(obj, plan: Plan) -> list:
    """One object from every process, in rank order (just `[obj]` with one process)."""
    if plan.accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def score_windows(windows: list[Window], plan: Plan, run: Run, results: dict[int, DocumentResult]) -> bool:
    """Each process scores its share of the batches; the chunk's sums are gathered and added to the run
    and to `results` (by document index). True when stopped inside."""
    accelerator, world = plan.accelerator, plan.accelerator.num_processes
    batches = plan_batches(windows, batch_size_for(plan.cfg.batch_size, len(windows), world), plan.setup.budget)
    resumed = run.partial or plan.new_tally()
    done_before = set(resumed.batches_done)
    todo = [i for i in range(len(batches)) if i not in done_before]
    shares = assign_batches([batches[i] for i in todo], world) if todo else [[] for _ in range(world)]
    ids_of = {id(batches[i]): i for i in todo}
    mine = shares[share_of(accelerator.process_index, shares, run.tokens_per_process)]
    tally = plan.new_tally()
    costs = plan.progress.costs  # each step's cost over every process's batch, for the time left
    step_costs = [sum(costs.batch(share[step] or []) for share in shares) if costs else 0.0 for step in range(len(mine))]
    plan.progress.add_total(sum(w.n_scored for w in windows), resumed.tokens, sum(step_costs))
    stopped = False
    for step, batch in enumerate(mine):
        tokens, nll = 0, 0.0
        if batch is not None:
            sums = plan.scorer.score(batch, tally)
            tokens, nll = sums.tokens, sums.nll
            tally.batches_done.append(ids_of[id(batch)])
        flags = torch.tensor([tokens, nll, _save_due(plan), float(plan.stop.requested)], dtype=torch.float64)
        if world > 1:
            flags = accelerator.reduce(flags.to(accelerator.device), reduction="sum").cpu()
        plan.progress.update(int(flags[0]), float(flags[1]), step_costs[step])
        if flags[3] > 0 and step + 1 < len(mine):
            stopped = True
            break
        if flags[2] > 0 and step + 1 < len(mine):  # a periodic save inside the chunk
            _save_partial(plan, run, resumed, tally)
    return _add_chunk(plan, run, resumed, tally, stopped=stopped, windows=len(windows), results=results)


def _add_chunk(plan: Plan, run: Run, resumed: Tally, tally: Tally, *, stopped: bool, windows: int,
               results: dict[int, DocumentResult]) -> bool:
    """Gather every process's tally of the chunk; a finished chunk's canonical sums go into the run and
    `results`, a stopped one is kept as the run's partial sums. Returns `stopped`."""
    parts = gather(tally, plan)
    plan.settled = False  # from here until the pass calls chunk_added
    merged = resumed
    for part in parts:  # rank order: the same sums on every process
        merged.merge(part)
    done = run.tokens_per_process or [0] * len(parts)
    run.tokens_per_process = [a + p.tokens for a, p in zip(done, parts)]
    if stopped:
        run.partial = merged
        plan.settled = True
        return True
    run.partial = None
    canonical_sums(merged)
    for index, sums in merged.docs.items():
        results[index].nll_sum += sums.nll
        results[index].tokens += sums.tokens
    run.sums.add(merged)  # folded into running sums: the run keeps no per-document or per-window record
    merged.docs, merged.windows, merged.batches_done = {}, [], []
    run.tally.merge(merged)  # positions, compared models, padding; the chunk's token blocks, for the caller to write
    run.windows += windows
    return False


def batch_size_for(batch_size: int, n_windows: int, world: int) -> int:
    """Smaller batches when there are few windows for many processes, so none is left idle (this changes
    batch composition, hence float rounding, against a single-process run; the tokens stay the same)."""
    if world == 1:
        return batch_size
    return max(1, min(batch_size, -(-n_windows // (2 * world))))


def share_of(rank: int, shares: list, done: list[int]) -> int:
    """Which share this process takes: the heaviest goes to the process with the fewest tokens so far
    (ties: the lower rank), so that many small chunks do not each give process 0 the most work."""
    world = len(shares)
    done = done if len(done) == world else [0] * world
    heavy = sorted(range(world), key=lambda s: (-sum(w.n_scored for b in shares[s] if b for w in b), s))
    light = sorted(range(world), key=lambda r: (done[r], r))
    return heavy[light.index(rank)]


def canonical_sums(tally: Tally) -> None:
    """Each document's NLL summed over its windows in target order, whichever process scored them: the
    same float64 sums with any number of processes (merging per-process sums would round differently)."""
    tally.windows.sort(key=lambda w: (w.doc, w.first_target))
    sums: dict[int, float] = {}
    for w in tally.windows:
        sums[w.doc] = sums.get(w.doc, 0.0) + w.nll
    for index, total in sums.items():
        tally.docs[index].nll = total


def _save_due(plan: Plan) -> float:
    """1.0 on the main process when a periodic save is due (summed over processes, so all see it)."""
    if not plan.cfg.output_dir or not plan.accelerator.is_main_process:
        return 0.0
    if time.monotonic() - plan.last_save < plan.cfg.checkpoint_seconds:
        return 0.0
    plan.last_save = time.monotonic()
    return 1.0


def _save_partial(plan: Plan, run: Run, resumed: Tally, tally: Tally) -> None:
    """Save the run with the current chunk's progress so far (collective: every process calls it)."""
    parts = gather(tally, plan)
    if plan.accelerator.is_main_process:
        merged = copy.deepcopy(resumed)
        for part in parts:
            merged.merge(part)
        snapshot = dataclasses.replace(run, partial=merged)
        checkpoint.save(plan.cfg.output_dir, unfinished_state(plan, snapshot))
        plan.saved_inside = True


def save_if_due(plan: Plan, run: Run) -> None:
    """Between chunks of a pass whose sums every process holds alike (--context-curve): the main process saves the
    run when a periodic save is due."""
    if plan.accelerator.is_main_process and _save_due(plan):
        checkpoint.save(plan.cfg.output_dir, unfinished_state(plan, run))


def unfinished_state(plan: Plan, run: Run) -> dict:
    """The state of a run not finished yet, with what it read."""
    header = plan.identity.header() if plan.identity else None
    return checkpoint.state_of(plan.cfg, run, plan.setup.processes, complete=False, identity=header)
