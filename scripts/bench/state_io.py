"""The saved state's cost: one save and one load of a large run's records, in lm_ce's format (state.json and a
safetensors file of data, `lm_ce.rundir.state`) against the pickle of earlier versions (`torch.save`, read back with
`torch.load(weights_only=False)`), the same records in both. Two runs of 10^5 documents, each stopped inside a
chunk (the largest state a periodic save writes): the default settings, and a heavy one (--save-tokens,
--compare-to, --min-k and 10^4 groups)."""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path


def big_run(heavy: bool):
    """A records.Run as a 10^5-document run holds it, stopped inside a chunk of 1,024 (heavy: 8,192) documents."""
    import numpy as np
    import torch

    from lm_ce.sums import divergence, extremes, records, signals, stats

    rng = np.random.default_rng(0)
    chunk, per_doc, groups = (8192, 4, 10**4) if heavy else (1024, 2, 100)
    rows = records.RowSums()
    for i in range(100_000):
        rows.add(records.DocumentResult(index=i, group=f"g{i % groups}", tokens=40, nll_sum=float(rng.random() * 200),
                                        bytes=200, words=40))
    tally = records.Tally(positions=stats.PositionLoss.zeros(256), compares=[divergence.Divergence()] if heavy else [])
    partial = records.Tally(positions=stats.PositionLoss.zeros(256), compares=[divergence.Divergence()] if heavy else [])
    for d in range(chunk):
        for w in range(per_doc):
            nll = float(rng.random() * 50)
            partial.doc(d).nll += nll
            partial.doc(d).tokens += 10
            partial.windows.append(records.WindowSums(d, w * 10, nll, 10))
    partial.batches_done = list(range(chunk // 8))
    if heavy:
        n = chunk * per_doc * 10
        partial.token_blocks = [{"doc": torch.arange(n) // 40, "position": torch.arange(n) % 40,
                                 "token_id": torch.randint(0, 512, (n,)), "nll": torch.rand(n),
                                 "top1_id": torch.randint(0, 512, (n,)), "window_position": torch.arange(n) % 24}]
        for k in range(0, n, 4096):
            partial.compares[0].add(divergence.TokenPairs(
                nll=torch.rand(4096), other_nll=torch.rand(4096), kl=torch.rand(4096), same_top1=torch.rand(4096) > 0.3,
                doc=torch.arange(k, k + 4096) // 40, window=torch.arange(k, k + 4096) % 40 // 10))
        partial.signals = signals.TokenSignals({d: [(w * 10, torch.rand(10), torch.rand(10)) for w in range(per_doc)]
                                                for d in range(chunk)})
    shown = {i: extremes.ShownDocument(i, f"doc{i}", None, 40, 100.0, ["tok"] * 40, [1.0] * 40, ["x"] * 40)
             for i in range(10)}
    return records.Run(rows=rows, tally=tally, chunks_done=97, partial=partial, windows=200_000,
                       tokens_per_process=[4_000_000], rows_offset=20_000_000, rows_sha256="0" * 64,
                       extremes=extremes.Extremes(5, shown))


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def state_io(repeat: int = 5) -> list[dict]:
    """Rows of the state-cost table: per case and format, the median seconds of a save and a load, and the bytes."""
    import torch

    from lm_ce.rundir import state

    out = []
    for heavy in (False, True):
        run = big_run(heavy)
        header = {"complete": False, "tokens": run.tokens, "shard": None, "processes": 1, "fingerprint": "f" * 64,
                  "config": {}}
        with tempfile.TemporaryDirectory() as work:
            new, old = Path(work) / "new", Path(work) / "old"
            old.mkdir()
            pickled = {"fingerprint": "f" * 64, "config": {}, "run": run, "processes": 1, "complete": False}
            rows = {
                "lm_ce (state.json + safetensors)": (lambda: state.save(new, header, run), lambda: state.load(new),
                                                     lambda: sum(p.stat().st_size for p in new.iterdir())),
                "pickle (torch.save, earlier versions)": (
                    lambda: torch.save(pickled, old / "state.pt"),
                    lambda: torch.load(old / "state.pt", weights_only=False),
                    lambda: (old / "state.pt").stat().st_size),
            }
            times = {name: {"save": [], "load": []} for name in rows}
            for _ in range(repeat):  # the two formats alternately, so that a busy machine slows both alike
                for name, (save, load, _size) in rows.items():
                    times[name]["save"].append(timed(save, 1))
                    times[name]["load"].append(timed(load, 1))
            for name, (_save, _load, size) in rows.items():
                out.append({"case": "heavy" if heavy else "default", "format": name,
                            "save_s": statistics.median(times[name]["save"]),
                            "load_s": statistics.median(times[name]["load"]), "bytes": size(), "tokens": run.tokens})
            same = state.load(new)["run"]
            assert same.rows == run.rows and same.partial.windows == run.partial.windows
    return out


def state_io_table(rows: list[dict]) -> list[str]:
    lines = ["| case | format | save s (median) | load s (median) | size MB |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['format']} | {r['save_s']:.3f} | {r['load_s']:.3f} | {r['bytes'] / 2**20:.2f} |"
              for r in rows]
    return lines
