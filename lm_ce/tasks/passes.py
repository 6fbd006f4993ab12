"""The pass of a task other than perplexity: its rows read in chunks of --chunk-documents (every N-th chunk with
--shard K/N; a resume from its first unfinished chunk), each chunk's items or documents shared by the processes,
its rows, tables and sums added when it is finished, the progress saved as often as --checkpoint-seconds asks."""
from __future__ import annotations

import logging

from lm_ce.data.documents import iter_rows
from lm_ce.rundir.parts import TableParts
from lm_ce.scoring.parallel import Plan, save_if_due
from lm_ce.scoring.passes import chunks
from lm_ce.sums.records import Run, Tally
from lm_ce.sums.tasks import ChoiceSums, SurprisalSums
from lm_ce.tasks.choice import ChoiceScorer
from lm_ce.tasks.forward import BATCHED, ONE_BY_ONE, Body, probe_cache
from lm_ce.tasks.steps import ChunkOut
from lm_ce.tasks.words import WordScorer

log = logging.getLogger("lm_ce")


def run_task(plan: Plan, run: Run, tokenizer, tables: TableParts) -> bool:
    """Score the task's rows into the run; True when stopped early (the unfinished chunk is scored again on resume)."""
    cfg, setup = plan.cfg, plan.setup
    body = Body(plan.scorer.model, setup.head, setup.device)
    if cfg.task == "multiple-choice":
        mode, why = probe_cache(body)
        scoring = {BATCHED: "shared prefix", ONE_BY_ONE: f"shared prefix, one item at a time: {why}"}.get(
            mode, f"whole sequences: {why}")
        if why is not None and plan.accelerator.is_main_process:
            log.warning("the choices are read as %s", scoring)
        scorer = ChoiceScorer(body, tokenizer, cfg, setup.prefix, mode, setup.max_length, setup.budget)
        run.task = run.task or ChoiceSums()
        run.task.scoring = scoring
    else:
        scorer = WordScorer(body, plan.scorer, tokenizer, cfg, setup.prefix, setup.max_length, setup.stride, setup.budget)
        run.task = run.task or SurprisalSums()
    tables.start(run.chunks_done)
    first = plan.shard.chunk(run.chunks_done) if plan.shard else run.chunks_done
    source = iter_rows(cfg, plan.rows, start=first * cfg.chunk_documents, read=plan.read)
    for c, rows in enumerate(chunks(source, cfg.chunk_documents), start=first):
        if plan.shard and not plan.shard.owns(c):
            continue
        out = scorer.score_chunk(rows, plan)
        if out is None:
            return True
        add_chunk(plan, run, out, tables)
    return False


def add_chunk(plan: Plan, run: Run, out: ChunkOut, tables: TableParts) -> None:
    """A finished chunk into the run: its rows (documents.jsonl), tables, token sums and task sums; then a save when
    one is due."""
    plan.settled = False  # a KeyboardInterrupt from here to chunk_added leaves the last save standing
    run.sums.add(Tally(docs=out.sums, windows=out.windows))
    plan.outputs.add_chunk(run, out.results)
    tables.add(run.chunks_done, out.tables)
    for r in out.results:
        run.rows.add(r)
        if r.task is not None and isinstance(run.task, ChoiceSums):
            run.task.add(r.task)
        elif r.task is not None:
            run.task.add(out.surprisals[r.index], r.tokens, r.task.sentences)
    run.windows += len(out.windows)
    done = run.tokens_per_process or [0] * len(out.tokens_per_process)
    run.tokens_per_process = [a + b for a, b in zip(done, out.tokens_per_process)]
    run.chunks_done += 1
    plan.chunk_added()
    save_if_due(plan, run)

