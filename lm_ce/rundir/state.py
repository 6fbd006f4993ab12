"""The saved state of a run, as data: `state.json` (what a look at the directory needs) and the records' file.

- `state.json`: the format and its version, lm_ce's version, whether the run is complete, the tokens scored, the
  shard, the processes, the fingerprint and config of the run, the rows of documents.jsonl it stands for, and the
  name, size and sha256 of the records' file. Small: a directory is judged from it alone (claims, merge).
- `state-<first 16 hex of its sha256>.safetensors`: the records (`sums.serial`: JSON in a uint8 tensor named
  `records`) and the arrays they refer to. safetensors holds tensors and nothing else: no code.

A save writes the records' file under its new name, then replaces state.json, then deletes older records' files:
a stop at any point leaves a state.json that names a records' file of its own save. The state.pt of earlier
versions (a pickle, which can run code when loaded) is never loaded: it is recognised by its name and bytes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path

from lm_ce.errors import UsageError
from lm_ce.files import atomic_write
from lm_ce.sums import serial
from lm_ce.sums.records import Run

STATE = "state.json"
LEGACY = "state.pt"  # earlier versions' pickled state: recognised, refused, deleted by --overwrite, never loaded
FORMAT = "lm_ce state"
VERSION = 1
BODY = re.compile(r"state-[0-9a-f]{16}\.safetensors")
MAX_STATE_BYTES = 2**26  # state.json is small (the config and a few counts); anything larger is not ours


class StateError(ValueError):
    """The state in a directory is not one this version of lm_ce wrote (the message says what is wrong)."""


def body_files(directory: Path) -> list[Path]:
    """The records' files in a directory (the current one and any a stopped save left)."""
    return sorted(p for p in directory.glob("state-*.safetensors") if BODY.fullmatch(p.name))


def save(directory: Path, header: dict, run: Run) -> None:
    """Write the run's records, then state.json (`header` plus what names the records), then delete older
    records' files."""
    from safetensors.torch import save as to_bytes

    tree, arrays = serial.encode(run)
    arrays["records"] = _bytes_tensor(json.dumps(tree, allow_nan=True).encode("utf-8"))
    body = to_bytes(arrays)
    digest = hashlib.sha256(body).hexdigest()
    name = f"state-{digest[:16]}.safetensors"
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / name, body)
    full = {"format": FORMAT, "version": VERSION, **header,
            "body": {"file": name, "bytes": len(body), "sha256": digest}}
    atomic_write(directory / STATE, json.dumps(full, indent=1, default=str) + "\n")
    for old in body_files(directory):
        if old.name != name:
            with contextlib.suppress(OSError):
                old.unlink()


def _bytes_tensor(data: bytes):
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def read_header(directory: Path) -> dict | None:
    """state.json of a directory (None when there is none), checked to be lm_ce's format of this version; a
    StateError otherwise. Reads no records and no arrays."""
    path = directory / STATE
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_STATE_BYTES:
        raise StateError(f"{STATE} is {path.stat().st_size:,} bytes, far more than lm_ce writes")
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise StateError(f"{STATE} is not readable JSON ({type(e).__name__})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise StateError(f"{STATE} is not an lm_ce state")
    if header.get("version") != VERSION:
        raise StateError(f"{STATE} is of format version {header.get('version')!r}, which this lm_ce (format "
                         f"{VERSION}) does not read")
    kinds = {"complete": bool, "tokens": int, "processes": int, "fingerprint": str, "config": dict, "body": dict}
    for key, kind in kinds.items():
        if not isinstance(header.get(key), kind) or (kind is int and isinstance(header.get(key), bool)):
            raise StateError(f"{STATE} has no valid '{key}'")
    return header


def is_ours(path: Path) -> bool:
    """Whether a state.json is lm_ce's (of any version, readable or not as this one reads it)."""
    try:
        if path.stat().st_size > MAX_STATE_BYTES:
            return False
        header = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(header, dict) and header.get("format") == FORMAT


def load(directory: Path) -> dict:
    """The saved state: state.json's fields with the run's records under "run" (a records.Run); a StateError when
    either file is missing, damaged, not of this format, or does not match the other."""
    from safetensors.torch import load as from_bytes

    header = read_header(directory)
    if header is None:
        raise StateError(f"no {STATE}")
    body = header["body"]
    name = body.get("file")
    if not isinstance(name, str) or not BODY.fullmatch(name):
        raise StateError(f"{STATE} names no records' file of lm_ce ({str(name)[:60]!r})")
    try:
        data = (directory / name).read_bytes()
    except OSError as e:
        raise StateError(f"{name}, which {STATE} names, cannot be read ({e.strerror})") from None
    if len(data) != body.get("bytes") or hashlib.sha256(data).hexdigest() != body.get("sha256"):
        raise StateError(f"{name} is not the file {STATE} names (its size or sha256 differs: damaged or replaced)")
    try:
        arrays = from_bytes(data)
        records = arrays.pop("records").numpy().tobytes()
        tree = json.loads(records.decode("utf-8"))
    except Exception as e:  # safetensors' own error, no "records", not UTF-8 JSON: the file is not lm_ce's
        raise StateError(f"{name} does not hold lm_ce's records ({type(e).__name__})") from None
    try:
        run = serial.decode(tree, arrays)
    except serial.StateError as e:
        raise StateError(f"{name}: {e}") from None
    if run.tokens != header["tokens"] or run.shard != header.get("shard"):
        raise StateError(f"{name} does not match {STATE} (tokens or shard differ)")
    return {**header, "run": run}


def legacy(path: Path) -> bool:
    """Whether `path` is a state.pt of an earlier lm_ce: torch.save stores the pickle uncompressed (in a zip), so
    the names of lm_ce's record classes, or the state's 'fingerprint' key, are in its bytes. Read, never loaded."""
    try:
        with open(path, "rb") as f:
            head = f.read(2**22)
        return b"lm_ce." in head or b"fingerprint" in head
    except OSError:
        return False


def documents_record(run: Run) -> dict:
    """What state.json says of documents.jsonl: the bytes and rows of the finished chunks, and their sha256."""
    return {"rows": run.rows.rows, "bytes": run.rows_offset, "sha256": run.rows_sha256}


def check_documents(directory: Path, docs: Path) -> None:
    """documents.jsonl is whole: the rows, bytes and sha256 its run's state.json records (runs merged or made
    without an output directory of their own have no state: nothing to check against)."""
    try:
        header = read_header(directory)
    except StateError as e:
        raise UsageError(f"{directory}: the saved state cannot be used ({e}); rerun that evaluation") from None
    record = (header or {}).get("documents") or {}
    if not record.get("sha256"):
        return
    data = docs.read_bytes()
    if len(data) != record.get("bytes") or hashlib.sha256(data).hexdigest() != record["sha256"]:
        rows = data.count(b"\n")
        raise UsageError(f"{docs} holds {rows:,} rows in {len(data):,} bytes, not the "
                         f"{record.get('rows')} rows in {record.get('bytes')} bytes its state records (cut or "
                         "changed); rerun that evaluation")
