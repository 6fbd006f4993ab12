"""Loading a causal LM and its tokenizer: Hub id, local directory, or local GGUF file.

GGUF files are dequantized by transformers (slow, memory-hungry); the plain weights are then
cached under ~/.cache/lm_ce/gguf/<content hash> so that later runs load them in seconds.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import placement
from .config import Config, resolve_path
from .errors import UsageError, first_line

log = logging.getLogger("lm_ce")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelInfo:
    name: str  # what the user gave
    source: str  # hub | directory | gguf
    path: str  # what was loaded (a cache directory for a cached GGUF)
    revision: str | None
    dtype: str
    max_positions: int | None
    parameters: int
    device_map: dict | None = None  # module -> GPU number, "cpu" or "disk", as loaded (None: one device)


def torch_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """float32 on CPUs (no native bf16 arithmetic assumed), bfloat16 on CUDA, unless --dtype says."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


_digests: dict[tuple, str] = {}  # file_sha256's answers, by the file's identity and times
SETTLED_NS = 2 * 10**9  # a file changed this recently is not remembered on disk: timestamps can be coarser


def file_sha256(path: str, block: int = 2**24) -> str:
    """The sha256 of a file's bytes, remembered while its device, inode, size, mtime and ctime stay the same (any
    write changes the ctime): in memory, and on disk under `LM_CE_CACHE`/sha256, so that a later run or a resume
    does not read a large data or GGUF file again. A file changed within SETTLED_NS of being hashed is not
    remembered on disk: a write in the same timestamp tick would go unseen."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _digests:
        return _digests[key]
    memo = cache_root() / "sha256" / hashlib.sha256(repr(key).encode()).hexdigest()
    with contextlib.suppress(OSError):
        known = memo.read_text()
        if len(known) == 64 and all(c in "0123456789abcdef" for c in known):
            _digests[key] = known
            return known
    began = time.time_ns()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    _digests[key] = digest.hexdigest()
    if began - max(st.st_mtime_ns, st.st_ctime_ns) > SETTLED_NS:
        with contextlib.suppress(OSError):
            memo.parent.mkdir(parents=True, exist_ok=True)
            partial = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
            partial.write_text(_digests[key])
            os.replace(partial, memo)
    return _digests[key]


def cache_root() -> Path:
    return Path(os.environ.get("LM_CE_CACHE", Path.home() / ".cache" / "lm_ce"))


def max_positions(config) -> int | None:
    """How many positions the model can attend over, from the usual config attributes."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load(cfg: Config, device: torch.device, main_process: bool = True) -> tuple[torch.nn.Module, object, ModelInfo]:
    """(model in eval mode on `device`, tokenizer, info), or a UsageError that says what to do."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch_dtype(cfg, device)
    spec = resolve_path(cfg.model)
    kwargs: dict = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    place = placement.from_pretrained_kwargs(cfg, gpus=torch.cuda.device_count(), **placement.local_process())
    cache_to = None
    if spec.lower().endswith(".gguf"):
        source = "gguf"
        path, kwargs, cache_to = gguf_source(spec, cfg, dtype)
        if place and not cfg.gguf_cache:
            raise UsageError("--device-map with a GGUF file places its dequantized cache: drop --no-gguf-cache")
    elif Path(spec).exists():
        source, path = "directory", spec
        if Path(spec).is_file():
            raise UsageError(
                f"model path {spec} is a file, not a model: give a model directory (config.json + weights), "
                "a .gguf file, or a Hub id"
            )
        if not (Path(spec) / "config.json").is_file():
            raise UsageError(f"model directory {spec} has no config.json; is it a transformers model directory?")
    elif spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1:
        raise UsageError(
            f"model path {spec} does not exist; check {model_flag(cfg)}: give an existing directory, a .gguf file, "
            "or a Hub id"
        )
    else:
        source, path = "hub", spec
        unreachable = hub_unreachable(spec, cfg)
        if unreachable:
            raise unreachable
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        # a GGUF file is dequantized in memory; with a device map its cache is then placed (transformers
        # cannot offload GGUF weights to disk)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation="sdpa", **kwargs, **({} if cache_to else place))
    except Exception as e:  # transformers raises many kinds; turn the ones bad input causes into one line
        error = placement.placement_error(cfg, e) or load_error(cfg, source, path, e)
        if error is None:
            raise
        raise error from None
    if cache_to and main_process:
        save_gguf_cache(model, tokenizer, cache_to)
    drop_build_tables(tokenizer)
    if cache_to and place:
        del model
        if not (Path(cache_to) / "config.json").is_file():
            raise UsageError(f"--device-map with a GGUF file places its dequantized cache, which could not be written to "
                             f"{cache_to}: make that folder writable or set LM_CE_CACHE")
        path = cache_to
        model = placement.load_placed(path, dtype=dtype, place=place, cfg=cfg)
    if place:
        placement.check_tied_head(model)
    else:
        model.to(device)
    model.eval()
    info = ModelInfo(
        name=cfg.model,
        source=source,
        path=str(path),
        revision=cfg.revision,
        dtype=str(dtype).replace("torch.", ""),
        max_positions=max_positions(model.config),
        parameters=sum(p.numel() for p in model.parameters()),
        device_map=placement.used_map(model) if place else None,
    )
    return model, tokenizer, info


def check_vocabulary(model: torch.nn.Module, tokenizer, name: str) -> None:
    """Refuse a tokenizer with more ids than the model's input embedding has rows: the first text holding such
    an id would end scoring with an IndexError."""
    embedding = model.get_input_embeddings()
    rows = getattr(embedding, "num_embeddings", None) or embedding.weight.shape[0]
    if len(tokenizer) > rows:
        raise UsageError(
            f"model '{name}': its tokenizer has {len(tokenizer):,} ids, more than the model's {rows:,} embedding rows "
            f"(ids {rows:,} and up have no embedding); give the tokenizer the model was trained with"
        )


BUILD_TABLES = ("_vocab", "_merges", "_vocab_scores")


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map text to the same ids (then two models can be compared token by token)."""
    return a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids


