"""The manual and the README: the site builds strictly, every page it names exists, no project issue numbers,
the README stays a front page, and the README's examples that need no Hub run as written."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lm_ce.config.fields import Config

from .conftest import SMALL, tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# The pages the manual must have (corpora and shards are added by their own work).
PAGES = ["index.md", "getting-started.md", "data-and-models.md", "windows-and-protocols.md", "reports.md",
         "multiple-choice.md", "surprisal.md", "comparing.md", "suites.md", "placement.md", "corpus.md", "python-api.md", "configuration.md", "reliability.md",
         "benchmark.md", "design.md"]
# "issue 17", "issues 15 and 17", "#17": numbers of the project's own issue tracker mean nothing to a reader.
ISSUE_NUMBER = re.compile(r"\bissues?\s+#?\d+|(?<![\w&/])#\d+\b", re.IGNORECASE)


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def code_blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of a Markdown text in this language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def nav_pages(nav) -> list[str]:
    """Every Markdown file named in mkdocs.yml's nav, however deep."""
    if isinstance(nav, str):
        return [nav] if nav.endswith(".md") else []
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in nav_pages(value)]
    return [p for item in nav for p in nav_pages(item)]


def doc_texts() -> dict[str, str]:
    files = [README, ROOT / "CHANGELOG.md", *sorted(DOCS.rglob("*.md"))]
    return {str(f.relative_to(ROOT)): f.read_text(encoding="utf-8") for f in files}


def test_issue_number_pattern():
    for text in ("as issue 17 asks", "Issues 15", "see #17", "(#3333)"):
        assert ISSUE_NUMBER.search(text), text
    for text in ("[link](reports.md#standard-errors)", "`p99_9`", "issue a warning", "&#8203;"):
        assert not ISSUE_NUMBER.search(text), text


def test_no_issue_numbers_in_readme_or_docs():
    found = [f"{name}: {m.group(0)!r}" for name, text in doc_texts().items() for m in ISSUE_NUMBER.finditer(text)]
    assert not found, found


def test_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"


def test_every_page_in_the_nav_exists():
    nav = nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"])
    assert set(PAGES) <= set(nav), sorted(set(PAGES) - set(nav))
    missing = [page for page in nav if not (DOCS / page).is_file()]
    assert not missing, missing


def test_readme_links_into_the_manual_exist():
    targets = re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#[\w-]*)?\)", README.read_text(encoding="utf-8"))
    assert any(t.startswith("docs/") for t in targets)
    missing = [t for t in targets if not (ROOT / t).is_file()]
    assert not missing, missing


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(site)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    configuration = (site / "configuration" / "index.html").read_text(encoding="utf-8")
    for field in dataclasses.fields(Config):  # the hook's table names every field
        assert f"<code>{field.name}</code>" in configuration, field.name
    api = (site / "python-api" / "index.html").read_text(encoding="utf-8")
    assert "Exact perplexity and bits per byte" in api  # lm_ce.api.evaluate's docstring, drawn by mkdocstrings


def test_readme_python_example_runs(tmp_path, llama_tokenizer):
    """The README's Python API example as written, on a tiny model in place of ./my_model."""
    blocks = [b for b in code_blocks(README.read_text(encoding="utf-8"), "python") if "lm_ce.evaluate(" in b]
    assert len(blocks) == 1, "the README shows one lm_ce.evaluate example"
    assert blocks[0].count('"./my_model"') == 2
    model_dir = tiny_model_dir(tmp_path / "model", "LlamaForCausalLM", llama_tokenizer, seed=0, init=lambda m: None,
                               num_key_value_heads=2, **{**SMALL, "max_position_embeddings": 1024})
    code = blocks[0].replace('"./my_model"', json.dumps(model_dir))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    perplexity, bits_per_byte = (float(x) for x in done.stdout.split())
    assert perplexity > 1 and bits_per_byte > 0
    assert not list(tmp_path.glob("runs")), "the example writes nothing without output_dir"


def readme_cli_command() -> list[str]:
    """The evaluation part of the README's first command (after its pip installs), as words."""
    bash = "\n".join(code_blocks(README.read_text(encoding="utf-8"), "bash"))
    lines = [line for line in bash.splitlines() if "configs/embedded.yaml" in line and line.startswith("pip install")]
    assert len(lines) == 1, "the README's first command installs and evaluates the embedded default"
    words = shlex.split(lines[0].split("&&")[-1])
    assert words[:2] == ["python", "scripts/evaluate.py"], words
    return [sys.executable, *words[1:]]


@pytest.mark.slow
def test_readme_cli_example_runs(tmp_path):
    """The README's first command on two documents (loads SmolLM2 from its package)."""
    out = tmp_path / "run"
    command = readme_cli_command() + ["--limit", "2", "--output-dir", str(out), "--no-progress"]
    done = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert summary["complete"] and summary["counts"]["documents"] == 2 and summary["counts"]["tokens"] > 0
