"""One way in for every setting: the command line, a YAML file, lm_ce.evaluate, PerplexityCallback, PerplexityStats
and a suite entry build a Config through one constructor, refuse the same settings by the same rule, each in its
own words (`--stride` on the command line, `stride` in a file or in Python), and check each rule once."""
from __future__ import annotations

import json
import os
import re

import pytest
import yaml

import lm_ce
from lm_ce.cli.main import main
from lm_ce.config import checks
from lm_ce.config.fields import FIELDS
from lm_ce.config.sources import build_config, from_settings
from lm_ce.errors import UsageError

from .conftest import SENTENCES, make_jsonl


def cli_args(settings: dict) -> list[str]:
    """The flags that give `settings` (lists joined by commas, booleans as flags)."""
    out = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            out.append(flag)
        else:
            out += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return out


def refusal(build) -> str:
    with pytest.raises(UsageError) as e:
        build()
    assert "\n" not in str(e.value)
    return str(e.value)


# (settings, the rule's own words, then how the command line and the other doors name the settings in it)
SAME_RULE = [
    ({"mode": "llama-cpp", "stride": 5}, "cuts non-overlapping chunks and takes no",
     "--mode llama-cpp cuts non-overlapping chunks and takes no --stride; drop --stride",
     "mode='llama-cpp' cuts non-overlapping chunks and takes no stride; drop stride"),
    ({"max_length": 8, "stride": 9}, "would never be scored",
     "--stride 9 is larger than --max-length 8", "stride=9 is larger than max_length=8"),
    ({"bos_policy": "none", "prefix_token": "bos"}, "contradict; give one of them",
     "--bos-policy none and --prefix-token bos contradict", "bos_policy='none' and prefix_token='bos' contradict"),
    ({"context_curve": [64, 32]}, "strictly increasing lengths",
     "--context-curve 64,32: give", "context_curve=[64, 32]: give"),
]


@pytest.mark.parametrize("settings, rule, cli, words", SAME_RULE)
def test_every_door_refuses_by_the_same_rule_in_its_own_words(settings, rule, cli, words, tmp_path, tiny_llama,
                                                              llama_tokenizer, tiny_llama_dir):
    from lm_ce.integrations.datatrove import NOT_HERE, PerplexityStats

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"suite": [{"name": "ok"}, {"name": "b", **settings}]}), encoding="utf-8")
    texts = ["Hello world."]
    doors = {
        cli: lambda: build_config(cli_args(settings)),
        f"{path}: {words}": lambda: build_config(["--config", str(path)]),
        f"lm_ce.evaluate: {words}": lambda: lm_ce.evaluate(tiny_llama, llama_tokenizer, texts, **settings),
        f"lm_ce.PerplexityCallback: {words}": lambda: lm_ce.PerplexityCallback(texts, **settings),
        f"lm_ce.PerplexityStats: {words}": lambda: PerplexityStats(model=tiny_llama_dir, **settings),
        f"{suite}: suite entry 2 ('b'): {words}": lambda: build_config(["--config", str(suite)]),
        f"lm_ce.evaluate: suite entry 2 ('b'): {words}": lambda: lm_ce.evaluate(
            tiny_llama, llama_tokenizer, suite=[{"name": "ok"}, {"name": "b", **settings}]),
    }
    if any(name in NOT_HERE for name in settings):  # the step refuses these settings before any rule
        del doors[f"lm_ce.PerplexityStats: {words}"]
    for expected, build in doors.items():
        message = refusal(build)
        assert rule in message and message.startswith(expected), (expected, message)


@pytest.mark.parametrize("settings", [s for s, *_ in SAME_RULE] + [
    {"protocol": "gptq", "max_length": 1}, {"min_k": 0.5, "mode": "stream"}, {"shard": "3/2"},
    {"output_dir": "x", "overwrite": True, "resume": True}, {"task": "surprisal", "prefix_token": "none"},
    {"resume": True}, {"max_memory": {0: "1GiB"}}, {"chunks": 2},
])
def test_the_api_refuses_what_the_command_line_refuses(settings):
    cli = refusal(lambda: build_config(cli_args(settings) if "max_memory" not in settings
                                       else ["--max-memory", "0=1GiB"]))
    python = refusal(lambda: from_settings(settings, "lm_ce.evaluate"))
    assert python.startswith("lm_ce.evaluate: ") and "--" in cli and "--" not in python, (cli, python)
    assert rule_words(cli) == rule_words(python.removeprefix("lm_ce.evaluate: ")), (cli, python)


def rule_words(message: str) -> list[str]:
    """The words of a refusal that are not the names of fields (the same in every source's words)."""
    parts = {part for name in FIELDS for part in name.split("_")}
    return [word for word in re.findall(r"[a-z]{4,}", message) if word not in parts]


def test_the_api_accepts_what_the_command_line_accepts():
    for settings in ({"mode": "llama-cpp", "max_length": 16}, {"max_length": 8, "stride": 4},
                     {"context_curve": [4, 8]}, {"protocol": "hf-docs"}):
        assert build_config(cli_args(settings)) == from_settings(settings, "lm_ce.evaluate")


def test_each_rule_runs_once_on_the_command_line(tiny_llama_dir, tmp_path, monkeypatch):
    """A suite of one entry from the command line: the settings' rules run once for the suite and once for its
    entry (the door checks; the runner finds them checked), the entry's data files are looked at once."""
    import lm_ce.suite

    data = make_jsonl(tmp_path / "a.jsonl", [{"text": s} for s in SENTENCES[:2]])
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"model": tiny_llama_dir, "progress": False, "plot": False, "page": False,
                                    "max_length": 16, "suite": [{"name": "a", "data_files": [data]}]}))
    calls = {"rules": 0, "data files": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(checks, "check_context_curve", counting("rules", checks.check_context_curve))
    monkeypatch.setattr(lm_ce.suite, "local_files", counting("data files", lm_ce.suite.local_files))
    assert main(["--config", str(path), "--output-dir", str(tmp_path / "out")]) == 0
    assert calls == {"rules": 2, "data files": 1}


def test_a_suite_entry_beyond_the_model_is_refused_before_any_entry_is_scored(tiny_llama, llama_tokenizer, tmp_path):
    """The tiny model has 256 positions: entry 'b' (gptq: 2048-token chunks) is refused once the model is loaded,
    naming the entry and the protocol, before entry 'a' is scored."""
    data = make_jsonl(tmp_path / "a.jsonl", [{"text": s} for s in SENTENCES[:2]])
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"model": "unused", "output_dir": str(tmp_path / "out"), "progress": False,
                                    "suite": [{"name": "a", "data_files": [data], "max_length": 16},
                                              {"name": "b", "data_files": [data], "protocol": "gptq"}]}))
    from lm_ce.runner import evaluate

    cfg = build_config(["--config", str(path)])
    message = refusal(lambda: evaluate(cfg, model=tiny_llama, tokenizer=llama_tokenizer))
    assert message.startswith(f"{path}: suite entry 2 ('b'): max_length=2048, set by protocol='gptq', is beyond "
                              "the model's 256 positions; use max_length=256 or less"), message
    assert not (tmp_path / "out" / "a").exists() or not any((tmp_path / "out" / "a").iterdir())
    cli = refusal(lambda: evaluate(build_config(["--model", "m", "--data-files", data, "--max-length", "300"]),
                                   model=tiny_llama, tokenizer=llama_tokenizer))
    assert cli.startswith("--max-length 300 is beyond the model's 256 positions; use --max-length 256 or less")


def test_a_yaml_key_twice_and_a_list_flag_twice_are_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("max_length: 8\nstride: 4\nmax_length: 16\n")
    assert refusal(lambda: build_config(["--config", str(path)])) == (
        f"{path}:3: key 'max_length' is given twice in one mapping; give it once")
    path.write_text("suite:\n- name: a\n  limit: 1\n  limit: 2\n")
    assert "key 'limit' is given twice" in refusal(lambda: build_config(["--config", str(path)]))
    for name in ("data_files", "compare_to", "context_curve", "join_by", "byte_classes"):
        flag = "--" + name.replace("_", "-")
        message = refusal(lambda: build_config([flag, "1", flag, "2"]))
        assert message.startswith(f"command line: {flag} is given twice; give all its values after one {flag}")
    assert build_config(["--data-files", "a.jsonl", "b.jsonl"]).data_files == ["a.jsonl", "b.jsonl"]
    assert build_config(["--limit", "3", "--limit", "5"]).limit == 5  # a later flag wins, as over a file's value


