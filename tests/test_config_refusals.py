"""Settings refused before anything loads (one line, exit 2) or warned of once: empty --output-dir and --model,
a model compared twice, chunks too short to score, more threads than cores, and suites whose data or output
directories would stop them half-way."""
from __future__ import annotations

import builtins
import json

import pytest
import torch
import yaml

import lm_ce
from lm_ce.cli.main import main
from lm_ce.config.fields import Config
from lm_ce.errors import UsageError
from lm_ce.scoring import setup

from .conftest import make_jsonl

ROWS = [{"text": "The quick brown fox jumps over the lazy dog. " * 4}, {"text": "Hello world, and good morning."}]


@pytest.fixture
def good(tmp_path) -> str:
    return make_jsonl(tmp_path / "good.jsonl", ROWS)


def base(model: str, data: str) -> list[str]:
    return ["--model", model, "--data-files", data, "--progress", "false", "--plot", "false", "--batch-size", "4"]


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lm_ce: error: ") and "Traceback" not in err, err
    return lines[0]


REFUSED = [
    ("output-dir-empty", lambda m: ["--output-dir", ""], ["--output-dir is empty", "leave it out"]),
    ("model-empty", lambda m: ["--model", ""], ["--model is empty", "Hub id"]),
    ("model-blank", lambda m: ["--model", "  "], ["--model is empty"]),
    ("compare-to-twice-comma", lambda m: ["--compare-to", f"{m},{m}"], ["--compare-to names MODEL more than once"]),
    ("compare-to-twice-words", lambda m: ["--compare-to", m, m], ["--compare-to names MODEL more than once"]),
    ("llama-cpp-max-length-1", lambda m: ["--protocol", "llama-cpp", "--max-length", "1"],
     ["--mode llama-cpp --max-length 1 scores nothing", "--max-length 3 or more"]),
    ("llama-cpp-max-length-2", lambda m: ["--mode", "llama-cpp", "--max-length", "2"],
     ["--mode llama-cpp --max-length 2 scores nothing", "--max-length 3 or more"]),
    ("gptq-max-length-1", lambda m: ["--protocol", "gptq", "--max-length", "1"],
     ["--mode gptq --max-length 1 scores nothing", "first token is only context", "--max-length 2 or more"]),
]


@pytest.mark.parametrize("case,args,fragments", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_with_one_line(tiny_llama_dir, good, tmp_path, monkeypatch, capsys, case, args, fragments):
    monkeypatch.chdir(tmp_path)  # an output written by mistake would land here
    assert main(base(tiny_llama_dir, good) + args(tiny_llama_dir)) == 2
    line = one_line(capsys)
    for fragment in fragments:
        assert fragment.replace("MODEL", tiny_llama_dir) in line, (fragment, line)
    assert "--text-field" not in line
    assert list(tmp_path.iterdir()) == [tmp_path / "good.jsonl"]


@pytest.mark.parametrize("mode,shortest", [("llama-cpp", 3), ("gptq", 2)])
def test_the_shortest_chunk_allowed_scores_tokens(tiny_llama_dir, good, tmp_path, capsys, mode, shortest):
    """The bound is exact: one token fewer scores nothing (refused above), this many scores some."""
    out = tmp_path / "run"
    assert main(base(tiny_llama_dir, good) + ["--protocol", mode, "--max-length", str(shortest),
                                              "--output-dir", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["counts"]["tokens"] > 0


def test_python_api_refuses_the_same(tiny_llama, llama_tokenizer, tiny_llama_dir):
    for settings, needle in [({"output_dir": ""}, "lm_ce.evaluate: output_dir is empty"),
                             ({"compare_to": [tiny_llama_dir, tiny_llama_dir]}, "more than once"),
                             ({"protocol": "gptq", "max_length": 1}, "scores nothing")]:
        with pytest.raises(UsageError, match=needle) as e:
            lm_ce.evaluate(tiny_llama, llama_tokenizer, ["Hello world."], **settings)
        assert "\n" not in str(e.value)


def test_more_threads_than_cores_is_said_once(tiny_llama_dir, good, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(setup, "_said_threads", False)
    before = torch.get_num_threads()
    many = setup.cpu_cores() + 1
    try:
        for _ in range(2):  # a second run in the same process (a Trainer's callback) says nothing again
            assert main(base(tiny_llama_dir, good) + ["--threads", str(many)]) == 0
            assert torch.get_num_threads() == many
        said = [line for line in capsys.readouterr().err.splitlines() if "--threads" in line]
        assert said == [f"lm_ce: --threads {many} is more than the {many - 1} CPU cores available: the threads "
                        f"compete for the cores (slower, same figures); use --threads {many - 1} or less"]
        monkeypatch.setattr(setup, "_said_threads", False)
        setup.set_threads(Config(threads=setup.cpu_cores()), 1, torch.device("cpu"))  # as many as cores: no word
        assert "--threads" not in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def suite_config(tmp_path, model: str, files: dict[str, str], **fields) -> str:
    path = tmp_path / "suite.yaml"
    config = {"model": model, "progress": False, "plot": False, "max_length": 32, **fields,
              "suite": [{"name": name, "data_files": [data]} for name, data in files.items()]}
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


def test_suite_data_of_every_entry_is_checked_before_the_model_loads(tmp_path, good, capsys):
    """A missing file in the second entry is found before the first is scored (or the model looked for)."""
    missing = str(tmp_path / "missing.jsonl")
    path = suite_config(tmp_path, str(tmp_path / "no-such-model"), {"a": good, "b": missing})
    assert main(["--config", path, "--output-dir", str(tmp_path / "out")]) == 2
    line = one_line(capsys)
    assert line == f"lm_ce: error: suite entry 'b': data file {missing} does not exist; check --data-files"
    assert not (tmp_path / "out" / "a").exists()


def test_suite_data_that_cannot_be_read_is_refused_naming_the_entry(tmp_path, good, monkeypatch, capsys):
    locked = make_jsonl(tmp_path / "locked.jsonl", ROWS)
    real_open = builtins.open

    def open_(file, *args, **kwargs):  # tests run as root, for whom file permissions do not apply
        if str(file) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    path = suite_config(tmp_path, str(tmp_path / "no-such-model"), {"a": good, "b": locked})
    assert main(["--config", path]) == 2
    assert one_line(capsys) == (f"lm_ce: error: suite entry 'b': data file {locked} cannot be read (Permission "
                                "denied); check --data-files")


def test_suite_rerun_advice_names_the_entry_and_offers_resume(tmp_path, tiny_llama_dir, good, capsys):
    other = make_jsonl(tmp_path / "other.jsonl", ROWS[::-1])
    path = suite_config(tmp_path, tiny_llama_dir, {"a": good, "b": other})
    out = tmp_path / "out"
    assert main(["--config", path, "--output-dir", str(out)]) == 0
    for report in (f for f in out.iterdir() if f.is_file()):  # as if killed before the suite's own reports were written
        report.unlink()
    capsys.readouterr()
    assert main(["--config", path, "--output-dir", str(out)]) == 2
    line = one_line(capsys)
    assert line.startswith(f"lm_ce: error: suite entry 'a': {out / 'a'} holds a finished run")
    assert "continue the suite with --resume, replace it with --overwrite" in line
    assert main(["--config", path, "--output-dir", str(out), "--resume"]) == 0
    assert json.loads((out / "results.json").read_text())["complete"] is True
    capsys.readouterr()
    assert main(["--config", path, "--output-dir", str(out)]) == 2  # the suite's own results.json: an entry first
    assert "suite entry 'a'" in one_line(capsys)
