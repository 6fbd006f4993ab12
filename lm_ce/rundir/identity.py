"""What a run read, as its saved state and results.json record it: each model by content (Hub commit, weights,
tokenizer) and the data (local files by sha256, a Hub dataset by commit); and the phrases naming how two such
records differ, so that --resume, lm-ce merge and lm-ce compare refuse different content in one line.

A record is plain JSON: {"data": {...}, "models": {role: {"commit", "weights", "tokenizer"}}}, the role being
"model", "--compare-to NAME" or "--longppl-evaluator NAME".
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lm_ce.errors import UsageError


@dataclass
class Recorded:
    """The run's record as it fills: the data (data.identity.DataIdentity, whose Hub commit is set when read) and
    each model once loaded."""

    data: object
    models: dict[str, dict] = field(default_factory=dict)

    def header(self) -> dict:
        """The record, as the state's header holds it."""
        return {"data": self.data.record(), "models": dict(self.models)}


def model_record(info) -> dict:
    """A loaded model's identity (model.load.ModelInfo) without the seconds it took."""
    return {"commit": info.commit, "weights": untimed(info.weights), "tokenizer": untimed(info.tokenizer)}


def untimed(record: dict | None) -> dict | None:
    return None if record is None else {k: v for k, v in record.items() if k != "seconds"}


def _short(value) -> str:
    return str(value)[:12] if value else "none"


def data_differences(old: dict, new: dict) -> list[str]:
    """How two data records differ: a file's content (path, old and new sha256), the source, a Hub commit."""
    if old.get("source") != new.get("source"):
        return [f"data source {old.get('source')} → {new.get('source')}"]
    out = []
    before, after = old.get("files") or [], new.get("files") or []
    if len(before) != len(after):
        out.append(f"data files {len(before)} → {len(after)}")
    for a, b in zip(before, after):
        if a.get("sha256") != b.get("sha256"):
            out.append(f"data file {b.get('path')}: sha256 {_short(a.get('sha256'))} → {_short(b.get('sha256'))}")
    a, b = old.get("resolved_revision"), new.get("resolved_revision")
    if a and b and a != b:
        out.append(f"dataset commit {_short(a)} → {_short(b)}")
    return out


def model_differences(role: str, old: dict | None, new: dict | None) -> list[str]:
    """How two model records differ: the Hub commit, a weight file (name, old and new hash), the tokenizer."""
    if old is None or new is None:  # a model one record holds and the other not (or an older run's, neither)
        return [] if old is new else [f"{role}: {'recorded' if old else 'not recorded'} → "
                                      f"{'recorded' if new else 'not recorded'}"]
    out = []
    if old.get("commit") != new.get("commit"):
        out.append(f"{role}: commit {_short(old.get('commit'))} → {_short(new.get('commit'))}")
    a, b = old.get("weights") or {}, new.get("weights") or {}
    if a.get("sha256") != b.get("sha256"):
        files_a, files_b = a.get("files") or {}, b.get("files") or {}
        changed = [f"{name} {_short(files_a.get(name))} → {_short(files_b.get(name))}"
                   for name in sorted(set(files_a) | set(files_b)) if files_a.get(name) != files_b.get(name)]
        out.append(f"{role}: weights " + (", ".join(changed) if changed else f"{_short(a.get('sha256'))} → "
                                                                          f"{_short(b.get('sha256'))}"))
    a, b = old.get("tokenizer") or {}, new.get("tokenizer") or {}
    if a.get("sha256") != b.get("sha256"):
        out.append(f"{role}: tokenizer {_short(a.get('sha256'))} → {_short(b.get('sha256'))}")
    return out


def differences(old: dict, new: dict) -> list[str]:
    """Every way record `new` differs from `old`, in the parts `new` holds (data, models, or both)."""
    out = data_differences(old.get("data") or {}, new["data"]) if "data" in new else []
    if "models" in new:
        before, after = old.get("models") or {}, new["models"]
        for role in [*after, *(r for r in before if r not in after)]:
            out += model_differences(role, before.get(role), after.get(role))
    return out


def check_resume(saved: dict, current: dict, where: str) -> None:
    """Refuse a resume whose data or models (the parts `current` holds) differ from what the run recorded at its
    start, in one line naming each difference."""
    found = differences(saved, current)
    if found:
        raise UsageError(f"--resume: {where} holds a run that read other content ({'; '.join(found)}); resume with "
                         "what it started with, or start over with --overwrite (or use another --output-dir)")
