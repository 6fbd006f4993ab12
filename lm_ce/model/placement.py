"""Placing a model larger than one device: transformers' device_map, max_memory and offload_folder.

accelerate does the placing (no hand-written dispatch). With several processes on a machine, each takes
its own group of the visible GPUs: local process r of w, with n GPUs visible, takes GPUs r*k .. r*k+k-1,
k = n // w, and the GPU numbers of --device-map and --max-memory count within that group (0 is the
group's first GPU). So data parallel and model sharding combine: 8 GPUs, 4 processes, 2 GPUs each.
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile

import torch

from lm_ce import compat
from lm_ce.config.fields import Config
from lm_ce.config.sources import words_of
from lm_ce.errors import UsageError, first_line

log = logging.getLogger("lm_ce")


def local_process() -> dict:
    """{local_rank, local_world}: this process on its machine, as torchrun and accelerate launch set them."""
    return {"local_rank": int(os.environ.get("LOCAL_RANK", 0)), "local_world": int(os.environ.get("LOCAL_WORLD_SIZE", 1))}


def gpu_group(gpus: int, *, local_rank: int, local_world: int) -> list[int]:
    """The visible GPUs local process `local_rank` of `local_world` places its model on (the rule above)."""
    if gpus == 0:
        return []
    size = gpus // local_world
    if size == 0:
        raise UsageError(
            f"--device-map: {local_world} processes on this machine but only {gpus} GPUs visible; each process needs "
            "at least one GPU of its own: start at most as many processes as GPUs"
        )
    if local_rank == 0 and gpus % local_world:
        log.warning("%d GPUs for %d processes: %d GPU(s) each, the last %d unused", gpus, local_world, size,
                    gpus % local_world)
    return list(range(local_rank * size, (local_rank + 1) * size))


def from_pretrained_kwargs(cfg: Config, *, gpus: int, local_rank: int, local_world: int) -> dict:
    """device_map, max_memory and offload_folder for from_pretrained; {} when the model goes to one device."""
    if not cfg.device_map:
        return {}
    group = gpu_group(gpus, local_rank=local_rank, local_world=local_world)
    w = words_of(cfg)

    def device(d, what: str):
        if not isinstance(d, int):
            return d
        if d >= len(group):
            where = f"GPUs 0..{len(group) - 1} of this process's group" if group else "no GPU (CUDA is not available)"
            raise w.error(f"{what} names GPU {d}, but there is {where}; use GPU numbers within it, cpu or disk")
        return group[d]

    spec = cfg.device_map  # typed by the config's source (values.parse_device_map): "0" is GPU 0
    if isinstance(spec, dict):
        device_map = {module: device(d, w("device_map")) for module, d in spec.items()}
    else:
        device_map = spec
        if device_map == "balanced_low_0" and group and group[0] != 0:
            raise w.error(f"{w('device_map', 'balanced_low_0')} works only for the process whose GPUs start at 0; "
                          "use balanced, auto or sequential with several processes")
    max_memory = None
    if cfg.max_memory:
        max_memory = {device(d, w("max_memory")): size for d, size in cfg.max_memory.items()}
    elif local_world > 1 and not isinstance(device_map, dict):
        max_memory = shared_memory(group, local_world)
    folder = offload_folder(cfg, f"process{local_rank}" if local_world > 1 else "")
    return {"device_map": device_map, "max_memory": max_memory, "offload_folder": folder}


def shared_memory(group: list[int], local_world: int) -> dict:
    """The memory a process may fill: its own GPUs, and its share of the machine's CPU memory."""
    from accelerate.utils import get_max_memory

    everything = get_max_memory()
    budget = {g: everything[g] for g in group}
    budget["cpu"] = everything["cpu"] // local_world
    return budget


