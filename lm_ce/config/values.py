"""Typed values of config fields: each value converted to its field's type, or one line naming the field, the
source (file, command line, keyword settings) and what to write instead; unknown names get the closest field.

Device maps and memory budgets are mappings: from YAML, or `key=value,key=value` on the command line. `Words`
names settings in their source's words in a refusal (`--stride 5`, `stride=5`).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import types
import typing
import weakref
from collections.abc import Mapping

from lm_ce.config.fields import CHOICES, FIELDS, Config
from lm_ce.errors import UsageError


@functools.cache
def field_type(name: str) -> tuple[type, bool, bool]:
    """(scalar type, is optional, is list) of a field whose annotation is such as `list[str] | None`; cached, since
    resolving the annotations costs about 20 ms a call (a pipeline step makes one call per group of documents)."""
    hint = typing.get_type_hints(Config)[name]
    optional, is_list = False, False
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        optional = type(None) in args
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        is_list, hint = True, typing.get_args(hint)[0]
    return hint, optional, is_list


_NOTES: dict[int, tuple[weakref.ref, dict]] = {}  # id(Config) -> (the Config, what is known of it)


def note(cfg: Config, **facts) -> None:
    """Remember facts about one Config object (checked, its source's words), outside its fields: a copy or
    dataclasses.replace is a new object that knows nothing (and is checked again)."""
    key = id(cfg)
    found = _NOTES.get(key)
    if found is None or found[0]() is not cfg:
        found = _NOTES[key] = (weakref.ref(cfg, lambda _, key=key: _NOTES.pop(key, None)), {})
    found[1].update(facts)


def noted(cfg: Config, name: str, default=None):
    """A fact `note` remembered about this Config object, else `default`."""
    found = _NOTES.get(id(cfg))
    return found[1].get(name, default) if found is not None and found[0]() is cfg else default


def coerce(name: str, value, source: str):
    """The value converted to the field's type, or a UsageError naming the field and the source."""
    if name in MAPPINGS:
        return MAPPINGS[name](value, label(name, source), source)
    kind, optional, is_list = field_type(name)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise UsageError(f"{source}: field '{name}' cannot be empty; give a {kind.__name__}")
    if is_list:
        items = value if isinstance(value, list) else [v for v in str(value).split(",") if v]
        return [_coerce_scalar(name, kind, v, source) for v in items]
    value = _coerce_scalar(name, kind, value, source)
    if name in CHOICES and value not in CHOICES[name]:
        raise UsageError(f"{source}: {label(name, source)} is '{value}'; choose one of {', '.join(CHOICES[name])}")
    return value


KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
CLI = "command line"
KEYWORD_SOURCES = ("lm_ce.evaluate", "lm_ce.PerplexityCallback", "lm_ce.PerplexityStats", "config_for")


def keywords(source: str) -> bool:
    """Whether settings come from Python keywords (typed by the caller: output_dir=5 is a mistake, not a name)."""
    return source.split(":")[0] in KEYWORD_SOURCES


_NO_VALUE = object()


def label(name: str, source: str) -> str:
    """How a field is named to the user: as the flag on the command line, as the key in a file."""
    return f"--{name.replace('_', '-')}" if source == CLI else f"field '{name}'"


@dataclasses.dataclass(frozen=True)
class Words:
    """A source's own words for its settings: `--stride 5` on the command line, `stride=5` in a YAML file and in
    Python's keyword settings. `given` names the source of fields given elsewhere (a YAML file among the flags);
    `where` starts every refusal (a file, lm_ce.evaluate, a suite entry; nothing on the command line)."""

    source: str = CLI
    given: Mapping[str, str] = dataclasses.field(default_factory=dict)
    where: str = ""

    def __call__(self, name: str, value=_NO_VALUE) -> str:
        """Field `name` (with its value, if given) as this source writes it."""
        if self.given.get(name, self.source) == CLI:
            flag = f"--{name.replace('_', '-')}"
            if value is _NO_VALUE or value is True:  # a flag: --resume, not --resume True
                return flag
            if value is False:
                return f"--no-{flag[2:]}"
            shown = ",".join(map(str, value)) if isinstance(value, list) else "none" if value is None else value
            return f"{flag} {shown}"
        return name if value is _NO_VALUE else f"{name}={value!r}"

    def error(self, message: str) -> UsageError:
        """A refusal, starting with where the settings came from."""
        return UsageError(f"{self.where}: {message}" if self.where else message)

    def entry(self, number: int, name: str, fields) -> "Words":
        """The words of suite entry `number` ('name'): its own fields (`fields`) named as its source writes them."""
        source = self.given.get("suite", self.where or self.source)  # a suite comes from a file or from Python
        given = {**self.given, **dict.fromkeys(fields, source)}
        return Words(source, given, f"{source}: suite entry {number} ('{name}')")


def _coerce_scalar(name: str, kind: type, value, source: str):
    """One value of the field's scalar type, or a UsageError saying which type was expected."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    elif kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        if number is not None:  # nan compares false with everything: a threshold of nan selects nothing, silently
            raise UsageError(f"{source}: {label(name, source)} must be a finite number, got {value!r}")
    elif kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):  # a pathlib.Path from Python
            return os.fspath(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not keywords(source):
            return str(value)  # YAML reads `split: 2023` as a number; the command line gives "2023"
    expected = KINDS.get(kind, kind.__name__)
    raise UsageError(f"{source}: {label(name, source)} must be {expected}, got {value!r}")


def unknown(name: str, source: str) -> UsageError:
    """The error for a key or flag that is no field, with the closest field suggested."""
    if name.startswith("--"):  # a flag: suggest the flag as it would be typed (--no-X for a true/false X)
        wanted = name[2:].replace("-", "_")
        negated = wanted.startswith("no_")
        fields = [f for f in FIELDS if field_type(f)[0] is bool] if negated else list(FIELDS)
        close = difflib.get_close_matches(wanted[3:] if negated else wanted, fields, n=1)
        no = "no-" if negated else ""
        hint = f"; did you mean --{no}{close[0].replace('_', '-')}?" if close else "; see --help for the flags"
        return UsageError(f"{source}: unknown flag '{name}'{hint}")
    close = difflib.get_close_matches(name, list(FIELDS), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid fields: {', '.join(FIELDS)}"
    return UsageError(f"{source}: unknown field '{name}'{hint}")


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
SIZE = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B|B)?$", re.IGNORECASE)


def _pairs(value, label: str, source: str, example: str) -> dict:
    """A mapping from YAML, or from `key=value,key=value` on the command line."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str) and "=" in value:
        out = {}
        for item in (i.strip() for i in value.split(",") if i.strip()):
            key, eq, val = item.partition("=")
            if not eq or not key.strip() or not val.strip():
                raise UsageError(f"{source}: {label} item '{item}' is not key=value; write it as {example}")
            out[key.strip()] = val.strip()
        return out
    raise UsageError(f"{source}: {label} must be a mapping, got {value!r}; write it as {example}")


def _device(value, label: str, source: str, allowed: tuple[str, ...]):
    """A device of a device map or memory budget: a GPU number (an int) or one of `allowed`."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    text = str(value).strip().lower()
    if text.isdigit():
        return int(text)
    if text in allowed:
        return text
    raise UsageError(f"{source}: {label} has device {value!r}; use a GPU number (0, 1, ...) or {' or '.join(allowed)}")


def parse_device_map(value, label: str, source: str) -> str | dict | None:
    """None, one of DEVICE_MAPS, or {module name: GPU number | 'cpu' | 'disk'}."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
        return None
    example = "module: device pairs (YAML: {model.embed_tokens: disk, model.layers: 0}; command line: model.embed_tokens=disk,model.layers=0)"
    if isinstance(value, str) and "=" not in value:
        if value not in DEVICE_MAPS:
            raise UsageError(f"{source}: {label} is '{value}'; choose one of {', '.join(DEVICE_MAPS)}, or give {example}")
        return value
    pairs = _pairs(value, label, source, example)
    if not pairs:
        raise UsageError(f"{source}: {label} is an empty mapping; give {example}")
    return {str(module): _device(device, label, source, ("cpu", "disk")) for module, device in pairs.items()}


def parse_max_memory(value, label: str, source: str) -> dict | None:
    """None, or {GPU number | 'cpu': size such as '20GiB'} (a mapping in YAML, 0=20GiB,cpu=64GiB on the command line)."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
        return None
    pairs = _pairs(value, label, source, "0=20GiB,1=20GiB,cpu=64GiB (YAML: {0: 20GiB, cpu: 64GiB})")
    out = {}
    for device, size in pairs.items():
        key = _device(device, label, source, ("cpu",))
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            out[key] = size
        elif isinstance(size, str) and SIZE.match(size.strip()):
            out[key] = int(size) if size.strip().isdigit() else size.strip()
        else:
            raise UsageError(f"{source}: {label} gives {device} the size {size!r}; write a size such as 20GiB or 512MB")
    return out


MAPPINGS = {"device_map": parse_device_map, "max_memory": parse_max_memory}
