"""The manual's lists cannot go stale: every key a real results.json has (document, stream, llama-cpp, suite,
merged, --compare-to, --min-k, LongPPL, context curve, multiple choice, surprisal) is documented in docs/reports.md (compare tables on
comparing.md) and every documented key of those kinds exists; every file a run writes is in the list the manual
is drawn from; the pages, the configuration page's groups and the suite example match their sources."""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from lm_ce.cli import main as cli
from lm_ce.rundir import claims

from .conftest import corpus_rows, make_jsonl

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# documented keys that the runs below cannot have, and why
ELSEWHERE = ("explain",)  # lm-ce explain: tests/test_explain.py
ABSENT = {
    "data.dataset", "data.dataset_config", "data.split", "data.revision", "data.resolved_revision",  # Hub data
    "compare.<name>.bytes.*",  # a compared model of another tokenizer (tests/test_bytes.py)
    "longppl.evaluator_model.commit", "longppl.evaluator_model.weights", "longppl.evaluator_model.tokenizer",
    "compare.<name>.model.commit",  # a Hub model's
    "shard.index", "shard.count",  # a shard's own results.json (merged runs carry `merged`)
    "model.weights.tensors",  # a model object given to lm_ce.evaluate
}


def documented(*pages: str) -> list[str]:
    """Every key path in the first column of the pages' key tables, expanded: `a.{b,c}` is a.b and a.c; `.x` after
    `a.b.c` is a.b.x; `<name>` stands for any one key."""
    keys = []
    for page in pages:
        text = (DOCS / page).read_text(encoding="utf-8")
        text = re.sub(r"\n### lm-ce explain\n.*?(?=\n## )", "\n", text, flags=re.S)  # explain's own results.json
        for line in text.splitlines():
            if not line.startswith("| `"):
                continue
            prefix = ""
            for token in re.findall(r"`([^`]+)`", line.split(" | ")[0]):
                if token.startswith("."):
                    token = prefix + token[1:]
                prefix = token.rsplit(".", 1)[0] + "." if "." in token else ""
                keys += _expand(token.removesuffix("[]"))
    return keys


def _expand(token: str) -> list[str]:
    match = re.search(r"\{([^}]*)\}", token)
    if not match:
        return [token]
    return [k for part in match.group(1).split(",") for k in _expand(token[:match.start()] + part + token[match.end():])]


def pattern(key: str) -> re.Pattern:
    text = re.escape(key).replace(r"\*", ".+")
    return re.compile(re.sub(r"<[^>]+>", "[^.]+", text.replace(r"\<", "<").replace(r"\>", ">")) + "$")


def leaves(node, patterns, path="", found=None, used=None):
    """The key paths of `node` no documented key covers; `used` collects the documented keys that matched. A key
    documented as a whole (`config`, a map of files) covers what is under it; `compare.<name>.*` covers leaves."""
    found = [] if found is None else found
    hit = [key for key, p in patterns if path and "*" not in key and p.match(path)]
    if hit:
        used.update(hit)
    elif isinstance(node, dict) and node:
        for key, value in node.items():
            leaves(value, patterns, f"{path}.{key}" if path else str(key), found, used)
    elif path:
        wild = [key for key, p in patterns if "*" in key and p.match(path)]
        used.update(wild)
        if not wild and not (node is None and any(key.startswith(path + ".") for key, _ in patterns)):
            found.append(path)  # (a null in place of documented keys, `null for self`, is documented)
    return found


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """One directory per kind of run, each written by the command line."""
    work = tmp_path_factory.mktemp("manual")
    data = make_jsonl(work / "docs.jsonl", corpus_rows(12))
    base = ["--model", tiny_llama_dir, "--data-files", data, "--id-field", "id", "--max-length", "16",
            "--no-progress", "--batch-size", "4"]
    kinds = {
        "document": ["--group-field", "group", "--save-tokens", "--min-k", "0.2", "--context-curve", "8,16",
                     "--longppl-evaluator", "self", "--longppl-short", "8", "--longppl-step", "4", "--compare-to", tiny_llama_dir],
        "stream": ["--mode", "stream", "--stride", "8"],
        "llama-cpp": ["--protocol", "llama-cpp", "--max-length", "16", "--chunks", "4"],
    }
    out = {}
    for kind, extra in kinds.items():
        out[kind] = work / kind
        assert cli.main(base + extra + ["--output-dir", str(out[kind])]) == 0
    for k in range(2):
        assert cli.main(base + ["--group-field", "group", "--shard", f"{k}/2", "--chunk-documents", "4",
                                "--output-dir", str(work / f"s{k}")]) == 0
    out["merged"] = work / "merged"
    assert cli.main(["merge", str(work / "s0"), str(work / "s1"), "--output-dir", str(out["merged"])]) == 0
    suite = work / "suite.yaml"
    suite.write_text(yaml.safe_dump({"model": tiny_llama_dir, "data_files": [data], "max_length": 16, "progress": False,
                                     "output_dir": str(work / "suite"),
                                     "suite": [{"name": "a", "limit": 6}, {"name": "b", "mode": "stream"}]}))
    assert cli.main(["--config", str(suite)]) == 0
    out["suite"] = work / "suite"
    tasks = ROOT / "tests" / "data" / "tasks"
    for kind, (rows, key) in {"multiple-choice": ("mc_items.jsonl", "id"),
                              "surprisal": ("surprisal_docs.jsonl", "document")}.items():
        out[kind] = work / kind
        assert cli.main(["--model", tiny_llama_dir, "--task", kind, "--data-files", str(tasks / rows), "--id-field", key,
                         "--no-progress", "--output-dir", str(out[kind])]) == 0
    return out


