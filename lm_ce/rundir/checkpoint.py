"""Saved progress of a run: exact sums so far, where in the data, and a fingerprint of what was run.

The state file is written whole and then renamed, so a crash while saving leaves the previous
state intact. A resume with a different model, data or setting is refused by the fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from lm_ce.config.fields import Config, resolve_path
from lm_ce.errors import UsageError

STATE = "state.pt"
# Settings that change which tokens are scored, how batches are formed, or what is recorded.
FINGERPRINTED = (
    "model", "revision", "dtype", "dataset", "dataset_config", "split", "data_files", "text_field", "prompt_field",
    "group_field", "id_field", "join_by", "streaming", "limit", "mode", "max_length", "stride", "prefix_token",
    "separator", "batch_size", "token_budget", "padding_side", "chunk_documents", "compare_to", "save_tokens",
    "protocol", "bos_policy", "chunks", "detokenizer", "shard", "min_k",
    "longppl_evaluator", "longppl_short", "longppl_step", "longppl_alpha", "longppl_beta",
    "task", "layout", "context_field", "choices_field", "label_field", "choice_delimiter", "llama_cpp_quirk",
    "words_field", "surprisal_unit", "bow_correction", "bow_style",
)


def _file_identity(path: str) -> dict:
    """Size and modification time of a file, or of every file of a directory (cheap, content-sensitive enough)."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return {"size": st.st_size, "mtime": int(st.st_mtime)}
    if p.is_dir():
        return {f.name: _file_identity(str(f)) for f in sorted(p.iterdir()) if f.is_file()}
    return {}


def model_identity(spec: str) -> str:
    """The model as a resume compares it: a local path resolved (./tiny/ and /abs/path/tiny are one model), else
    the name as given (a Hub id)."""
    try:
        path = resolve_path(spec)
    except UsageError:
        return spec
    return os.path.realpath(path) if os.path.exists(path) else spec


def fingerprint(cfg: Config) -> str:
    """A hash of the model, the data and every setting that affects the result."""
    settings = {name: getattr(cfg, name) for name in FINGERPRINTED}
    settings["model"] = model_identity(cfg.model)
    files = {}
    for spec in [cfg.model, *(cfg.compare_to or []), *(cfg.data_files or [])]:
        key = settings["model"] if spec == cfg.model else spec
        try:
            files[key] = _file_identity(resolve_path(spec))
        except UsageError:
            files[key] = None
    blob = json.dumps({"settings": settings, "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def save(output_dir: str, state: dict) -> None:
    """Write the state (write, then rename: never a half-written file)."""
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{STATE}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, directory / STATE)


def load(cfg: Config) -> dict:
    """The saved state of the run in cfg.output_dir, checked against this run's fingerprint."""
    path = Path(cfg.output_dir) / STATE
    if not path.is_file():
        raise UsageError(f"--resume: no saved progress in {path}; run once without --resume to start")
    try:
        state = torch.load(path, weights_only=False)
    except Exception as e:  # a state file from another tool or a damaged disk
        raise UsageError(f"--resume: cannot read {path} ({type(e).__name__}); delete it to start over") from None
    if not hasattr(state.get("run"), "rows"):  # per-document records of a version before the running sums
        raise UsageError(f"--resume: {path} was saved by an older version of lm_ce, which this one cannot continue; "
                         "rerun with --overwrite, or use another --output-dir")
    if state.get("fingerprint") != fingerprint(cfg):
        old = state.get("config", {})
        changed = [k for k in FINGERPRINTED if old.get(k) != getattr(cfg, k)
                   and (k != "model" or model_identity(str(old.get(k))) != model_identity(cfg.model))]
        what = f"changed: {', '.join(changed)}" if changed else "the model or data files changed on disk"
        raise UsageError(
            f"--resume: {path} was saved by a different run ({what}); resume with the same model, data and settings, "
            "or use another --output-dir"
        )
    return state



def state_of(cfg: Config, run, processes: int, complete: bool) -> dict:
    """What the state file holds: the run (records.Run), what it was, and whether it finished."""
    return {"fingerprint": fingerprint(cfg), "config": cfg.resolved(), "run": run, "processes": processes,
            "complete": complete}
