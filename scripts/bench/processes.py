"""Starting the child processes and measuring them from outside: exit code, wall time, peak memory, CPU time.

Standard library only (the parent imports it; each child's peak memory must be its own).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
ENTRY = ROOT / "scripts" / "benchmark.py"


@dataclass
class Bench:
    """Where a benchmark's children work, how long each may take, and the failures found so far (appended to)."""

    work: Path
    timeout: float
    failures: list[str] = field(default_factory=list)


def child_env(threads: int) -> dict:
    """The same environment for every child: thread counts, offline, unbuffered, this checkout first."""
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
    })
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def spawn(cmd: list[str], env: dict, log: Path, timeout: float) -> dict:
    """Run a process to the end: its exit code, wall time and own rusage (os.wait4, not RUSAGE_CHILDREN)."""
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall_seconds": wall, "ru_maxrss_mb": usage.ru_maxrss / 1024,
            "user_seconds": usage.ru_utime, "system_seconds": usage.ru_stime, "log": str(log),
            "load_average": load_average()}


def run_child(mode: str, spec: dict, work: Path, tag: str, timeout: float) -> dict:
    """One child of this script (`benchmark.py --_child MODE SPEC`): the spawn record plus its result JSON."""
    spec_file = work / f"{tag}.spec.json"
    result_file = work / f"{tag}.result.json"
    result_file.unlink(missing_ok=True)
    spec_file.write_text(json.dumps({**spec, "result": str(result_file)}, indent=2))
    out = spawn([sys.executable, str(ENTRY), "--_child", mode, str(spec_file)],
                child_env(spec["threads"]), work / "logs" / f"{tag}.log", timeout)
    out["ok"] = out["rc"] == 0 and result_file.is_file()
    if out["ok"]:
        out["result"] = json.loads(result_file.read_text())
    else:
        out["error"] = f"exit code {out['rc']}: {tail(out['log'])}"
    return out


def run_cli(spec: dict, work: Path, timeout: float, *, root: Path = ROOT, tag: str = "cli", limit: int | None = None) -> dict:
    """The lm_ce command line of the checkout at `root` (this one, or the baseline's) as a whole process on the
    case's data, with the case's settings and only flags every version has."""
    out_dir = work / f"{spec['case']}.{tag}"
    shutil.rmtree(out_dir, ignore_errors=True)  # the benchmark's own folder: each run starts from none
    cmd = [sys.executable, str(root / "scripts" / "evaluate.py"), "--model", spec["gguf"], "--dtype", spec["dtype"],
           "--data-files", spec["data"], "--text-field", "text", "--mode", "document",
           "--max-length", str(spec["max_length"]), "--stride", str(spec["max_length"]), "--prefix-token", "auto",
           "--batch-size", str(spec["batch_size"]), "--threads", str(spec["threads"]), "--no-progress",
           "--output-dir", str(out_dir)] + (["--limit", str(limit)] if limit else [])
    out = spawn(cmd, child_env(spec["threads"]), work / "logs" / f"{spec['case']}.{tag}.log", timeout)
    out["ok"] = out["rc"] == 0 and (out_dir / "results.json").is_file()
    if out["ok"]:
        s = json.loads((out_dir / "results.json").read_text())
        out.update(tokens=s["counts"]["tokens"], nll_sum=s["nll_sum"], scoring_seconds=s["timing"]["seconds"],
                   load_seconds=s["timing"]["load_seconds"])
    else:
        out["error"] = f"exit code {out['rc']}: {tail(out['log'])}"
    return out


def tail(log: str, n: int = 3) -> str:
    """The last lines of a child's log, for a one-line failure."""
    try:
        lines = [line.strip() for line in Path(log).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return " | ".join(lines[-n:])[-600:]


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def baseline_checkout(rev: str, work: Path) -> Path:
    """The files of commit `rev` of this repository (git archive), once, under the work folder."""
    target = work / f"baseline-{rev}"
    if (target / "scripts" / "evaluate.py").is_file():
        return target
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                            capture_output=True, text=True)
    if commit.returncode != 0:
        raise RuntimeError(f"commit {rev} is not in this clone's history (a shallow clone?): fetch it, or pass "
                           "--baseline none")
    target.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", rev], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(target)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {rev} failed")
    return target
