"""The lm_ce path: `lm_ce.runner.evaluate(Config(...))` once, observed through its on_event hook.

Time is lm_ce's own scoring clock (reading the data, tokenizing, windowing and scoring; not loading the
model). The warm-up loads no model: it does what evaluate() would otherwise do for the first time on
its clock (imports, reading a JSONL with `datasets`, tokenizing, starting torch's threads); the model's
first forward is lm_ce's head probe, which runs before lm_ce starts its clock.
"""
from __future__ import annotations

import gc
import time

from .measure import profiler, save_profile, status_mb


def lm_ce_config(spec: dict, data: str, mode: str = "lm_ce"):
    """The case's settings as an lm_ce Config: document mode, windows of max_length, no overlap (the lm_ce-min-k
    path: with --min-k)."""
    from lm_ce.config.fields import Config

    from .spec import MIN_K

    L = spec["max_length"]
    return Config(model=spec["gguf"], dtype=spec["dtype"], text_field="text", mode="document", max_length=L, stride=L,
                  prefix_token="auto", batch_size=spec["batch_size"], threads=spec["threads"], progress=False,
                  data_files=[data], **spec.get("lm_ce_options", {}), **({"min_k": MIN_K} if mode == "lm_ce-min-k" else {}))


def warm_up(spec: dict) -> None:
    """First-time work outside the clock, without loading a model (a second load would blur the peak)."""
    import torch
    from transformers import AutoTokenizer

    from lm_ce.data import documents as data

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
    results = runner.evaluate(lm_ce_config(spec, spec["data"], mode), on_event=on_event, owns_process=True)  # as the CLI runs it
    prof = marks.get("profiler")
    if prof is not None:
        prof.__exit__(None, None, None)
    s = results.summary
    if s["model"].get("path") != spec["model_dir"]:
        print(f"warning: lm_ce loaded {s['model'].get('path')}, not its cache {spec['model_dir']}", flush=True)
    return {
        "gpu": gpu_figures(spec, s),
        "path": mode, "tokens": s["counts"]["tokens"], "nll_sum": s["nll_sum"], "seconds": s["timing"]["seconds"],
        "load_seconds": s["timing"]["load_seconds"], "windows": s["counts"]["windows"],
        "cpu_seconds": marks["cpu_end"] - marks["cpu"], "observed_seconds": marks["wall_end"] - marks["wall"],
        "input_tokens": s["counts"].get("input_tokens"), "padding_tokens": s["counts"].get("padding_tokens"),
        "head": s["model"].get("head"), "model_path": s["model"].get("path"), "device_map": s["model"].get("device_map"), "settings": s.get("settings"),
        "environment": s.get("environment"), "memory": memory, "profile": save_profile(prof, spec, mode),
    }


def gpu_figures(spec: dict, summary: dict) -> dict | None:
    """On a GPU: the card, its peak memory and the model FLOPs utilisation of the scoring (None on CPU)."""
    import torch
    from transformers import AutoConfig

    from .mfu import flops_per_token, peak_tflops, utilisation

    if not summary["environment"]["device"].startswith("cuda"):
        return None
    config = AutoConfig.from_pretrained(spec["model_dir"]).get_text_config()
    embedding = config.vocab_size * config.hidden_size  # a lookup, not a matmul (the head is counted once)
    flops = flops_per_token(matmul_parameters=summary["model"]["parameters"] - embedding,
                            layers=config.num_hidden_layers, hidden=config.hidden_size, context=spec["max_length"])
    if getattr(config, "tie_word_embeddings", False):
        flops += 2.0 * embedding  # the tied head's matmul, its weight counted once among the parameters
    card = torch.cuda.get_device_name()
    peak = spec.get("peak_tflops") or peak_tflops(card)
    rate = summary["timing"]["tokens_per_second"]
    return {"card": card, "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20, "flops_per_token": flops,
            "peak_tflops": peak, "mfu": utilisation(rate, flops, peak)}
