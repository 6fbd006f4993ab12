"""The child side: one process per path, started as `benchmark.py --_child MODE SPEC_FILE`.

Each child reads its spec (JSON), runs one path and writes its result JSON to spec["result"].
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from .processes import ROOT
from .spec import HF_PATHS


def child_main(mode: str, spec_file: str) -> int:
    """Run one path in this process and write its result, with the process's own memory figures."""
    spec = json.loads(Path(spec_file).read_text())
    sys.path.insert(0, str(ROOT))
    quiet_libraries()
    import torch

    torch.set_num_threads(spec["threads"])
    if mode == "prepare":
        from .prepare import prepare as run
    elif mode in HF_PATHS:
        from .hf_paths import run_hf as run
    elif mode in ("lm_ce", "lm_ce-min-k"):
        from .lm_ce_path import run_lm_ce as run
    elif mode == "lmeval":
        from .lm_eval_path import run_lm_eval as run
    elif mode == "scale":
        from .scaling import run_size as run
    elif mode == "docs":
        from .documents import run_documents_size as run
    else:
        raise SystemExit(f"benchmark child: unknown mode {mode}")
    result = run(spec, mode)
    result["threads"] = torch.get_num_threads()
    result.setdefault("memory", {}).update(vmhwm_mb=status_mb("VmHWM"), final_rss_mb=status_mb("VmRSS"))
    Path(spec["result"]).write_text(json.dumps(result, indent=2, default=str))
    return 0


def quiet_libraries() -> None:
    """No warnings, progress bars or info logs from the libraries in the children's logs."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()


def status_mb(field: str) -> float | None:
    """A /proc/self/status memory figure (kB there) in MB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def read_texts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def profiler(spec: dict):
    """torch.profiler over the timed span when --profile was given, else a no-op context."""
    if not spec.get("profile"):
        return contextlib.nullcontext()
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True)


def save_profile(prof, spec: dict, mode: str) -> str | None:
    """The profile's tables (self time, total time, shapes, memory) under <output>_work/profiles."""
    if prof is None or not spec.get("profile"):
        return None
    out = Path(spec["profile"]) / f"{spec['case']}.{mode}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    avg = prof.key_averages()
    out.write_text(
        "by self CPU time\n" + avg.table(sort_by="self_cpu_time_total", row_limit=30) +
        "\n\nby total CPU time\n" + avg.table(sort_by="cpu_time_total", row_limit=30) +
        "\n\nby self CPU time and input shapes\n" +
        prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30) +
        "\n\nby self CPU memory\n" + avg.table(sort_by="self_cpu_memory_usage", row_limit=15)
    )
    return str(out)
