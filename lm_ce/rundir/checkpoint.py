"""Saved progress of a run: exact sums so far, where in the data, and a fingerprint of what was run.

The state (rundir/state.py: state.json and the records' file, data and never code) is written whole and then
renamed, so a crash while saving leaves the previous state intact. A resume with a different model, data or
setting is refused by the fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lm_ce import __version__
from lm_ce.config.fields import Config, resolve_path
from lm_ce.errors import UsageError
from lm_ce.rundir import state as saved
from lm_ce.rundir.outputs import DOCUMENTS, rows_digest
from lm_ce.rundir.state import LEGACY, STATE
# Settings that change which tokens are scored, how batches are formed, or what is recorded.
FINGERPRINTED = (
    "model", "revision", "dtype", "dataset", "dataset_config", "split", "data_files", "text_field", "prompt_field",
    "group_field", "id_field", "join_by", "streaming", "limit", "mode", "max_length", "stride", "prefix_token",
    "separator", "batch_size", "token_budget", "padding_side", "chunk_documents", "compare_to", "save_tokens",
    "dataset_revision",
    "protocol", "bos_policy", "chunks", "detokenizer", "shard", "min_k",
    "longppl_evaluator", "longppl_short", "longppl_step", "longppl_alpha", "longppl_beta",
    "task", "layout", "context_field", "choices_field", "label_field", "choice_delimiter", "llama_cpp_quirk",
    "words_field", "surprisal_unit", "bow_correction", "bow_style",
)


def model_identity(spec: str) -> str:
    """The model as a resume compares it: a local path resolved (./tiny/ and /abs/path/tiny are one model), else
    the name as given (a Hub id)."""
    try:
        path = resolve_path(spec)
    except UsageError:
        return spec
    return os.path.realpath(path) if os.path.exists(path) else spec


def fingerprint(cfg: Config) -> str:
    """A hash of every setting that affects the result, the model's path resolved. What the model, tokenizer and
    data are by content is recorded beside it (the state's `identity`: rundir/identity.py) and compared as read."""
    settings = {name: getattr(cfg, name) for name in FINGERPRINTED}
    settings["model"] = model_identity(cfg.model)
    blob = json.dumps({"settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def save(output_dir: str, state: dict) -> None:
    """Write the state (`state_of`'s): records first, then state.json, each written whole and renamed."""
    run = state["run"]
    header = {"lm_ce": __version__, "complete": state["complete"], "tokens": run.tokens, "shard": run.shard,
              "processes": state["processes"], "fingerprint": state["fingerprint"], "config": state["config"],
              "identity": state.get("identity"), "documents": saved.documents_record(run)}
    saved.save(Path(output_dir), header, run)


def load(cfg: Config) -> dict:
    """The saved state of the run in cfg.output_dir, checked against this run's fingerprint."""
    directory = Path(cfg.output_dir)
    path = directory / STATE
    if not path.is_file():
        if (directory / LEGACY).is_file():
            raise UsageError(legacy_refusal("--resume", directory))
        raise UsageError(f"--resume: no saved progress in {path}; run once without --resume to start")
    try:
        state = saved.load(directory)
    except saved.StateError as e:
        raise UsageError(f"--resume: the saved state in {directory} cannot be used: {e}; rerun with --overwrite "
                         "(deletes it), or use another --output-dir") from None
    if not isinstance(state.get("identity"), dict):  # a state that did not record what it read: nothing to check by
        raise UsageError(f"--resume: {path} was saved by a version of lm_ce that did not record the content it "
                         "scored; rerun with --overwrite, or use another --output-dir")
    if state.get("fingerprint") != fingerprint(cfg):
        old = state.get("config", {})
        changed = [k for k in FINGERPRINTED if old.get(k) != getattr(cfg, k)
                   and (k != "model" or model_identity(str(old.get(k))) != model_identity(cfg.model))]
        what = f"changed: {', '.join(changed)}" if changed else "the model's path now resolves to another place"
        raise UsageError(
            f"--resume: {path} was saved by a different run ({what}); resume with the same model, data and settings, "
            "or use another --output-dir"
        )
    if cfg.mode == "document":  # the rows of the finished chunks are still there, as saved
        rows_digest(directory / DOCUMENTS, state["run"])
    return state


def legacy_refusal(what: str, directory: Path) -> str:
    """The one line for a state.pt of an earlier version, which is never loaded (a pickle can run code)."""
    return (f"{what}: {directory} holds {LEGACY}, the saved state of an earlier lm_ce, which this version never "
            "loads (a pickle can run code); rerun with --overwrite (deletes it), or use another --output-dir")


def state_of(cfg: Config, run, processes: int, complete: bool, identity: dict | None = None) -> dict:
    """What the state file holds: the run (records.Run), what it was, what it read (`identity`: plain JSON,
    rundir/identity.py), and whether it finished."""
    return {"fingerprint": fingerprint(cfg), "config": cfg.resolved(), "identity": identity, "run": run,
            "processes": processes, "complete": complete}
