"""GGUF files: dequantized by transformers (slow, memory-hungry), then the plain weights cached under
`LM_CE_CACHE`/gguf/<content hash>-<dtype>-<format>-<transformers and gguf versions> so that later runs load them in
seconds. Each entry says what it was made from (`lm_ce_cache.json`); `lm-ce cache list` and `lm-ce cache clear`
show and remove them."""
from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from lm_ce.config.fields import Config
from lm_ce.errors import UsageError
from lm_ce.files import atomic_path, atomic_write, cache_root, file_sha256
from lm_ce.model.diagnose import model_flag

log = logging.getLogger("lm_ce")

MANIFEST = "lm_ce_cache.json"  # in each entry: its source file, sha256, dtype, versions, size and date
SPARE = 2**28  # bytes left free on the cache's disk beyond an entry's own
ENTRY = re.compile(r"([0-9a-f]{32}-[a-z0-9]+)-.+")  # an entry's name: <content hash>-<dtype>-<format and versions>


def gguf_source(spec: str, cfg: Config, dtype: torch.dtype) -> tuple[str, dict, str | None]:
    """(path to load, kwargs, cache directory to fill) for a GGUF file: its cache when there, else the file."""
    if not Path(spec).is_file():
        raise UsageError(f"GGUF file {spec} does not exist; check {model_flag(cfg)}")
    with open(spec, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UsageError(f"{spec} is not a GGUF file (no GGUF magic bytes); give a valid .gguf file")
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    root = cache_root()
    if cfg.gguf_cache and root is None and cfg.device_map:
        raise UsageError("--device-map with a GGUF file places its dequantized cache, and LM_CE_CACHE is set empty "
                         "(no disk cache): set LM_CE_CACHE to a folder, or unset it")
    if cfg.gguf_cache and root is not None:
        cached = root / "gguf" / entry_name(file_sha256(spec), dtype)
        if (cached / "config.json").is_file():
            return str(cached), kwargs, None
        return str(Path(spec).parent), {**kwargs, "gguf_file": Path(spec).name}, str(cached)
    return str(Path(spec).parent), {**kwargs, "gguf_file": Path(spec).name}, None


# v2: a tied head is stored under its embedding's name (disk offload needs it) and the config names its class;
# caches of the first format (no suffix) are not read, so they are written anew once.
GGUF_CACHE_FORMAT = "v2"


def versions() -> dict[str, str]:
    """The versions that dequantize a GGUF file (transformers, reading it with gguf): part of an entry's key."""
    import importlib.metadata

    import transformers

    return {"transformers": transformers.__version__, "gguf": importlib.metadata.version("gguf")}


def entry_name(sha256: str, dtype: torch.dtype) -> str:
    v = versions()
    return (f"{sha256[:32]}-{str(dtype).replace('torch.', '')}-{GGUF_CACHE_FORMAT}-transformers{v['transformers']}"
            f"-gguf{v['gguf']}")


def save_gguf_cache(model, tokenizer, target: str, source: str | None = None) -> None:
    """Write the dequantized weights where gguf_source will find them next time, saying first how much space they
    take (written into a temporary folder, then renamed; the temporary is removed on any stop, Ctrl-C included).
    Entries made from the same file with the same dtype by other versions are removed once it is written."""
    from safetensors.torch import save_file

    target_path = Path(target)
    weights = unshared_state(model)
    size = sum(t.numel() * t.element_size() for t in weights.values())
    free = shutil.disk_usage(next(p for p in [target_path, *target_path.parents] if p.exists())).free
    if free < size + SPARE:
        log.warning("not caching the dequantized GGUF weights (%s) in %s: %s free on that disk; free space, set "
                    "LM_CE_CACHE elsewhere, or --no-gguf-cache", _mb(size), target_path.parent, _mb(free))
        return
    log.info("caching the dequantized GGUF weights (%s) in %s, so that later runs load them in seconds "
             "(--no-gguf-cache: not cached; lm-ce cache list / clear)", _mb(size), target)
    try:
        target_path.parent.mkdir(parents=True, exist_ok=True)
        if target_path.exists():  # an entry without its config.json: not one gguf_source would read
            shutil.rmtree(target_path)
        with atomic_path(target_path) as tmp, quiet_progress():  # one progress display at a time
            tmp.mkdir()
            # save_pretrained refuses GGUF-loaded models; the dequantized tensors are plain, so save them as such
            config = model.config.to_dict()
            config.pop("quantization_config", None)
            config["architectures"] = [type(model).__name__]  # what other tools (and converters) read the class from
            (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
            save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            tokenizer.save_pretrained(tmp)
            manifest = {"source": str(Path(source).absolute()) if source else None,
                        "dtype": str(next(iter(weights.values())).dtype).replace("torch.", ""),
                        "format": GGUF_CACHE_FORMAT, **versions(),
                        "bytes": folder_bytes(tmp), "created": time.strftime("%Y-%m-%d %H:%M:%S")}
            atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    except (OSError, ValueError, RuntimeError) as e:
        log.warning("could not cache the dequantized GGUF weights in %s: %s", target, e)
        return
    key = ENTRY.fullmatch(target_path.name)
    for old in target_path.parent.iterdir() if key else []:
        other = ENTRY.fullmatch(old.name)
        if other and other[1] == key[1] and old != target_path and old.is_dir():  # same content and dtype
            shutil.rmtree(old, ignore_errors=True)
            log.info("removed %s: the same GGUF file's cache made by other versions", old.name)


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB" if n < 2**30 else f"{n / 2**30:,.1f} GB"


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cache_entries() -> list[dict]:
    """Each folder under LM_CE_CACHE/gguf: {name, path, bytes, source, created, finished} (`lm-ce cache list`);
    a temporary that a killed run left is listed as unfinished."""
    root = cache_root()
    folder = root / "gguf" if root is not None else None
    if folder is None or not folder.is_dir():
        return []
    out = []
    for entry in sorted(folder.iterdir()):
        if not entry.is_dir():
            continue
        try:
            manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            manifest = {}
        manifest = manifest if isinstance(manifest, dict) else {}
        created = manifest.get("created") or time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.stat().st_mtime))
        out.append({"name": entry.name, "path": entry, "bytes": folder_bytes(entry), "source": manifest.get("source"),
                    "created": created, "finished": (entry / "config.json").is_file() and not entry.name.startswith(".")})
    return out


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
