"""`lm-ce merge DIR... --output-dir OUT`: the report of a whole run from its shards (--shard K/N), without a model.

Each shard's saved state holds exact running sums, so the whole's figures are the shards' sums added: the
same tokens, NLL sum (float64, exactly rounded), clustered standard error, groups and context curve as one run
over all documents. Before anything is written, every shard's files are checked against its state (the rows,
bytes and sha256 of documents.jsonl; the rows of tokens.parquet), so that a missing or cut file is refused by
name rather than merged into a partial output. documents.jsonl and tokens.parquet are put back in document
order, a chunk at a time.
"""
from __future__ import annotations

import copy
import hashlib
import heapq
import json
from dataclasses import dataclass
from pathlib import Path

from lm_ce.config.fields import Config
from lm_ce.errors import UsageError
from lm_ce.files import atomic_path
from lm_ce.reports.figures import figures
from lm_ce.reports.summary import identity_of
from lm_ce.rundir import claims
from lm_ce.rundir import state as saved
from lm_ce.rundir.checkpoint import FINGERPRINTED, legacy_refusal
from lm_ce.rundir.claims import RUN_FILES
from lm_ce.rundir.identity import differences
from lm_ce.rundir.outputs import DOCUMENTS, TOKENS, DocumentRows
from lm_ce.rundir.parts import TABLES
from lm_ce.sums.extremes import Extremes
from lm_ce.sums.records import Results, Run, Tally

MODEL_KEYS = ("name", "revision", "dtype", "max_positions", "parameters")  # what makes two loads the same model
CURVE_KEYS = ("context_curve", "context_curve_divisor")  # a curve's sums add up only over the same lengths


@dataclass
class ShardRun:
    """One shard's directory, saved run and reported summary."""

    directory: Path
    run: Run
    config: dict
    summary: dict
    index: int
    count: int


def read_shard(directory: str) -> ShardRun:
    """A finished shard's saved state and results.json, or a UsageError naming what is wrong with it. What the
    directory holds is told from state.json before the records are read."""
    path = Path(directory)
    if not path.is_dir():
        raise UsageError(f"merge: {path} is not a directory; give the --output-dir of each shard")
    summary = _results(path)
    try:
        header = saved.read_header(path)
    except saved.StateError as e:
        raise UsageError(f"merge: the saved state in {path} cannot be used: {e}; rerun that shard") from None
    if header is None:
        if (path / saved.LEGACY).is_file():
            raise UsageError(legacy_refusal("merge", path))
        if summary is not None and "merged" in summary:
            raise UsageError(f"merge: {path} is the output of lm-ce merge ({summary['merged'].get('shards')} shards), "
                             "not a shard; give the shards' own directories")
        raise UsageError(f"merge: {path} holds no lm_ce run (no {saved.STATE}); give the --output-dir of each shard")
    shard = header.get("shard")
    if shard is None:
        raise UsageError(f"merge: {path} is not a shard (it was run without --shard K/N)")
    if not header["complete"]:
        holder = claims.in_use(path)
        if holder:
            raise UsageError(f"merge: shard {shard} in {path} is still running ({holder}); merge once it has finished")
        raise UsageError(f"merge: shard {shard} in {path} was stopped before its end ({header['tokens']:,} tokens "
                         "scored); finish it with --resume")
    if summary is None:
        raise UsageError(f"merge: shard {shard} in {path} has no readable results.json; rerun it with --resume to "
                         "write its reports")
    try:
        run = saved.load(path)["run"]
    except saved.StateError as e:
        raise UsageError(f"merge: the saved state of shard {shard} in {path} cannot be used: {e}; rerun that "
                         "shard") from None
    k, n = (int(x) for x in shard.split("/"))
    return ShardRun(path, run, header["config"], summary, k, n)


