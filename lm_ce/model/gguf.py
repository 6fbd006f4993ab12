"""GGUF files: dequantized by transformers (slow, memory-hungry), then the plain weights cached under
`LM_CE_CACHE`/gguf/<content hash> so that later runs load them in seconds."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from lm_ce.config.fields import Config
from lm_ce.errors import UsageError
from lm_ce.files import cache_root, file_sha256
from lm_ce.model.diagnose import model_flag

log = logging.getLogger("lm_ce")


def gguf_source(spec: str, cfg: Config, dtype: torch.dtype) -> tuple[str, dict, str | None]:
    """(path to load, kwargs, cache directory to fill) for a GGUF file: its cache when there, else the file."""
    if not Path(spec).is_file():
        raise UsageError(f"GGUF file {spec} does not exist; check {model_flag(cfg)}")
    with open(spec, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UsageError(f"{spec} is not a GGUF file (no GGUF magic bytes); give a valid .gguf file")
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_cache:
        name = f"{file_sha256(spec)[:32]}-{str(dtype).replace('torch.', '')}-{GGUF_CACHE_FORMAT}"
        cached = cache_root() / "gguf" / name
        if (cached / "config.json").is_file():
            return str(cached), kwargs, None
        return str(Path(spec).parent), {**kwargs, "gguf_file": Path(spec).name}, str(cached)
    return str(Path(spec).parent), {**kwargs, "gguf_file": Path(spec).name}, None


# v2: a tied head is stored under its embedding's name (disk offload needs it) and the config names its class;
# caches of the first format (no suffix) are not read, so they are written anew once.
GGUF_CACHE_FORMAT = "v2"


def save_gguf_cache(model, tokenizer, target: str) -> None:
    """Write the dequantized weights where gguf_source will find them next time (write, then rename)."""
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    tmp = Path(f"{target}.tmp{os.getpid()}")
    try:
        with quiet_progress():  # one progress display at a time: no library bar while the weights are written
            tmp.mkdir(parents=True, exist_ok=True)
            # save_pretrained refuses GGUF-loaded models; the dequantized tensors are plain, so save them as such
            config = model.config.to_dict()
            config.pop("quantization_config", None)
            config["architectures"] = [type(model).__name__]  # what other tools (and converters) read the class from
            (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
            save_file(unshared_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
        log.info("cached the dequantized GGUF weights in %s (--no-gguf-cache to turn off)", target)
    except (OSError, ValueError, RuntimeError) as e:
        log.warning("could not cache the dequantized GGUF weights in %s: %s", target, e)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """transformers' and huggingface_hub's progress bars off, then exactly as they were: huggingface_hub keeps a
    state per group of bars, which its disable_progress_bars() clears and enable_progress_bars() does not put back."""
    import importlib

    import transformers
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    states = getattr(importlib.import_module("huggingface_hub.utils.tqdm"), "progress_bar_states", None)
    hub_before = dict(states) if isinstance(states, dict) else are_progress_bars_disabled()
    transformers_was_on = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        if transformers_was_on:
            transformers.utils.logging.enable_progress_bar()
        if isinstance(hub_before, dict):
            states.clear()
            states.update(hub_before)
        elif not hub_before:
            enable_progress_bars()


def unshared_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once, under its first name in module order: a tied head is stored
    as the input embedding, as save_pretrained stores it (accelerate's disk offload looks weights up by that name)."""
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor.contiguous()
    return out
