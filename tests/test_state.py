"""The saved state is data: every record lm_ce saves comes back equal, float64 bit for bit; an earlier version's
pickled state.pt is never loaded (a pickle that would run code runs none, on start, --resume, merge or
--overwrite); a state.json or records' file that is not exactly what lm_ce writes is refused in one line."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lm_ce.cli import main as cli
from lm_ce.rundir import state
from lm_ce.sums import divergence, extremes, quantiles, records, serial, signals, stats

from .conftest import SENTENCES, make_jsonl, saved_run, stop_at_batch

HARD = [0.1 + 0.2, 1e-308, 5e-324, -0.0, 2.0**-1074, 1 / 3, math.pi * 1e300, math.inf, -math.inf, 123456789.123456789]


def same(a, b, where: str = "run") -> None:
    """Equal values of equal types, floats compared bit for bit (so -0.0 and 0.0 differ, nan equals nan)."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), (where, a, b)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.dtype == torch.bool
                                                                         else a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), where
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def exact(values) -> stats.ExactSum:
    s = stats.ExactSum()
    for v in values:
        s.add(v)
    return s


def every_record() -> records.Run:
    """A run holding every record type lm_ce saves, with awkward float64 values."""
    div = divergence.Divergence(kl=quantiles.Quantiles(exact_cap=50, k=16), delta_p=quantiles.Quantiles(exact_cap=50, k=16))
    for _ in range(5):  # past the exact cap: the sketch's levels and turns
        n = 30
        div.add(divergence.TokenPairs(nll=torch.rand(n, dtype=torch.float64) * 5, other_nll=torch.rand(n) * 5,
                                      kl=torch.rand(n), same_top1=torch.rand(n) > 0.5,
                                      doc=torch.randint(0, 4, (n,)), window=torch.randint(0, 3, (n,))))
    positions = stats.PositionLoss(torch.tensor(HARD[:8], dtype=torch.float64), torch.arange(8))
    partial = records.Tally(
        docs={3: records.DocSums(HARD[0], 7, HARD[1]), -1: records.DocSums(HARD[3], 0, 0.0)},
        windows=[records.WindowSums(3, 0, HARD[5], 4), records.WindowSums(3, 4, HARD[6], 3)],
        positions=positions, compares=[div],
        token_blocks=[{"doc": torch.tensor([3, 3]), "nll": torch.tensor([0.5, 1.5]), "kl_1": torch.zeros(2),
                       "nll16": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}],
        padding=5, inputs=99, batches_done=[0, 2],
        signals=signals.TokenSignals({3: [(0, torch.rand(4), torch.rand(4)), (4, torch.rand(3), torch.rand(3))]}))
    rows = records.RowSums(rows=10, documents=8, not_text=1, bytes=1000, words=200,
                           by_document=stats.Clustered(8, 70, 700, exact(HARD[:3]), exact(HARD[3:6]), exact([1e16, 1.0])),
                           groups={"a": stats.GroupSums(3, 30, 300, exact(HARD[:2])), "(null)": stats.GroupSums()},
                           signals={None: signals.SignalSums(2, {k: exact([v]) for k, v in zip(signals.NAMES, HARD)}),
                                    "a": signals.SignalSums()},
                           longppl={None: records.KeySums(2, 20, 5, exact([HARD[4]])), "a": records.KeySums()})
    shown = extremes.ShownDocument(3, "d3", None, 7, HARD[0], ["a", "", "é"], [0.25, HARD[1], 3.0], ["x", "y", "z"])
    curve = records.CurveSums([8, 16], [2, 4], [exact(HARD[:4]), exact([1.5])], [10, 10], 2, 1, 0.75, False)
    return records.Run(rows=rows, sums=records.TokenSums(70, exact(HARD[:5]), exact([2.5]), stats.Clustered()),
                       tally=records.Tally(positions=stats.PositionLoss.zeros(8), compares=[divergence.Divergence()]),
                       chunks_done=3, partial=partial, windows=12, stream_bytes=0, stream_words=0, doubled_prefix=1,
                       tokens_per_process=[40, 30], rows_offset=1234, rows_sha256="ab" * 32, shard="1/3",
                       extremes=extremes.Extremes(2, {3: shown}), passes_done=True, curve=curve)


def test_every_record_field_is_in_the_schema():
    serial.check_schema()