def drop_build_tables(tokenizer) -> None:
    """Delete the Python vocabulary and merge list that transformers (5.x) keeps on a fast tokenizer after building
    its Rust tokenizer from them: nothing reads them again, and at Gemma-3's 262k vocabulary they hold 125 MB."""
    if getattr(tokenizer, "is_fast", False) and getattr(tokenizer, "_tokenizer", None) is not None:
        for name in BUILD_TABLES:
            if name in vars(tokenizer):
                delattr(tokenizer, name)


def load_error(cfg: Config, source: str, path: str, e: Exception) -> UsageError | None:
    """The UsageError for an exception from transformers while loading, or None for a bug to show as is."""
    flag = model_flag(cfg)
    if source == "gguf":  # the GGUF reader fails in any way on a truncated or corrupt file
        return UsageError(
            f"transformers cannot read GGUF file {resolve_path(cfg.model)} ({first_line(e)}); the file is "
            "truncated, corrupt or of an unsupported architecture: download or convert it again"
        )
    code = remote_code(source, path, e)
    if code and not cfg.trust_remote_code:
        return UsageError(
            f"model '{cfg.model}' comes with its own Python code ({code}), which transformers runs only with "
            "--trust-remote-code: that flag executes the model's code on this machine with your permissions, so "
            "read the code first and add the flag only if you trust its source"
        )
    if type(e).__name__ == "SafetensorError":  # safetensors' own error type, raised for a damaged file
        bad = damaged_safetensors(path) if source == "directory" else None
        return UsageError(
            f"cannot read the weights of model '{cfg.model}': {bad or 'a .safetensors file'} is truncated or corrupt "
            f"({first_line(e)}); download or save the model again"
        )
    if isinstance(e, (OSError, ValueError, KeyError, RuntimeError, TypeError)) and source == "directory":
        return UsageError(
            f"cannot load model directory {path} ({first_line(e)}); it needs a valid config.json, the weights "
            "(*.safetensors or *.bin) and the tokenizer files, as save_pretrained writes them"
        )
    if isinstance(e, OSError):
        return UsageError(
            f"cannot load model '{cfg.model}' on the Hub or in the local cache ({first_line(e)}). Offline? Give a "
            f"local directory or a .gguf file with {flag}"
        )
    if isinstance(e, (ValueError, KeyError, RuntimeError, TypeError)):
        return UsageError(f"transformers cannot load model '{cfg.model}': {first_line(e)}")
    return None


def hub_unreachable(repo_id: str, cfg: Config, timeout: float = 3.0) -> UsageError | None:
    """For a Hub id not in the local cache: the error to give at once when the Hub cannot be reached, instead of
    transformers' retries (about a minute without network); None when it is cached, reachable, or offline mode is on."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:  # transformers looks in the cache only, and says so at once
        return None
    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json", revision=cfg.revision), str):
            return None
    except ValueError:  # not a valid repo id: transformers says what is wrong with it
        return None
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)  # any answer, even an error status, is reachable
    except Exception as e:  # the HTTP client raises its own kinds (connect, DNS, timeout, proxy)
        return UsageError(
            f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({type(e).__name__}) and model '{repo_id}' "
            f"is not in the local cache. Offline? Give a local directory or a .gguf file with {model_flag(cfg)} "
            "(HF_HUB_OFFLINE=1 uses only the cache)"
        )
    return None


def model_flag(cfg: Config) -> str:
    """The flag that named the model being loaded: --compare-to for a compared model, else --model."""
    return "--compare-to" if cfg.model in (cfg.compare_to or []) else "--model"


def remote_code(source: str, path: str, e: Exception) -> str | None:
    """Where a model that transformers refused for wanting its own code asks for it ('auto_map in config.json: ...')."""
    if "trust_remote_code" not in str(e):
        return None
    if source == "directory":
        for name in ("config.json", "tokenizer_config.json"):
            try:
                auto_map = json.loads((Path(path) / name).read_text(encoding="utf-8")).get("auto_map")
            except (OSError, ValueError, AttributeError):
                continue
            if auto_map:
                classes = auto_map.values() if isinstance(auto_map, dict) else auto_map
                return f"auto_map in {name}: {', '.join(str(c) for c in classes)}"
    return "its repository's code files"


def damaged_safetensors(directory: str) -> str | None:
    """The first *.safetensors file of a directory whose header safetensors cannot read, or None."""
    from safetensors import safe_open

    for file in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception:  # SafetensorError, or OSError for an unreadable file
            return str(file)
    return None


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
    """transformers' and huggingface_hub's progress bars off (as they were before, afterwards)."""
    import transformers
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    hub_was_off = are_progress_bars_disabled()
    transformers_was_on = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        if transformers_was_on:
            transformers.utils.logging.enable_progress_bar()
        if not hub_was_off:
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
