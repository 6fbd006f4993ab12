"""The experiment: one flat dataclass, loaded from YAML and overridden from the command line.

A config file is a complete, reproducible experiment; every field can be overridden with
`--field value` (dashes or underscores). Unknown or mistyped keys are refused by name, with
the closest valid key suggested.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml


class UsageError(Exception):
    """Bad input: the message says what is wrong and what to do. The CLI prints it and exits 2."""


def first_line(e: BaseException) -> str:
    """An exception's message on one line (libraries spread theirs over several), short enough for a one-line error."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text[:300] if text else type(e).__name__


@dataclass
class Config:
    # model
    model: str = "gpt2"  # Hub id, local directory, local .gguf file, or pkg:<module>/<file>
    revision: str | None = None
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16
    trust_remote_code: bool = False
    gguf_cache: bool = True  # cache dequantized GGUF weights, keyed by the file's content hash
    compile: bool = False  # torch.compile the model body (pays on long runs, see README)
    threads: int | None = None  # torch intra-op threads per process (default: cores / processes)
    # placement of a model larger than one device (README: "A model that does not fit")
    device_map: str | dict | None = None  # auto | balanced | balanced_low_0 | sequential | {module: 0 | cpu | disk}
    max_memory: dict | None = None  # {0: 20GiB, cpu: 64GiB}; on the command line 0=20GiB,cpu=64GiB
    offload_folder: str | None = None  # where weights mapped to disk are kept (default: a temporary folder)
    # data
    dataset: str = "wikitext"  # Hub dataset, or a datasets builder (json, csv, text, parquet); <memory>: rows in memory
    dataset_config: str | None = "wikitext-2-raw-v1"
    split: str = "test"
    data_files: list[str] | None = None  # local files; the builder follows their extension
    text_field: str = "text"
    prompt_field: str | None = None  # tokens of this field are context only (conditional scoring)
    group_field: str | None = None  # report one row per value of this field
    id_field: str | None = None  # names each document in documents.jsonl
    join_by: list[str] | None = None  # consecutive rows with equal values of these fields form one document
    streaming: bool = False
    data_cache: str = "default"  # default | output | off: where datasets keeps its Arrow copy of the data (README)
    limit: int | None = None  # the first N documents
    # windows
    mode: str = "document"  # document | stream
    max_length: int | None = None  # input tokens per window (default: the model's positions, at most 2048)
    stride: int | None = None  # new tokens scored per later window (default: max_length)
    prefix_token: str = "auto"  # auto | bos | eos | none (auto: bos, else eos, in document mode; none in stream mode)
    separator: str = "\n\n"  # joins documents in stream mode
    batch_size: int = 8  # windows per batch at most
    token_budget: int | None = None  # input tokens per batch at most (default: batch_size * max_length, at most 4096 on CPU)
    padding_side: str = "right"  # right | left; must not change the result
    chunk_documents: int = 1024  # documents tokenized and planned at a time (bounds memory)
    # analysis
    compare_to: list[str] | None = None  # models scored on the same tokens against the first (KL, top-1, delta ppl)
    save_tokens: bool = False  # tokens.parquet-style files: every scored token's id, text, position, NLL, top-1
    # output
    output_dir: str | None = None
    resume: bool = False  # continue the run saved in output_dir (same model, data and settings)
    checkpoint_seconds: int = 300  # save progress to output_dir this often (and on Ctrl-C / SIGTERM)
    plot: bool = True  # loss by position in the window as a PNG (position_loss.png)
    progress: bool = True
    seed: int = 0

    def resolved(self) -> dict:
        """The config as plain data, written next to the results so any run can be repeated."""
        return dataclasses.asdict(self)


CHOICES = {
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "mode": ("document", "stream"),
    "prefix_token": ("auto", "bos", "eos", "none"),
    "padding_side": ("right", "left"),
    "data_cache": ("default", "output", "off"),
}
FIELDS = {f.name: f for f in dataclasses.fields(Config)}


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
        out[name] = _coerce(name, value, str(path))
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
        kind, _, is_list = _base_type(name)
        if negate:
            out[name] = False
        elif eq:
            out[name] = _coerce(name, value, "command line")
        elif kind is bool and (i + 1 == len(args) or args[i + 1].startswith("--")):
            out[name] = True
        elif is_list and i + 1 < len(args):  # --data-files a.jsonl b.jsonl (or a.jsonl,b.jsonl)
            values = []
            while i + 1 < len(args) and not args[i + 1].startswith("--"):
                i += 1
                values += [v for v in args[i].split(",") if v]
            out[name] = _coerce(name, values, "command line")
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
    cfg = Config(**values)
    check(cfg)
    return cfg


def from_settings(settings: dict, source: str) -> Config:
    """Config from keyword settings (the Python API), each checked by name and type as a config file's keys are."""
    values = {}
    for key, value in settings.items():
        if key not in FIELDS:
            raise _unknown(key, source)
        values[key] = _coerce(key, value, source)
    cfg = Config(**values)
    check(cfg)
    return cfg


def check(cfg: Config) -> None:
    """Refuse settings that cannot work together, before anything is loaded."""
    for name in ("max_length", "stride", "batch_size", "token_budget", "limit", "chunk_documents", "threads", "checkpoint_seconds"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if cfg.max_length and cfg.stride and cfg.stride > cfg.max_length:
        raise UsageError(
            f"--stride {cfg.stride} is larger than --max-length {cfg.max_length}: tokens between windows "
            "would never be scored; use a stride at most max_length"
        )
    if cfg.resume and not cfg.output_dir:
        raise UsageError("--resume needs --output-dir: the directory of the run to continue")
    if cfg.data_cache == "output" and not cfg.output_dir:
        raise UsageError("--data-cache output keeps the data's Arrow copy in --output-dir: give --output-dir, or use off")
    for name, parse in MAPPINGS.items():
        parse(getattr(cfg, name), f"field '{name}'", "config")
    if cfg.max_memory and not cfg.device_map:
        raise UsageError("--max-memory needs --device-map (auto, balanced, balanced_low_0 or sequential) to place the model")
    if cfg.prompt_field and cfg.mode == "stream":
        raise UsageError("--prompt-field needs --mode document: a joined stream has no per-document prompt")
    for name in FIELDS:
        value = getattr(cfg, name)
        if name in CHOICES and value not in CHOICES[name]:
            raise UsageError(f"field '{name}' is '{value}'; choose one of {', '.join(CHOICES[name])}")


def resolve_path(spec: str) -> str:
    """A path as given, or for `pkg:<module>/<file>` the file inside that installed package."""
    if not spec.startswith("pkg:"):
        return spec
    module, _, rel = spec[4:].partition("/")
    import importlib.util

    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise UsageError(
            f"{spec}: Python package '{module}' is not installed; install the package that ships it "
            "(see the README's first command)"
        )
    return str(Path(list(found.submodule_search_locations)[0]) / rel)