def test_the_state_round_trips_exactly(tmp_path):
    run = every_record()
    state.save(tmp_path, {"complete": False, "tokens": run.tokens, "shard": run.shard, "processes": 2,
                          "fingerprint": "f", "config": {"a": 1}}, run)
    loaded = state.load(tmp_path)
    same(loaded["run"], run)
    assert loaded["processes"] == 2 and loaded["complete"] is False and loaded["tokens"] == run.tokens
    assert run.partial.compares[0].kl.rank_error > 0  # the sketch part was saved too
    assert json.loads((tmp_path / "state.json").read_text())["body"]["file"] in os.listdir(tmp_path)


@pytest.mark.parametrize("kind", ["multiple-choice", "surprisal"])
def test_a_tasks_sums_round_trip_and_a_wrong_record_in_their_place_is_refused(tmp_path, kind):
    from lm_ce.sums import tasks

    run = every_record()
    if kind == "multiple-choice":
        run.task = tasks.ChoiceSums(items=7, choices=28, acc=3, acc_norm=4, acc_bytes=5, scoring="shared prefix")
    else:
        run.task = tasks.SurprisalSums(documents=2, words=9, sentences=3, tokens=12)
        for nats, n in ((HARD[:3], 3), (HARD[3:6], 3)):
            run.task.surprisal.add(math.fsum(nats))
            run.task.by_document.add(math.fsum(nats), n)
    header = {"complete": False, "tokens": run.tokens, "shard": run.shard, "processes": 1, "fingerprint": "f",
              "config": {}}
    state.save(tmp_path, header, run)
    same(state.load(tmp_path)["run"], run)
    run.task = records.CurveSums([8], [2], [stats.ExactSum()], [0], 0, 0, 0.0, False)
    with pytest.raises(serial.StateError, match="run.task: expected one of ChoiceSums, SurprisalSums"):
        state.save(tmp_path, header, run)


def test_a_save_replaces_the_records_file_and_a_stop_between_keeps_the_old_state(tmp_path, monkeypatch):
    run = every_record()
    header = {"complete": False, "tokens": run.tokens, "shard": run.shard, "processes": 1, "fingerprint": "f",
              "config": {}}
    state.save(tmp_path, header, run)
    first = state.body_files(tmp_path)
    run.chunks_done += 1
    write = state.atomic_write

    def fail_on_header(path, content):
        if Path(path).name == state.STATE:
            raise KeyboardInterrupt  # a stop after the new records' file, before the new state.json
        return write(path, content)

    monkeypatch.setattr(state, "atomic_write", fail_on_header)
    with pytest.raises(KeyboardInterrupt):
        state.save(tmp_path, header, run)
    assert state.load(tmp_path)["run"].chunks_done == 3  # the old state.json, with its own records' file
    monkeypatch.undo()
    state.save(tmp_path, header, run)
    assert state.load(tmp_path)["run"].chunks_done == 4
    assert len(state.body_files(tmp_path)) == 1 and state.body_files(tmp_path) != first
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def resave(directory: Path, edit) -> None:
    """Rewrite the records of a saved state through `edit(tree, arrays)`, with a state.json that matches them (what
    someone crafting a state can do: the sha256 in state.json is no secret)."""
    import hashlib

    from safetensors.torch import load, save

    header = json.loads((directory / state.STATE).read_text())
    arrays = load((directory / header["body"]["file"]).read_bytes())
    tree = json.loads(arrays.pop("records").numpy().tobytes())
    edit(tree, arrays)
    arrays["records"] = torch.frombuffer(bytearray(json.dumps(tree).encode()), dtype=torch.uint8)
    body = save(arrays)
    digest = hashlib.sha256(body).hexdigest()
    name = f"state-{digest[:16]}.safetensors"
    (directory / name).write_bytes(body)
    header["body"] = {"file": name, "bytes": len(body), "sha256": digest}
    (directory / state.STATE).write_text(json.dumps(header))


