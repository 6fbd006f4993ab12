"""Why a model did not load, in one line: what transformers, safetensors or the Hub raised, turned into what to do."""
from __future__ import annotations

import json
from pathlib import Path

from lm_ce.config.fields import Config, resolve_path
from lm_ce.errors import UsageError, first_line


def load_error(cfg: Config, source: str, path: str, e: Exception, part: str = "model") -> UsageError | None:
    """The UsageError for an exception from transformers while loading the `part` (tokenizer or model), or None
    for a bug to show as is. The files are blamed only where they are the cause (missing, unreadable, not JSON,
    no tokenizer); otherwise transformers' own reason is given (an attention implementation the architecture
    does not support, a package it needs, an architecture this version does not know)."""
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
    files = isinstance(e, OSError) or (part == "tokenizer" and isinstance(e, (ValueError, KeyError, TypeError)))
    if files and source == "directory":
        return UsageError(
            f"cannot load model directory {path} ({first_line(e)}); it needs a valid config.json, the weights "
            "(*.safetensors or *.bin) and the tokenizer files, as save_pretrained writes them"
        )
    if isinstance(e, OSError):
        return UsageError(
            f"cannot load model '{cfg.model}' on the Hub or in the local cache ({first_line(e)}). Offline? Give a "
            f"local directory or a .gguf file with {flag}"
        )
    if isinstance(e, (ValueError, KeyError, RuntimeError, TypeError, ImportError)):
        import transformers

        where = f"model directory {path}" if source == "directory" else f"model '{cfg.model}'"
        about_attention = "attention" in str(e).lower() or "attn" in str(e).lower()
        hint = ("; leave --attn-implementation out for the architecture's default, or give one it supports"
                if cfg.attn_implementation and about_attention else "")
        return UsageError(f"transformers {transformers.__version__} cannot load the {part} of {where}: "
                          f"{first_line(e)}{hint}")
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
    """The flag that named the model being loaded: --compare-to for a compared model, --longppl-evaluator for
    LongPPL's evaluator, else --model."""
    if cfg.model in (cfg.compare_to or []):
        return "--compare-to"
    return "--longppl-evaluator" if cfg.model == cfg.longppl_evaluator else "--model"


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
