"""The lm_ce path: `lm_ce.runner.evaluate(Config(...))` once, observed through its on_event hook.

Time is lm_ce's own scoring clock (reading the data, tokenizing, windowing and scoring; not loading the
model). The warm-up loads no model: it does what evaluate() would otherwise do for the first time on
its clock (imports, reading a JSONL with `datasets`, tokenizing, starting torch's threads); the model's
first forward is lm_ce's head probe, which runs before lm_ce starts its clock.
"""
from __future__ import annotations

import gc
import time

from .child import profiler, save_profile, status_mb


def lm_ce_config(spec: dict, data: str):
    """The case's settings as an lm_ce Config: document mode, windows of max_length, no overlap."""
    from lm_ce.config import Config

    L = spec["max_length"]
    return Config(model=spec["gguf"], dtype=spec["dtype"], text_field="text", mode="document", max_length=L, stride=L,
                  prefix_token="auto", batch_size=spec["batch_size"], threads=spec["threads"], progress=False,
                  data_files=[data], **spec.get("lm_ce_options", {}))


def warm_up(spec: dict) -> None:
    """First-time work outside the clock, without loading a model (a second load would blur the peak)."""
    import torch
    from transformers import AutoTokenizer

    from lm_ce import data

    docs = list(data.iter_documents(lm_ce_config(spec, spec["warmup_data"])))
    AutoTokenizer.from_pretrained(spec["model_dir"])([d.text for d in docs])
    torch.ones(256, 256) @ torch.ones(256, 256)
    gc.collect()


def run_lm_ce(spec: dict, mode: str) -> dict:
    """evaluate() once on the case's data: lm_ce's tokens, NLL, scoring seconds and memory by phase."""
    from lm_ce import runner

    memory: dict = {}
    marks: dict = {}

    def on_event(name: str) -> None:  # observe only
        if name == "loaded":
            memory["after_load_mb"] = status_mb("VmRSS")
        elif name == "scoring":  # lm_ce's last step before its timed span
            memory["before_scoring_mb"] = status_mb("VmRSS")
            if spec.get("profile"):
                marks["profiler"] = profiler(spec)
                marks["profiler"].__enter__()
            marks.update(wall=time.perf_counter(), cpu=time.process_time())
        elif name == "scored":
            marks.update(wall_end=time.perf_counter(), cpu_end=time.process_time())

    if spec["warmup"]:
        warm_up(spec)
    memory["after_warmup_mb"] = status_mb("VmRSS")
    results = runner.evaluate(lm_ce_config(spec, spec["data"]), on_event=on_event)
    prof = marks.get("profiler")
    if prof is not None:
        prof.__exit__(None, None, None)
    s = results.summary
    if s["model"].get("path") != spec["model_dir"]:
        print(f"warning: lm_ce loaded {s['model'].get('path')}, not its cache {spec['model_dir']}", flush=True)
    return {
        "path": mode, "tokens": s["counts"]["tokens"], "nll_sum": s["nll_sum"], "seconds": s["timing"]["seconds"],
        "load_seconds": s["timing"]["load_seconds"], "windows": s["counts"]["windows"],
        "cpu_seconds": marks["cpu_end"] - marks["cpu"], "observed_seconds": marks["wall_end"] - marks["wall"],
        "input_tokens": s["counts"].get("input_tokens"), "padding_tokens": s["counts"].get("padding_tokens"),
        "head": s["model"].get("head"), "model_path": s["model"].get("path"), "settings": s.get("settings"),
        "environment": s.get("environment"), "memory": memory, "profile": save_profile(prof, spec, mode),
    }