class Payload:
    """Unpickled, it would create a file: the proof that no code ran is that the file is not there."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def data(tmp_path) -> str:
    return make_jsonl(tmp_path / "docs.jsonl", [{"text": s, "id": f"d{i}"} for i, s in enumerate(SENTENCES[:8])])


def args(model: str, data: str, out: Path, *extra: str) -> list[str]:
    return ["--model", model, "--data-files", data, "--max-length", "16", "--batch-size", "1", "--no-progress",
            "--chunk-documents", "2", "--output-dir", str(out), *extra]


def one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("lm_ce: error: ") and "Traceback" not in err[0], err
    return err[0]


def test_a_pickled_state_pt_is_never_loaded(tiny_llama_dir, data, tmp_path, capsys):
    """A finished run's directory of an earlier version, its state.pt swapped for a pickle that runs code: a new
    run into it, --resume and lm-ce merge refuse it in one line and run nothing; --overwrite deletes it."""
    out = tmp_path / "old"
    assert cli.main(args(tiny_llama_dir, data, out, "--shard", "0/2")) == 0
    for p in [out / state.STATE, *state.body_files(out)]:
        p.unlink()
    marker = tmp_path / "payload-ran"
    torch.save({"fingerprint": "x", "complete": True, "run": Payload(marker)}, out / state.LEGACY)
    capsys.readouterr()
    assert cli.main(args(tiny_llama_dir, data, out, "--shard", "0/2")) == 2
    line = one_line(capsys)
    assert "a run of an earlier lm_ce" in line and "--overwrite" in line, line
    assert cli.main(args(tiny_llama_dir, data, out, "--shard", "0/2", "--resume")) == 2
    line = one_line(capsys)
    assert "state.pt, the saved state of an earlier lm_ce, which this version never loads" in line, line
    assert cli.main(["merge", str(out), "--output-dir", str(tmp_path / "m")]) == 2
    assert "never loads" in one_line(capsys)
    assert not marker.exists()
    assert cli.main(args(tiny_llama_dir, data, out, "--shard", "0/2", "--overwrite")) == 0
    assert not (out / state.LEGACY).exists() and (out / state.STATE).is_file() and not marker.exists()


def test_a_pickle_in_place_of_the_new_files_runs_nothing(tiny_llama_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(args(tiny_llama_dir, data, out, "--shard", "0/2")) == 0
    marker = tmp_path / "payload-ran"
    [body] = state.body_files(out)
    torch.save({"run": Payload(marker)}, body)  # the records' file named in state.json, now a pickle
    capsys.readouterr()
    assert cli.main(["merge", str(out), "--output-dir", str(tmp_path / "m")]) == 2
    assert "its size or sha256 differs" in one_line(capsys)
    torch.save({"run": Payload(marker)}, out / state.STATE)  # state.json itself a pickle
    assert cli.main(args(tiny_llama_dir, data, out, "--shard", "0/2", "--resume")) == 2
    assert "state.json is not readable JSON" in one_line(capsys)
    assert not marker.exists()


@pytest.mark.parametrize("case", ["unknown type", "other record", "shape", "dtype", "extra field", "columns",
                                  "out of bounds", "array name"])
def test_a_crafted_state_is_refused_in_one_line(tiny_llama_dir, data, tmp_path, capsys, monkeypatch, case):
    """A stopped run's records rewritten (with a state.json that matches them): an unknown record type, a record
    of another type, an array of the wrong shape or dtype, a field lm_ce does not save, a reference to no array:
    --resume and lm-ce merge refuse it in one line naming the place; nothing is built from it."""
    out = tmp_path / "run"
    stop_at_batch(monkeypatch, 3)
    assert cli.main(args(tiny_llama_dir, data, out, "--shard", "0/2")) == 130
    monkeypatch.undo()
    saved_run(out)  # what lm_ce wrote loads

    def edit(tree, arrays):
        tally = tree["run"]["partial"]
        if case == "unknown type":
            tally["@"] = "os.system"
        elif case == "other record":
            tally["positions"]["@"] = "DocSums"
        elif case == "shape":
            tally["positions"]["nll"]["shape"] = [4, 4]
        elif case == "dtype":
            tally["positions"]["count"]["tensor"] = "float64"
        elif case == "extra field":
            tally["__reduce__"] = "os.system"
        elif case == "columns":
            tally["windows"]["nll"]["shape"] = [1]
        elif case == "out of bounds":
            tally["positions"]["nll"]["at"] = 10**9
        else:
            tally["positions"]["nll"]["tensor"] = "../../etc/passwd"

    resave(out, edit)
    capsys.readouterr()
    assert cli.main(args(tiny_llama_dir, data, out, "--shard", "0/2", "--resume")) == 2
    line = one_line(capsys)
    assert "the saved state in" in line and "run.partial" in line and "--overwrite" in line, line
    assert cli.main(["merge", str(out), "--output-dir", str(tmp_path / "m")]) == 2
    assert "stopped before its end" in one_line(capsys)  # told from state.json alone
