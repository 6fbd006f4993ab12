"""Config fields from YAML files, the command line, keyword settings and suite entries, each checked by name
and type.

`make_config` is the one constructor of a checked Config, for every source (the command line, a YAML file, the
Python API's keyword settings, the callback, the datatrove step, each suite entry). Every field can be
overridden with `--field value` (dashes or underscores). Unknown or mistyped keys are
refused by name, with the closest valid key suggested. A config's `suite:` lists datasets; each entry has a
`name` and any data or window field, and takes the top-level config, then its protocol's fields if it names
one, then its own fields.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from lm_ce.config.checks import check
from lm_ce.config.fields import FIELDS, Config, with_protocol
from lm_ce.config.protocols import protocol_values
from lm_ce.config.values import CLI, Words, coerce, field_type, note, noted, unknown
from lm_ce.errors import UsageError


def field_value(name: str, value, source: str):
    """A field's value from a file or the Python API, checked (a suite entry by entry)."""
    if name != "suite":
        return coerce(name, value, source)
    return None if value is None else suite_entries(value, source)


def load_yaml(path: str | Path) -> dict:
    """The fields of a YAML config file, checked by name and type."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist; give the path of a YAML file (see configs/)")
    try:
        data = _UniqueKeys.read(path.read_text(encoding="utf-8"), str(path)) or {}
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
            raise unknown(str(key), str(path))
        out[name] = field_value(name, value, str(path))
    return out


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last, silently)."""

    @classmethod
    def read(cls, text: str, name: str):
        loader = cls(text)
        loader.name = name  # named in the refusal
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise UsageError(f"{self.name}:{key_node.start_mark.line + 1}: key '{key}' is given twice in one "
                                 "mapping; give it once")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


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
        if negate and field_type(name[3:])[0] is not bool:
            raise UsageError(f"command line: --{key} is not a flag: --{name[3:].replace('_', '-')} takes a value, "
                             "not a no- form")
        if negate:
            name = name[3:]
        if name not in FIELDS:
            raise unknown("--" + key, "command line")
        if name == "suite":
            raise UsageError("command line: a suite is a list of datasets; give it in a config file (see configs/)")
        if name in out and field_type(name)[2]:  # `--data-files a --data-files b` would score b alone, silently
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"command line: {flag} is given twice; give all its values after one {flag} "
                             f"({flag} a b, or a,b)")
        kind, _, is_list = field_type(name)
        if negate:
            out[name] = False
        elif eq:
            out[name] = coerce(name, value, "command line")
        elif kind is bool and (i + 1 == len(args) or args[i + 1].startswith("--")):
            out[name] = True
        elif is_list and i + 1 < len(args):  # --data-files a.jsonl b.jsonl (or a.jsonl,b.jsonl)
            words = []
            while i + 1 < len(args) and not args[i + 1].startswith("--"):
                i += 1
                words.append(args[i])
            value = words[0] if len(words) == 1 else [v for w in words for v in w.split(",") if v]
            out[name] = coerce(name, value, "command line")  # one word: as before ("none", "a,b", "")
        elif i + 1 < len(args):
            i += 1
            out[name] = coerce(name, args[i], "command line")
        else:
            raise UsageError(f"command line: --{key} needs a value")
        i += 1
    return out


def build_config(args: list[str]) -> Config:
    """Config from `[--config FILE] [--field value ...]`: defaults, then the file, then the overrides."""
    given: dict[str, str] = {}
    values = given_values(args, given)
    files = sorted(set(given.values()) - {CLI})
    if len(files) == 1 and CLI not in given.values():  # `--config FILE` alone: the file's words, naming the file
        return make_config(values, Words(files[0], given, where=files[0]))
    return make_config(values, Words(CLI, given))


def make_config(values: dict, words: Words) -> Config:
    """The one constructor of a checked Config, whatever its source: the fields given (typed by `coerce`) over their
    protocol's, every rule checked once in the source's words, and each suite entry in its own."""
    cfg = Config(**with_protocol(values))
    check(cfg, words)
    for number, entry in enumerate(cfg.suite or [], 1):
        check(entry_config(cfg, entry), words.entry(number, entry["name"], entry))
    note(cfg, words=words)
    return cfg


def words_of(cfg: Config) -> Words:
    """The words of the source a Config came from (the command line's for one built otherwise)."""
    return noted(cfg, "words") or Words()


def entry_words(cfg: Config, number: int, entry: dict) -> Words:
    """The words of suite entry `number` of cfg (from 1)."""
    return words_of(cfg).entry(number, entry["name"], entry)


def given_values(args: list[str], given: dict[str, str] | None = None) -> dict:
    """The fields `[--config FILE] [--field value ...]` give, checked by name and type (the file's, then the flags');
    `given` is filled with each field's source (the file's path, or the command line)."""
    given = {} if given is None else given
    values: dict = {}

    def from_file(path: str) -> None:
        found = load_yaml(path)
        values.update(found)
        given.update(dict.fromkeys(found, path))
    if "--config" in args or any(a.startswith("--config=") for a in args):
        rest = []
        i = 0
        while i < len(args):
            if args[i] == "--config":
                if i + 1 >= len(args):
                    raise UsageError("command line: --config needs a file path")
                from_file(args[i + 1])
                i += 2
                continue
            if args[i].startswith("--config="):
                from_file(args[i].split("=", 1)[1])
            else:
                rest.append(args[i])
            i += 1
        args = rest
    flags = parse_overrides(args)
    values.update(flags)
    given.update(dict.fromkeys(flags, CLI))
    return values


def config_for(**fields) -> Config:
    """A checked Config from explicit fields over their protocol's (what build_config does, for Python callers)."""
    return from_settings(fields, "config_for")


def from_settings(settings: dict, source: str) -> Config:
    """Config from keyword settings (the Python API), each checked by name and type as a config file's keys are,
    over the fields their protocol sets."""
    values = {}
    for key, value in settings.items():
        if key not in FIELDS:
            raise unknown(key, source)
        values[key] = field_value(key, value, source)
    return make_config(values, Words(source, dict.fromkeys(values, source), where=source))


SUITE_EXCLUDED = ("model", "revision", "dtype", "trust_remote_code", "gguf_cache", "compile", "threads", "compare_to",
                  "attn_implementation", "output_dir", "resume", "checkpoint_seconds", "plot", "progress", "seed", "suite")


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
                raise unknown(str(key), f"{where} ('{name}')")
            if field_name in SUITE_EXCLUDED:
                raise UsageError(f"{where} ('{name}'): '{key}' is set once for the whole suite, at the top level")
            out[field_name] = coerce(field_name, item, f"{where} ('{name}')")
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
