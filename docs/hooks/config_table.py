"""mkdocs hook: the Configuration page's field tables, drawn from `lm_ce.config.Config` when the site is built.

Each field's `metadata["group"]` and `metadata["help"]` (the same source as `--help`) give its section and
its line; a field without them is listed under "Other fields" with its type and default alone.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

MARKER = "<!-- config-fields -->"
ROOT = Path(__file__).resolve().parents[2]


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, config_tables())


def config_tables() -> str:
    """Markdown: one table per group of Config fields, in the order the fields are defined."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from lm_ce.config import Config

    groups: dict[str, list[str]] = {}
    for field in dataclasses.fields(Config):
        group = field.metadata.get("group") or "Other fields"
        row = (f"| `{field.name}` | `--{field.name.replace('_', '-')}` | `{_type(field)}` | "
               f"`{_default(field)}` | {_cell(field.metadata.get('help', ''))} |")
        groups.setdefault(group, []).append(row)
    out = []
    for group, rows in groups.items():
        out += [f"### {group[:1].upper() + group[1:]}", "",
                "| field | flag | type | default | what it does |", "|---|---|---|---|---|", *rows, ""]
    return "\n".join(out)


def _type(field: dataclasses.Field) -> str:
    return field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    return repr(value).replace("|", "\\|")


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")