def test_every_key_of_every_kind_of_run_is_documented_and_every_documented_key_exists(runs):
    keys = documented("reports.md") + [f"compare.<name>.{k}" for k in documented("comparing.md") if "." not in k[:1]]
    patterns = [(k, pattern(k)) for k in keys]
    used: set[str] = set()
    missing = {kind: leaves(json.loads((d / "results.json").read_text()), patterns, used=used) for kind, d in runs.items()}
    assert not any(missing.values()), f"results.json keys not in docs/reports.md: {missing}"
    expected = {k for k in documented("reports.md") if k.split(".")[0] not in ELSEWHERE} - ABSENT
    assert not expected - used, f"documented keys no run wrote: {sorted(expected - used)}"


def test_every_file_a_run_writes_is_in_the_manuals_list(runs):
    listed = set(claims.WRITES) | {claims.STATE}
    for kind, directory in runs.items():
        for path in directory.rglob("*"):
            if path.is_file() and not path.name.startswith(".") and "datasets_cache" not in path.parts:
                name = path.name
                assert name in listed or re.fullmatch(r"state-[0-9a-f]+\.safetensors", name), (kind, path)
    assert set(claims.REPORTS) == set(claims.WRITES) and set(claims.RUN_FILES) >= set(claims.WRITES)


def test_every_page_is_in_the_index_and_the_readme():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", "#"))["nav"]
    pages = {file for entry in nav for file in entry.values()} - {"index.md"}
    index = set(re.findall(r"^\| \[[^]]+\]\(([^)#]+)\)", (DOCS / "index.md").read_text(), re.M))
    readme = set(re.findall(r"^- \[[^]]+\]\(docs/([^)#]+)\)", (ROOT / "README.md").read_text(), re.M))
    assert index == pages, (pages - index, index - pages)
    assert readme == pages, (pages - readme, readme - pages)


def test_the_configuration_page_follows_help_s_order_of_groups():
    sys.path.insert(0, str(DOCS / "hooks"))
    import config_table

    from lm_ce.cli.help import help_text
    from lm_ce.config.fields import Config

    page = [line[4:].lower() for line in config_table.config_tables().splitlines() if line.startswith("### ")]
    shown = [line[:-1] for line in help_text().splitlines() if re.fullmatch(r"[a-z]+:", line)]
    assert page == shown and len(shown) == len({f.metadata["group"] for f in dataclasses.fields(Config)})


def test_the_suite_example_is_the_config_file():
    text = (DOCS / "suites.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    assert yaml.safe_load(block) == yaml.safe_load((ROOT / "configs" / "local_suite.yaml").read_text())
    assert f"{len(yaml.safe_load(block)['suite'])} protocols" in text.replace("three", "3")


def test_the_run_files_hook_lists_every_file():
    sys.path.insert(0, str(DOCS / "hooks"))
    import run_files

    table = run_files.run_files_table()
    assert all(f"| `{name}` |" in table for name in claims.WRITES) and "state.json" in table
    listed = run_files.overwrite_files()
    assert all(f"`{name}`" in listed for name in claims.RUN_FILES)