def test_the_api_refuses_names_where_objects_belong(tiny_llama, llama_tokenizer, tiny_llama_dir, tmp_path,
                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    texts = ["Hello world."]
    assert refusal(lambda: lm_ce.evaluate(tiny_llama_dir, llama_tokenizer, texts)).startswith(
        "lm_ce.evaluate: model must be a loaded model")
    assert refusal(lambda: lm_ce.evaluate(None, llama_tokenizer, texts)).startswith(
        "lm_ce.evaluate: model must be a loaded model (a torch.nn.Module, e.g. AutoModelForCausalLM.from_pretrained"
        "(...)), got None")
    assert refusal(lambda: lm_ce.evaluate(tiny_llama, "gpt2", texts)).startswith(
        "lm_ce.evaluate: tokenizer must be the model's tokenizer")
    assert refusal(lambda: lm_ce.evaluate(tiny_llama, llama_tokenizer, texts, output_dir=5)) == (
        "lm_ce.evaluate: field 'output_dir' must be a string, got 5")
    assert not (tmp_path / "5").exists()


def test_the_callback_refuses_at_construction(tiny_llama, llama_tokenizer, tmp_path):
    texts = ["Hello world."]
    assert refusal(lambda: lm_ce.PerplexityCallback(texts, tokenizer="gpt2")).startswith(
        "lm_ce.PerplexityCallback: tokenizer must be the model's tokenizer")
    out = tmp_path / "run"
    lm_ce.evaluate(tiny_llama, llama_tokenizer, texts, output_dir=str(out), max_length=16, progress=False)
    message = refusal(lambda: lm_ce.PerplexityCallback(texts, output_dir=str(out)))
    assert message.startswith(f"lm_ce.PerplexityCallback: output_dir {out} holds a finished run") and (
        "overwrite=True" in message), message
    lm_ce.PerplexityCallback(texts, output_dir=str(out), overwrite=True)  # says what to do with it: accepted


@pytest.mark.parametrize("value", ["5", None, 2.5, 0, True])
def test_the_step_refuses_a_documents_per_call_that_is_no_count(tiny_llama_dir, value):
    from lm_ce.integrations.datatrove import PerplexityStats

    assert refusal(lambda: PerplexityStats(model=tiny_llama_dir, documents_per_call=value)) == (
        f"lm_ce.PerplexityStats: documents_per_call must be a whole number of at least 1, got {value!r}")


@pytest.mark.parametrize("settings", [{"shard": "0/2"}, {"min_k": 0.2}, {"longppl_evaluator": "self"},
                                      {"context_curve": [4, 8]}])
def test_the_step_refuses_what_it_would_drop(tiny_llama_dir, settings):
    from lm_ce.integrations.datatrove import PerplexityStats

    name = next(iter(settings))
    assert refusal(lambda: PerplexityStats(model=tiny_llama_dir, **settings)).startswith(
        f"lm_ce.PerplexityStats: setting '{name}' does not apply to a pipeline step")


def test_the_step_skips_a_text_that_is_no_string(tiny_llama_dir):
    """As the command line skips such a row: the others are scored, it gets the figures of nothing scored."""
    from datatrove.data import Document

    from lm_ce.integrations.datatrove import PerplexityStats

    step = PerplexityStats(model=tiny_llama_dir, documents_per_call=3, max_length=16)
    docs = [Document(text="Hello world.", id="a"), Document(text=None, id="b"), Document(text="Is it raining?", id="c")]
    out = list(step.run(iter(docs)))
    assert [d.metadata["lm_ce_tokens"] > 0 for d in out] == [True, False, True]
    assert step.stats["lm_ce_skipped"].total == 1
    assert json.dumps([d.metadata for d in out])  # every value a plain number
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
