"""Config fields from YAML files, the command line and keyword settings, each checked by name and type.

Every field can be overridden with `--field value` (dashes or underscores). Unknown or mistyped keys are
refused by name, with the closest valid key suggested.
"""
from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path

import yaml

from .config import CHOICES, FIELDS, Config, UsageError, check, with_protocol


def _base_type(annotation) -> tuple[type, bool, bool]:
    """(scalar type, is optional, is list) of a field annotation such as `list[str] | None`."""
    hint = typing.get_type_hints(Config)[annotation]
    optional, is_list = False, False
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        optional = type(None) in args
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        is_list, hint = True, typing.get_args(hint)[0]
    return hint, optional, is_list


def _coerce(name: str, value, source: str):
    """The value converted to the field's type, or a UsageError naming the field and the source."""
    if name in MAPPINGS:
        return MAPPINGS[name](value, _label(name, source), source)
    kind, optional, is_list = _base_type(name)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise UsageError(f"{source}: field '{name}' cannot be empty; give a {kind.__name__}")
    if is_list:
        items = value if isinstance(value, list) else [v for v in str(value).split(",") if v]
        return [_coerce_scalar(name, kind, v, source) for v in items]
    value = _coerce_scalar(name, kind, value, source)
    if name in CHOICES and value not in CHOICES[name]:
        raise UsageError(f"{source}: {_label(name, source)} is '{value}'; choose one of {', '.join(CHOICES[name])}")
    return value


KINDS = {bool: "true or false", int: "a whole number", str: "a string"}


def _label(name: str, source: str) -> str:
    """How a field is named to the user: as the flag on the command line, as the key in a file."""
    return f"--{name.replace('_', '-')}" if source == "command line" else f"field '{name}'"


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
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    expected = KINDS.get(kind, kind.__name__)
    raise UsageError(f"{source}: {_label(name, source)} must be {expected}, got {value!r}")


def _unknown(name: str, source: str) -> UsageError:
    """The error for a key or flag that is no field, with the closest field suggested."""
    if name.startswith("--"):  # a flag: suggest the flag as it would be typed (--no-X for a true/false X)
        wanted = name[2:].replace("-", "_")
        negated = wanted.startswith("no_")
        fields = [f for f in FIELDS if _base_type(f)[0] is bool] if negated else list(FIELDS)
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


def _field_value(name: str, value, source: str):
    """A field's value from a file or the Python API, checked (a suite entry by entry, see suite.py)."""
    if name != "suite":
        return _coerce(name, value, source)
    from .suite import suite_entries  # suite.py builds on this module

    return None if value is None else suite_entries(value, source)


def load_yaml(path: str | Path) -> dict:
    """The fields of a YAML config file, checked by name and type."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist; give the path of a YAML file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: not UTF-8 text; save the config file as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UsageError(f"{path}: not valid YAML{where}; fix the file") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of field: value at the top level")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise _unknown(str(key), str(path))
        out[name] = _field_value(name, value, str(path))
    return out


def parse_overrides(args: list[str]) -> dict:
    """Fields from `--name value`, `--name=value` and bare boolean `--flag` / `--no-flag` arguments."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument '{arg}'; fields are given as --name value")
        key, eq, value = arg[2:].partition("=")
        name = key.replace("-", "_")
        negate = name.startswith("no_") and name[3:] in FIELDS and name not in FIELDS
        if negate and _base_type(name[3:])[0] is not bool:
            raise UsageError(f"command line: --{key} is not a flag: --{name[3:].replace('_', '-')} takes a value, "
                             "not a no- form")
        if negate:
            name = name[3:]
        if name not in FIELDS:
            raise _unknown("--" + key, "command line")
        if name == "suite":
            raise UsageError("command line: a suite is a list of datasets; give it in a config file (see configs/)")
        kind, _, is_list = _base_type(name)
        if negate:
            out[name] = False
        elif eq:
            out[name] = _coerce(name, value, "command line")
        elif kind is bool and (i + 1 == len(args) or args[i + 1].startswith("--")):
            out[name] = True
        elif is_list and i + 1 < len(args):  # --data-files a.jsonl b.jsonl (or a.jsonl,b.jsonl)
            words = []
            while i + 1 < len(args) and not args[i + 1].startswith("--"):
                i += 1
                words.append(args[i])
            value = words[0] if len(words) == 1 else [v for w in words for v in w.split(",") if v]
            out[name] = _coerce(name, value, "command line")  # one word: as before ("none", "a,b", "")
        elif i + 1 < len(args):
            i += 1
            out[name] = _coerce(name, args[i], "command line")
        else:
            raise UsageError(f"command line: --{key} needs a value")
        i += 1
    return out


def build_config(args: list[str]) -> Config:
    """Config from `[--config FILE] [--field value ...]`: defaults, then the file, then the overrides."""
    values: dict = {}
    if "--config" in args or any(a.startswith("--config=") for a in args):
        rest = []
        i = 0
        while i < len(args):
            if args[i] == "--config":
                if i + 1 >= len(args):
                    raise UsageError("command line: --config needs a file path")
                values.update(load_yaml(args[i + 1]))
                i += 2
                continue
            if args[i].startswith("--config="):
                values.update(load_yaml(args[i].split("=", 1)[1]))
            else:
                rest.append(args[i])
            i += 1
        args = rest
    values.update(parse_overrides(args))
    cfg = Config(**with_protocol(values))
    check(cfg)
    if cfg.suite:
        from .suite import entry_config

        for entry in cfg.suite:
            check(entry_config(cfg, entry))
    return cfg


def config_for(**fields) -> Config:
    """A checked Config from explicit fields over their protocol's (what build_config does, for Python callers)."""
    return from_settings(fields, "config_for")


def from_settings(settings: dict, source: str) -> Config:
    """Config from keyword settings (the Python API), each checked by name and type as a config file's keys are,
    over the fields their protocol sets."""
    values = {}
    for key, value in settings.items():
        if key not in FIELDS:
            raise _unknown(key, source)
        values[key] = _field_value(key, value, source)
    cfg = Config(**with_protocol(values))
    check(cfg)
    return cfg