def _results(path: Path) -> dict | None:
    try:
        value = json.loads((path / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def check_files(s: ShardRun, save_tokens: bool) -> None:
    """The shard's documents.jsonl (rows, bytes, sha256) and tokens.parquet (rows, one per scored token) are those
    its state records; a UsageError naming the shard and the file otherwise."""
    where = f"merge: shard {s.index}/{s.count} in {s.directory}:"
    path = s.directory / DOCUMENTS
    if not path.is_file():
        raise UsageError(f"{where} {DOCUMENTS} is missing; rerun that shard")
    digest, lines = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(2**24):
            digest.update(block)
            lines += block.count(b"\n")
    size, run = path.stat().st_size, s.run
    if size != run.rows_offset or lines != run.rows.rows or (run.rows_offset and digest.hexdigest() != run.rows_sha256):
        raise UsageError(f"{where} {DOCUMENTS} holds {lines:,} rows in {size:,} bytes, not the {run.rows.rows:,} "
                         f"rows in {run.rows_offset:,} bytes its state records (cut, changed or replaced); rerun "
                         "that shard")
    if not save_tokens:
        return
    import pyarrow.parquet as pq

    tokens = s.directory / TOKENS
    try:
        rows = pq.ParquetFile(tokens).metadata.num_rows if tokens.is_file() else None
    except Exception as e:  # pyarrow's errors for a cut or foreign file
        raise UsageError(f"{where} {TOKENS} cannot be read ({type(e).__name__}); rerun that shard") from None
    if rows != run.sums.tokens and not (rows is None and run.sums.tokens == 0):  # a shard with no chunk: no file
        found = "is missing" if rows is None else f"holds {rows:,} rows"
        raise UsageError(f"{where} {TOKENS} {found}, not the {run.sums.tokens:,} scored tokens its state records; "
                         "rerun that shard")


def identity(s: ShardRun) -> dict:
    """What must be the same in every shard of one run, beside the content each recorded (check_shards): settings,
    how the data was read, and the model as loaded."""
    settings = {k: s.config.get(k) for k in FINGERPRINTED if k != "shard"}
    data = s.summary.get("data", {})
    model = {k: s.summary.get("model", {}).get(k) for k in MODEL_KEYS}
    return {**{f"settings.{k}": v for k, v in settings.items()},
            "data source": {k: v for k, v in data.items() if k not in ("files", "resolved_revision")},
            **{f"model.{k}": v for k, v in model.items()}}


def check_shards(shards: list[ShardRun]) -> None:
    """Refuse shards of different runs (settings, or content: the weights, tokenizers and data each shard recorded
    as it read them), of different counts, missing or given twice."""
    first = shards[0]
    mine = {**identity(first), **{f"settings.{k}": first.config.get(k) for k in CURVE_KEYS}}
    for s in shards[1:]:
        theirs = {**identity(s), **{f"settings.{k}": s.config.get(k) for k in CURVE_KEYS}}
        differ = [k for k in mine if mine[k] != theirs.get(k)]
        differ += differences(identity_of(first.summary), identity_of(s.summary))
        if differ:
            raise UsageError(f"merge: {s.directory} (shard {s.index}/{s.count}) is not of the same run as "
                             f"{first.directory}: they differ in {', '.join(differ)}; merge shards that read the "
                             "same model and data, or rerun the shards that differ (--overwrite)")
        if s.count != first.count:
            raise UsageError(f"merge: {s.directory} is shard {s.index}/{s.count}, {first.directory} shard "
                             f"{first.index}/{first.count}: shards of one run share N")
    seen: dict[int, Path] = {}
    for s in shards:
        if s.index in seen:
            raise UsageError(f"merge: shard {s.index}/{s.count} is given twice ({seen[s.index]} and {s.directory})")
        seen[s.index] = s.directory
    missing = [str(k) for k in range(first.count) if k not in seen]
    if missing:
        raise UsageError(f"merge: shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} of {first.count} "
                         f"missing; give every shard's directory")


def merged_run(shards: list[ShardRun]) -> Run:
    """The shards' running sums added, in shard order (the sums are exact: the order does not change them)."""
    run = Run(tally=Tally())
    first = shards[0].run.tally
    run.tally.positions = copy.deepcopy(first.positions)
    run.tally.compares = copy.deepcopy(first.compares)
    for i, s in enumerate(shards):
        r = s.run
        run.rows.merge(r.rows)
        run.sums.merge(r.sums)
        if i:
            run.tally.merge(Tally(positions=r.tally.positions, compares=r.tally.compares))
        run.tally.padding += r.tally.padding
        run.tally.inputs += r.tally.inputs
        run.windows += r.windows
        run.chunks_done += r.chunks_done
        run.doubled_prefix += r.doubled_prefix
        run.tokens_per_process += r.tokens_per_process  # every process of every shard, in shard order
        if r.curve is not None:
            if run.curve is None:
                run.curve = copy.deepcopy(r.curve)
            else:
                run.curve.merge(r.curve)
        if r.task is not None:  # --task multiple-choice or surprisal: their sums add up too
            if run.task is None:
                run.task = copy.deepcopy(r.task)
            else:
                run.task.merge(r.task)
    return run


def merge_documents(shards: list[ShardRun], chunk: int, path: Path) -> None:
    """documents.jsonl in document order: chunk c is the shard c % N's next `chunk` rows."""
    files = [open(s.directory / DOCUMENTS, encoding="utf-8") for s in shards]
    try:
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
            c = 0
            while True:
                rows = [line for _, line in zip(range(chunk), files[c % len(files)])]
                if not rows:
                    break
                if json.loads(rows[0])["index"] != c * chunk:
                    raise UsageError(f"merge: {shards[c % len(files)].directory / DOCUMENTS} does not hold chunk {c} "
                                     "where expected; was the shard's directory changed?")
                out.writelines(rows)
                c += 1
        left = [str(s.directory / DOCUMENTS) for s, f in zip(shards, files) if f.readline()]
        if left:
            raise UsageError(f"merge: {', '.join(left)} hold{'s' if len(left) == 1 else ''} rows after the last chunk "
                             "of the others; were the shards run on the same data?")
    finally:
        for f in files:
            f.close()


def merge_tokens(shards: list[ShardRun], path: Path, name: str = TOKENS, column: str = "doc") -> bool:
    """tokens.parquet (or a task's table `name`, whose documents are in `column`) in document order: the shards' row
    groups ordered by their first document. False: none."""
    import pyarrow.parquet as pq

    paths = [s.directory / name for s in shards if (s.directory / name).is_file()]
    if not paths:
        return False
    readers = [pq.ParquetFile(p) for p in paths]

    def groups(r: int):
        meta = readers[r].metadata
        doc = meta.schema.names.index(column)
        for g in range(meta.num_row_groups):
            yield meta.row_group(g).column(doc).statistics.min, r, g

    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, readers[0].schema_arrow) as writer:
        for _, r, g in heapq.merge(*(groups(r) for r in range(len(readers)))):
            writer.write_table(readers[r].read_row_group(g))
    return True


def merge(directories: list[str], output_dir: str) -> Results:
    """Check the shards, add their sums and write the whole run's reports to output_dir."""
    from lm_ce.reports import files as report

    out = Path(output_dir)
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held:
        raise UsageError(f"merge: --output-dir {out} already holds a run ({', '.join(held)}); use another directory")
    shards = sorted((read_shard(d) for d in directories), key=lambda s: s.index)
    check_shards(shards)
    cfg = Config(**{**shards[0].config, "shard": None, "output_dir": str(out), "resume": False, "overwrite": False})
    for s in shards:  # every file checked before anything is written
        check_files(s, cfg.save_tokens)
    try:
        claims.make(out)
    except UsageError as e:
        raise UsageError(f"merge: {e}") from None
    run = merged_run(shards)
    found, tally = figures(cfg, run, stopped=False)
    first = shards[0].summary
    seconds = sum(s.summary["timing"]["seconds"] for s in shards)  # scoring time of all shards together
    tokens = found["counts"]["tokens"]
    summary = {
        **{k: found.pop(k) for k in ("nll_sum", "counts", "metrics", "uncertainty")},
        "timing": {"seconds": seconds, "tokens_per_second": tokens / seconds if seconds else None,
                   "load_seconds": sum(s.summary["timing"]["load_seconds"] for s in shards),
                   "total_seconds": sum(s.summary["timing"]["total_seconds"] for s in shards)},
        "complete": True,
        "by_position": found.pop("by_position"),
        **{k: first[k] for k in ("model", "data", "settings", "environment")},
        "config": cfg.resolved(),
        **found,
        "merged": {"shards": len(shards), "directories": [str(s.directory) for s in shards]},
    }
    for name, table in summary.get("compare", {}).items():  # what each other model was (the same in every shard)
        table["model"] = first.get("compare", {}).get(name, {}).get("model")
    if "longppl" in summary:
        summary["longppl"]["evaluator_model"] = first.get("longppl", {}).get("evaluator_model")
    merge_documents(shards, cfg.chunk_documents, out / DOCUMENTS)
    token_files = [str(out / TOKENS)] if cfg.save_tokens and merge_tokens(shards, out / TOKENS) else []
    tables = {n: [str(out / f"{n}.parquet")] for n in TABLES[cfg.task]
              if merge_tokens(shards, out / f"{n}.parquet", f"{n}.parquet", "document_index")}
    results = Results(summary, DocumentRows(out / DOCUMENTS), tally.positions, token_files=token_files,
                      extremes=Extremes.merged([s.run.extremes for s in shards]), table_files=tables)
    report.write(results, str(out), plot=cfg.plot, page=cfg.page)
    return results
