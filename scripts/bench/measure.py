"""What every path's child measures with: memory figures from /proc, the texts it reads, and torch's profiler."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path


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
