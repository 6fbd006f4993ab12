"""The files of a finished run: results.json, results.md, config.yaml, documents.jsonl and tokens.parquet in their
final places, the plots and results.html. results.json's key paths are a contract other tools read."""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from lm_ce.files import atomic_path, atomic_write

from lm_ce.reports.page import PageParts
from lm_ce.reports.page import render as render_page
from lm_ce.reports.plots import plot_curve, plot_positions
from lm_ce.reports.tables import (
    figure_rows,
    headline,
    interval,
    markdown,
    sections,
    shard_note,
    title,
    what_was_run,
)
from lm_ce.rundir.claims import REPORTS
from lm_ce.rundir.outputs import DOCUMENTS, TOKENS, DocumentRows, join_parquet, row_line
from lm_ce.sums.records import Results


def write(results: Results, output_dir: str, plot: bool = True, page: bool = True) -> list[Path]:
    """results.json, results.md, config.yaml (the resolved config), documents.jsonl (document mode), and with
    them tokens.parquet (--save-tokens), position_loss.png (loss by position in the window) and results.html.

    Returns the files written. A report file of ours that this run does not write (left by the interrupted
    part of a resumed run) is deleted, so the directory describes one run only.
    """
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, part in results.parts.items():  # a suite: each dataset's own files in OUTPUT_DIR/NAME
        written += write(part, str(directory / name), plot=plot, page=page)
    if results.token_files:  # written chunk by chunk as the run went: joined, the parts kept until it is complete
        path = directory / TOKENS
        if results.token_files != [str(path)]:
            if results.joined_tokens and Path(results.joined_tokens).is_file():  # joined as the run went
                os.replace(results.joined_tokens, path)
            else:
                join_parquet(results.token_files, path)
            if results.summary.get("complete", True):
                for name in results.token_files:
                    Path(name).unlink()
        written.append(path)
    elif results.token_table:
        import pyarrow as pa
        import pyarrow.parquet as pq

        with atomic_path(directory / TOKENS) as tmp:
            pq.write_table(pa.table(results.token_table), tmp)
        written.append(directory / TOKENS)
    for name, files in results.table_files.items():  # a task's tables, written chunk by chunk as the run went
        path = directory / f"{name}.parquet"
        if files != [str(path)]:
            join_parquet(files, path)
            if results.summary.get("complete", True):
                for part in files:
                    Path(part).unlink()
        written.append(path)
    if plot and results.positions is not None and "suite" not in results.summary and int(results.positions.count.sum()):
        if plot_positions(results.positions, directory / "position_loss.png", title(results.summary)):
            written.append(directory / "position_loss.png")
    if plot and "context_curve" in results.summary and any(results.summary["context_curve"]["tokens"]):
        if plot_curve(results.summary["context_curve"], directory / "context_curve.png", title(results.summary)):
            written.append(directory / "context_curve.png")
    written.append(atomic_write(directory / "results.json", json.dumps(results.summary, indent=2, default=str) + "\n"))
    written.append(atomic_write(directory / "results.md", markdown(results.summary)))
    if page and "suite" not in results.summary:  # a suite: each dataset's own page
        written.append(atomic_write(directory / "results.html", render_page(page_parts(results))))
    config = yaml.safe_dump(results.summary["config"], sort_keys=False, allow_unicode=True)
    written.append(atomic_write(directory / "config.yaml", config))
    if isinstance(results.documents, DocumentRows) and results.documents.path == directory / DOCUMENTS:
        if results.documents.path.is_file():
            written.append(results.documents.path)  # written row by row as the run went
    elif results.documents:
        text = "".join(row_line(d) + "\n" for d in results.documents)
        written.append(atomic_write(directory / DOCUMENTS, text))
    for name in REPORTS:
        if directory / name not in written and (directory / name).is_file():
            (directory / name).unlink()
    return written


def page_parts(results: Results) -> PageParts:
    """What results.html shows: the figures and tables of results.md, the loss by position, the documents."""
    summary = results.summary
    figures = figure_rows(summary)
    figures.insert(2, ("perplexity 95% interval", interval(summary)))
    if headline(summary):
        figures.insert(0, headline(summary))
    mode = summary.get("settings", {}).get("mode", "document")
    no_documents = None
    if mode != "document":
        no_documents = (f"No documents are shown: in {mode} mode the documents are joined into one text, so no "
                        "document has a loss of its own (document mode shows them).")
    elif results.extremes is None:
        no_documents = ("No documents are shown: --page-documents is 0." if summary.get("config", {}).get("page_documents") == 0
                        else "No documents are shown: these results were made without keeping their tokens.")
    return PageParts(title=title(summary), interrupted=not summary.get("complete", True), figures=figures,
                     tables=[t for t in sections(summary) if not t[0].startswith("Mean loss by position")],
                     what_was_run=what_was_run(summary), buckets=summary.get("by_position") or [],
                     per_position=per_position(results.positions), extremes=results.extremes, no_documents=no_documents,
                     note=shard_note(summary), byte_heatmaps=results.byte_heatmaps)


def per_position(positions, at_most: int = 2048) -> list[tuple[int, float]]:
    """(position, mean loss) of the positions seen; beyond `at_most` of them, a log-spaced selection."""
    if positions is None:
        return []
    seen = (positions.count > 0).nonzero().squeeze(1).tolist()
    if len(seen) > at_most:
        step = (len(seen) - 1) ** (1 / at_most)
        seen = sorted({seen[min(len(seen) - 1, round(step**k) - 1)] for k in range(at_most + 1)} | {seen[0]})
    return [(p, float(positions.nll[p]) / int(positions.count[p])) for p in seen]


