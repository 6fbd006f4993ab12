"""Loading a causal LM and its tokenizer: Hub id, local directory, or local GGUF file (model/gguf.py), placed on
one device or by a device map (model/placement.py); what went wrong is said in one line (model/diagnose.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lm_ce import compat
from lm_ce.config.fields import Config, resolve_path
from lm_ce.errors import UsageError
from lm_ce.model import fingerprint, placement
from lm_ce.model.diagnose import hub_unreachable, load_error, model_flag
from lm_ce.model.gguf import gguf_source, save_gguf_cache

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelInfo:
    name: str  # what the user gave
    source: str  # hub | directory | gguf
    path: str  # what was loaded: the directory, the Hub id, or the .gguf file (the same whether or not its cache was read)
    revision: str | None
    dtype: str
    max_positions: int | None
    parameters: int
    device_map: dict | None = None  # module -> GPU number, "cpu" or "disk", as loaded (None: one device)
    commit: str | None = None  # the Hub commit the weights were read at (a Hub model)
    weights: dict | None = None  # what the weights are, by content (model/fingerprint.py)
    tokenizer: dict | None = None  # the tokenizer's fingerprint (model/fingerprint.py)
    attn_implementation: str | None = None  # as transformers set it up (config._attn_implementation after loading)


def torch_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """float32 on CPUs (no native bf16 arithmetic assumed), bfloat16 on CUDA, unless --dtype says."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


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
    attention = attention_kwargs(cfg)
    place = placement.from_pretrained_kwargs(cfg, gpus=torch.cuda.device_count(), **placement.local_process())
    cache_to = None
    weights, stats = None, {}  # a local model's files: hashed before they are read, checked unchanged after loading
    if spec.lower().endswith(".gguf"):
        source = "gguf"
        weights, stats = fingerprint.file_weights(spec) if Path(spec).is_file() else (None, {})
        path, kwargs, cache_to = gguf_source(spec, cfg, dtype)  # its cache is keyed by the same (remembered) sha256
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
        weights, stats = fingerprint.file_weights(spec)
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
        kwargs["revision"] = fingerprint.pinned_revision(spec, cfg.revision)  # tokenizer and weights of one commit
    part = "tokenizer"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        part = "model"
        # a GGUF file is dequantized in memory; with a device map its cache is then placed (transformers
        # cannot offload GGUF weights to disk). The attention implementation is transformers' choice for the
        # architecture unless --attn-implementation says (Gemma-2's attention softcapping, for one, is eager only).
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **attention, **kwargs,
                                                     **({} if cache_to else place))
    except Exception as e:  # transformers raises many kinds; turn the ones bad input causes into one line
        error = placement.placement_error(cfg, e) or load_error(cfg, source, path, e, part)
        if error is None:
            raise
        raise error from None
    if cache_to and main_process:
        save_gguf_cache(model, tokenizer, cache_to, source=spec)
    compat.drop_build_tables(tokenizer)
    if cache_to and place:
        del model
        if not (Path(cache_to) / "config.json").is_file():
            raise UsageError(f"--device-map with a GGUF file places its dequantized cache, which could not be written to "
                             f"{cache_to}: make that folder writable or set LM_CE_CACHE")
        path = cache_to
        model = placement.load_placed(path, dtype=dtype, place={**place, **attention}, cfg=cfg)
    if place:
        placement.check_tied_head(model)
    else:
        model.to(device)
    model.eval()
    info = ModelInfo(
        name=cfg.model,
        source=source,
        path=spec if source == "gguf" else str(path),
        revision=cfg.revision,
        dtype=str(dtype).replace("torch.", ""),
        max_positions=max_positions(model.config),
        parameters=sum(p.numel() for p in model.parameters()),
        device_map=placement.used_map(model) if place else None,
        commit=fingerprint.hub_commit(spec, kwargs.get("revision"), model) if source == "hub" else None,
        weights=weights,
        tokenizer=fingerprint.tokenizer_fingerprint(tokenizer),
        attn_implementation=attn_implementation(model),
    )
    if source == "hub":  # a Hub snapshot's files are named by their content: nothing to read
        info.weights = fingerprint.hub_weights(spec, info.commit)
    fingerprint.check_unchanged(stats)
    return model, tokenizer, info


def attention_kwargs(cfg: Config) -> dict:
    """from_pretrained's attn_implementation: {} (transformers' choice for the architecture) unless
    --attn-implementation names one, checked against the installed transformers' own registry of attention
    functions (a function registered from Python counts) and its pattern for kernels from the Hub (org/repo)."""
    name = cfg.attn_implementation
    if name is None:
        return {}
    from transformers.integrations.hub_kernels import is_kernel
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if name not in known and not is_kernel(name):
        import difflib
        import transformers

        close = difflib.get_close_matches(name, known, n=1)
        raise UsageError(
            f"--attn-implementation {name} is not an attention implementation of transformers {transformers.__version__}"
            f"{f' (did you mean {close[0]}?)' if close else ''}: give one of {', '.join(known)}, a kernel from the Hub "
            "(org/repo), or leave it out for the architecture's default"
        )
    return {"attn_implementation": name}


def attn_implementation(model: torch.nn.Module) -> str | None:
    """The attention implementation transformers set the model up with (None for a model without one)."""
    config = getattr(model, "config", None)
    name = getattr(config, "_attn_implementation", None)
    return name if isinstance(name, str) else None


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


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map text to the same ids (then two models can be compared token by token)."""
    return a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids
