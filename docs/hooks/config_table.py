"""mkdocs hook: the Configuration page's field tables, drawn from `lm_ce.config.fields.Config` when the site is built.

Each field's `metadata["group"]` and `metadata["help"]` (the same source as `--help`) give its section and
its line; a field without them is listed under "Other fields" with its type (or choices) and default alone.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

MARKER = "<!-- config-fields -->"
ROOT = Path(__file__).resolve().parents[2]


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, config_tables())


def config_tables() -> str:
    """Markdown: one table per group of Config fields, in --help's order of the groups (`GROUPS`), each group's
    fields in the order they are defined."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from lm_ce.config import fields as config

    choices = getattr(config, "CHOICES", {})
    groups: dict[str, list[str]] = {}
    for field in dataclasses.fields(config.Config):
        group = field.metadata.get("group") or "Other fields"
        options = field.metadata.get("choices") or choices.get(field.name)
        kind = f"one of {', '.join(map(str, options))}" if options else _type(field)
        row = f"| `{field.name}` | {_flags(field)} | {_cell(kind)} | `{_default(field)}` | {_cell(field.metadata.get('help', ''))} |"
        groups.setdefault(group, []).append(row)
    order = list(getattr(config, "GROUPS", ()))  # --help's order of the sections, then any other group
    out = []
    for group, rows in sorted(groups.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)):
        out += [f"### {group[:1].upper() + group[1:]}", "",
                "| field | flag | type | default | what it does |", "|---|---|---|---|---|", *rows, ""]
    return "\n".join(out)


def _flags(field: dataclasses.Field) -> str:
    flag = "--" + field.name.replace("_", "-")
    if field.name == "suite":
        return "config files only"
    if _type(field) == "bool":
        return f"`{flag}` / `--no-{flag[2:]}`"
    return f"`{flag}`"


def _type(field: dataclasses.Field) -> str:
    return field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))


def _default(field: dataclasses.Field) -> str:
    """The default as YAML-like JSON: null, true, "text", [..]."""
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    return json.dumps(value, default=str)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")
