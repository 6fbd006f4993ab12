"""The child side: one process per path, started as `benchmark.py --_child MODE SPEC_FILE`.

Each child reads its spec (JSON), runs one path and writes its result JSON to spec["result"].
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from .measure import status_mb
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
