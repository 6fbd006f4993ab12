"""mkdocs hook: the manual's lists of the files a run writes, drawn from `lm_ce.rundir.claims` when the site is built.

`<!-- run-files -->` becomes the table of every file a run writes and what it holds (`claims.WRITES`, then the
saved state); `<!-- overwrite-files -->` the list of the files `--overwrite` deletes (`claims.RUN_FILES`).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TABLE, OVERWRITE = "<!-- run-files -->", "<!-- overwrite-files -->"
STATE = ("| `state.json`, `state-<hash>.safetensors` | the saved progress `--resume` and `lm-ce merge` read: data, "
         "never code ([Reliability](reliability.md#what-a-run-directory-holds)) |")


def on_page_markdown(markdown: str, page, config, files) -> str:
    if TABLE not in markdown and OVERWRITE not in markdown:
        return markdown
    return markdown.replace(TABLE, run_files_table()).replace(OVERWRITE, overwrite_files())


def _claims():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from lm_ce.rundir import claims

    return claims


def run_files_table() -> str:
    """Markdown: | file | what it holds |, one row per file a run writes, the saved state last. Links are relative
    to the docs folder (every page of the manual is in it)."""
    rows = [f"| `{name}` | {what} |" for name, what in _claims().WRITES.items()]
    return "\n".join(["| file | what it holds |", "|---|---|", *rows, STATE])


def overwrite_files() -> str:
    """The files --overwrite deletes, as a list in a sentence: `results.json`, ..., `state.pt`."""
    claims = _claims()
    names = [f"`{n}`" for n in claims.RUN_FILES if n not in (claims.STATE, claims.LEGACY)]
    return ", ".join(names + [f"`{claims.STATE}` and its records' file", f"an earlier version's `{claims.LEGACY}`"])
