"""Suites: several datasets scored with one model load, each as its own run, with pooled and mean figures.

A config's `suite:` lists the datasets; each entry has a `name` and any data or window field. An entry
takes the top-level config, then its protocol's fields if it names one, then its own fields.
"""
from __future__ import annotations

import dataclasses

from .config import FIELDS, Config, UsageError, _coerce, _unknown
from .protocols import protocol_values

SUITE_EXCLUDED = ("model", "revision", "dtype", "trust_remote_code", "gguf_cache", "compile", "threads", "compare_to",
                  "output_dir", "resume", "checkpoint_seconds", "plot", "progress", "seed", "suite")


def suite_entries(value, source: str) -> list[dict]:
    """The `suite:` list of a config file, each entry a mapping with a unique name and data or window fields."""
    if not isinstance(value, list) or not value:
        raise UsageError(f"{source}: field 'suite' must be a list of datasets, each a mapping with a 'name'")
    entries, names = [], set()
    for number, entry in enumerate(value, 1):
        where = f"{source}: suite entry {number}"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
            raise UsageError(f"{where}: give a mapping with a 'name' (a string) and the dataset's fields")
        name = entry["name"]
        if name in names or "." in name:
            raise UsageError(f"{where}: name '{name}' is {'used twice' if name in names else 'not allowed (no dots)'}; "
                             "give each entry its own name")
        names.add(name)
        out = {"name": name}
        for key, item in entry.items():
            field_name = str(key).replace("-", "_")
            if field_name == "name":
                continue
            if field_name not in FIELDS:
                raise _unknown(str(key), f"{where} ('{name}')")
            if field_name in SUITE_EXCLUDED:
                raise UsageError(f"{where} ('{name}'): '{key}' is set once for the whole suite, at the top level")
            out[field_name] = _coerce(field_name, item, f"{where} ('{name}')")
        entries.append(out)
    return entries


def entry_config(cfg: Config, entry: dict) -> Config:
    """The config of one suite entry: the top-level config, then the entry's protocol (if it names one),
    then the entry's own fields."""
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "suite"}
    if "protocol" in entry:
        values.update(protocol_values(entry["protocol"]))
    values.update({k: v for k, v in entry.items() if k != "name"})
    return Config(**values, suite=None)


