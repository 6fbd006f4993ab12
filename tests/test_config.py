"""lm_ce.config: YAML files and flags, their precedence and types, and the refusals with one clear line."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lm_ce.cli import main as cli
from lm_ce.config.checks import check
from lm_ce.config.fields import FIELDS, GROUPS, Config
from lm_ce.config.sources import build_config, load_yaml, parse_overrides
from lm_ce.errors import UsageError


def write_yaml(tmp_path, text: str, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_defaults_then_file_then_flags(tmp_path):
    path = write_yaml(tmp_path, "batch_size: 4\nmax-length: 64\nmode: stream\n")
    cfg = build_config(["--batch-size", "2", "--config", path])  # flags win wherever --config stands
    assert (cfg.batch_size, cfg.max_length, cfg.mode) == (2, 64, "stream")
    assert dataclasses.replace(cfg, batch_size=8, max_length=None, mode="document") == Config()  # the rest: defaults
    assert build_config([f"--config={path}"]).batch_size == 4
    assert build_config([]) == Config()


def test_later_files_and_flags_win(tmp_path):
    first = write_yaml(tmp_path, "batch_size: 4\nlimit: 10\n", "first.yaml")
    second = write_yaml(tmp_path, "batch_size: 6\n", "second.yaml")
    cfg = build_config(["--config", first, "--config", second])
    assert (cfg.batch_size, cfg.limit) == (6, 10)
    assert build_config(["--limit", "3", "--limit", "5"]).limit == 5


def test_resolved_config_round_trips(tmp_path):
    cfg = build_config(["--model", "m", "--data-files", "a.jsonl,b.jsonl", "--no-plot", "--stride", "16",
                        "--max-length", "32", "--separator", " | "])
    path = write_yaml(tmp_path, yaml.safe_dump(cfg.resolved()))
    assert build_config(["--config", path]) == cfg


@pytest.mark.parametrize(
    "args, field, value",
    [
        (["--max-length", "64"], "max_length", 64),
        (["--max-length=64"], "max_length", 64),
        (["--max_length", " 64 "], "max_length", 64),  # underscores too; spaces around a number
        (["--streaming"], "streaming", True),
        (["--streaming", "--limit", "3"], "streaming", True),  # a bare flag before another flag
        (["--streaming", "false"], "streaming", False),
        (["--streaming=yes"], "streaming", True),
        (["--plot", "0"], "plot", False),
        (["--no-plot"], "plot", False),
        (["--no-progress"], "progress", False),
        (["--revision", "none"], "revision", None),
        (["--stride", "null"], "stride", None),
        (["--model", "none"], "model", "none"),  # not optional: 'none' is just a name
        (["--data-files", "a.jsonl,b.jsonl"], "data_files", ["a.jsonl", "b.jsonl"]),
        (["--data-files", "a.jsonl", "b.jsonl", "--limit", "3"], "data_files", ["a.jsonl", "b.jsonl"]),
        (["--compare-to", "m1", "m2,m3"], "compare_to", ["m1", "m2", "m3"]),
        (["--data-files", "a.jsonl"], "data_files", ["a.jsonl"]),
        (["--compare-to", "x,,y"], "compare_to", ["x", "y"]),
        (["--join-by", "book,part"], "join_by", ["book", "part"]),
    ],
)
def test_flags_are_coerced(args, field, value):
    out = parse_overrides(args)
    assert out[field] == value and type(out[field]) is type(value)


@pytest.mark.parametrize(
    "text, field, value",
    [
        ("data_files: [a.jsonl, b.jsonl]\n", "data_files", ["a.jsonl", "b.jsonl"]),
        ("data_files: a.jsonl,b.jsonl\n", "data_files", ["a.jsonl", "b.jsonl"]),
        ("data_files: a.jsonl\n", "data_files", ["a.jsonl"]),
        ("split: 1\n", "split", "1"),  # YAML reads a number; the field is a string
        ("streaming: yes\n", "streaming", True),
        ("streaming: 'off'\n", "streaming", False),
        ("limit: '12'\n", "limit", 12),
        ("revision: null\n", "revision", None),
        ("prompt-field: question\n", "prompt_field", "question"),
    ],
)
def test_yaml_values_are_coerced(tmp_path, text, field, value):
    out = load_yaml(write_yaml(tmp_path, text))
    assert out == {field: value} and type(out[field]) is type(value)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-length", "abc"], "command line: --max-length must be a whole number, got 'abc'"),
        (["--streaming", "maybe"], "command line: --streaming must be true or false, got 'maybe'"),
        (["--mode", "windows"], "command line: --mode is 'windows'; choose one of document, stream, llama-cpp, gptq"),
        (["--limit"], "command line: --limit needs a value"),
        (["model"], "unexpected argument 'model'; fields are given as --name value"),
        (["--max-lenght", "5"], "command line: unknown flag '--max-lenght'; did you mean --max-length?"),
        (["--zzqqxx"], "command line: unknown flag '--zzqqxx'; see --help for the flags"),
    ],
)
def test_bad_flags_are_refused(args, message):
    with pytest.raises(UsageError) as e:
        parse_overrides(args)
    assert str(e.value) == message


@pytest.mark.parametrize(
    "text, message",
    [
        ("max_lenght: 5\n", "unknown field 'max_lenght'; did you mean 'max_length'?"),
        ("qqqqzzzz: 5\n", "unknown field 'qqqqzzzz'; valid fields: model, revision,"),
        ("batch_size: true\n", "field 'batch_size' must be a whole number, got True"),
        ("batch_size: 2.5\n", "field 'batch_size' must be a whole number, got 2.5"),
        ("model: null\n", "field 'model' cannot be empty; give a str"),
        ("model: [a, b]\n", "field 'model' must be a string, got ['a', 'b']"),
        ("padding_side: middle\n", "field 'padding_side' is 'middle'; choose one of right, left"),
        ("- a\n- b\n", "expected a mapping of field: value at the top level"),
        ("model: [unclosed\n", "not valid YAML at line 2; fix the file"),
    ],
)
def test_bad_yaml_is_refused_naming_the_file(tmp_path, text, message):
    path = write_yaml(tmp_path, text)
    with pytest.raises(UsageError) as e:
        load_yaml(path)
    assert str(e.value).startswith(f"{path}: {message}"), str(e.value)


def test_config_file_that_cannot_be_read(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        build_config(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(UsageError, match="--config needs a file path"):
        build_config(["--config"])
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"model: gpt2\nsplit: caf\xe9\n")
    with pytest.raises(UsageError, match=r"latin\.yaml:2: not UTF-8 text"):
        load_yaml(latin)
    empty = write_yaml(tmp_path, "", "empty.yaml")
    assert load_yaml(empty) == {}  # an empty file changes nothing


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"max_length": 0}, "--max-length must be at least 1, got 0"),
        ({"batch_size": -1}, "--batch-size must be at least 1, got -1"),
        ({"checkpoint_seconds": 0}, "--checkpoint-seconds must be at least 1, got 0"),
        ({"max_length": 8, "stride": 9}, "--stride 9 is larger than --max-length 8"),
        ({"resume": True}, "--resume needs --output-dir"),
        ({"prompt_field": "q", "mode": "stream"}, "--prompt-field needs --mode document"),
        ({"dtype": "float8"}, "field 'dtype' is 'float8'; choose one of auto, float32, bfloat16, float16"),
    ],
)
def test_check_refuses_settings_that_cannot_work(fields, message):
    with pytest.raises(UsageError) as e:
        check(Config(**fields))
    assert str(e.value).startswith(message)


def test_check_accepts_what_can_work():
    check(Config())
    check(Config(max_length=8, stride=8, resume=True, output_dir="out", prompt_field="q", limit=1))
    check(Config(stride=512))  # max_length from the model: the stride is checked once it is known
    with pytest.raises(UsageError):
        build_config(["--max-length", "8", "--stride", "9"])  # build_config checks too


@pytest.mark.parametrize("flag", ["--no-model", "--no-limit"])
def test_no_form_only_for_boolean_fields(flag):
    with pytest.raises(UsageError):
        parse_overrides([flag])


def test_misspelt_no_flag_suggests_the_no_flag():
    with pytest.raises(UsageError, match="did you mean --no-plot[?]"):
        parse_overrides(["--no-plott"])


def test_every_field_has_a_group_and_one_line_of_help():
    """The docs' field table and --help are both built from these two metadata keys."""
    for f in dataclasses.fields(Config):
        assert f.metadata.get("group") in GROUPS, f.name
        help_ = f.metadata.get("help")
        assert isinstance(help_, str) and help_.strip() and "\n" not in help_, f.name
    assert {f.metadata["group"] for f in dataclasses.fields(Config)} == set(GROUPS)


def test_help_lists_every_field_under_its_group(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    starts = [out.index(f"\n{group}:\n") for group in GROUPS]  # each heading, in order
    assert starts == sorted(starts)
    for f in dataclasses.fields(Config):
        group = GROUPS.index(f.metadata["group"])
        section = out[starts[group]: starts[group + 1] if group + 1 < len(GROUPS) else len(out)]
        flag = "suite:" if f.name == "suite" else f.name.replace("_", "-")
        assert flag in section, f.name
        assert " ".join(f.metadata["help"].split()) in " ".join(section.split()), f.name
    assert "--[no-]plot" in flat and "--max-length N" in flat and "[default: \\n\\n]" in flat


def test_evaluate_script_prints_the_grouped_help():
    script = Path(__file__).resolve().parent.parent / "scripts" / "evaluate.py"
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and not done.stderr
    assert "\nplacement:\n  --device-map K=V,..." in done.stdout
    assert dict(FIELDS["offload_folder"].metadata)["help"] in " ".join(done.stdout.split())