def offload_folder(cfg: Config, sub: str = "") -> str:
    """Where weights mapped to disk are written when their files cannot be read in place (safetensors files are
    read in place): --offload-folder (a subfolder per process when several share a machine), else a temporary one."""
    if cfg.offload_folder:
        return writable_folder(os.path.join(cfg.offload_folder, sub) if sub else cfg.offload_folder)
    folder = tempfile.mkdtemp(prefix="lm_ce_offload_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def writable_folder(folder: str) -> str:
    """--offload-folder, created if missing and checked to take files before the model loads, or a UsageError."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f"--offload-folder {folder} is a file, not a folder; give a folder (created if missing)")
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=folder).close()  # what offloading does: write files there
    except OSError as e:
        raise UsageError(f"--offload-folder {folder} cannot be written ({e.strerror}); give a writable folder") from None
    return folder


def load_placed(path: str, *, dtype: torch.dtype, place: dict, cfg: Config) -> torch.nn.Module:
    """A model directory loaded with a device map (`place`: from_pretrained's placement arguments, and its
    attn_implementation when one is asked for), or a UsageError saying what to fix in the map."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                                                    **place)
    except (ValueError, KeyError, RuntimeError) as e:
        error = placement_error(cfg, e)
        if error is None:
            raise
        raise error from None


def check_tied_head(model: torch.nn.Module) -> None:
    """Refuse a map that splits a tied head from the input embedding it shares its weight with."""
    placed = getattr(model, "hf_device_map", None) or {}
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head = model.get_output_embeddings()
    if not placed or head is None or not getattr(config, "tie_word_embeddings", False):
        return
    names = {id(m): n for n, m in model.named_modules()}
    embedding, output = names.get(id(model.get_input_embeddings())), names.get(id(head))

    def device(name):
        owner = max((k for k in placed if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
        return placed.get(owner)

    if embedding is not None and output is not None and device(embedding) != device(output):
        raise UsageError(
            f"--device-map puts {output} on {device(output)} and {embedding} on {device(embedding)}, but this model's "
            "head is tied to its input embedding (one weight): give both the same device"
        )


def placement_error(cfg: Config, e: Exception) -> UsageError | None:
    """The UsageError for a device map that transformers or accelerate refused, else None."""
    if not cfg.device_map or not isinstance(e, (ValueError, KeyError, RuntimeError)):
        return None
    text = first_line(e)
    if "device_map" in text or "device map" in text or "offload" in text or "max_memory" in text:
        return UsageError(
            f"--device-map {cfg.device_map if isinstance(cfg.device_map, str) else '(mapping)'} was refused: {text}. "
            "A mapping must give every module a device (0, cpu or disk); module names are those of model.named_modules()"
        )
    return None


def device_map_of(model: torch.nn.Module) -> dict | None:
    """The map the model was placed with (module -> GPU number, 'cpu' or 'disk'), or None for a model not placed by one."""
    placed = getattr(model, "hf_device_map", None)
    if not placed:
        return None
    return {module: d if isinstance(d, (int, str)) else str(d) for module, d in placed.items()}


def used_map(model: torch.nn.Module) -> dict:
    """The map a model loaded with --device-map is placed with; transformers dispatches only the maps that need
    it, so a map that put everything on one device (all on the CPU, say) is that device for the whole model."""
    device = next(model.parameters()).device
    return device_map_of(model) or {"": device.index if device.type == "cuda" else device.type}


def _hook_device(hook) -> torch.device | None:
    """The execution device of an accelerate hook (or of the first in a chain of hooks), if it has one."""
    for h in getattr(hook, "hooks", None) or [hook]:
        executes = getattr(h, "execution_device", None)
        if executes is not None:
            return torch.device(f"cuda:{executes}" if isinstance(executes, int) else executes)
    return None


def execution_device(model: torch.nn.Module, module: torch.nn.Module) -> torch.device:
    """Where a submodule computes: the execution device of the nearest accelerate hook on it or above it,
    else its weights' device."""
    modules = dict(model.named_modules())
    name = next((n for n, m in modules.items() if m is module), None)
    parts = name.split(".") if name else []
    for k in range(len(parts), -1, -1) if name is not None else ():
        found = _hook_device(compat.hook_of(modules[".".join(parts[:k])]))
        if found is not None:
            return found
    for tensor in module.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a batch's token ids go: the input embedding's execution device."""
    return execution_device(model, model.get_input_embeddings())
