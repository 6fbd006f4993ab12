"""What a model and a tokenizer are, by content: the weights a run read (a Hub commit and its files' blob ids, a
local directory's or GGUF file's sha256, or the bytes of a model object's parameters) and the tokenizer's
serialized form, hashed, so that a run records what it scored and a resume, merge or compare can tell."""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from lm_ce.errors import UsageError
from lm_ce.files import file_sha256, file_stat

# The files of a model directory that from_pretrained reads for the weights and architecture (the tokenizer is
# fingerprinted from the object loaded); pytorch_model*.bin only where no safetensors is there (then it is not read).
WEIGHT_FILES = ("config.json", "adapter_config.json", "*.safetensors", "*.safetensors.index.json", "*.py")
TORCH_FILES = ("pytorch_model*.bin", "pytorch_model*.bin.index.json", "adapter_model.bin")


def weight_files(directory: str) -> list[Path]:
    """The files of a model directory that decide its weights, by name."""
    files = sorted(p for p in Path(directory).iterdir() if p.is_file())
    chosen = [p for p in files if any(fnmatch.fnmatch(p.name, g) for g in WEIGHT_FILES)]
    if not any(p.suffix == ".safetensors" for p in chosen):
        chosen += [p for p in files if any(fnmatch.fnmatch(p.name, g) for g in TORCH_FILES)]
    return sorted(chosen)


def _summed(method: str, files: dict[str, str], began: float) -> dict:
    blob = json.dumps(files, sort_keys=True).encode()
    return {"method": method, "sha256": hashlib.sha256(blob).hexdigest(), "files": files,
            "seconds": round(time.perf_counter() - began, 3)}


def pinned_revision(repo: str, revision: str | None):
    """The Hub revision resolved now to the commit it points to (huggingface_hub's ResolvedRevision, a str that
    from_pretrained takes: the tokenizer and the weights then come from that one commit, even if the repository
    moves meanwhile); offline, from the cache's refs. The revision as given where it cannot be resolved (an older
    huggingface_hub, or no network and no cache: the load then says why)."""
    try:
        from huggingface_hub import HfApi, constants

        return HfApi().resolve_revision(repo, revision=revision, local_files_only=bool(constants.HF_HUB_OFFLINE))
    except Exception:  # best effort, as transformers resolves it: the load reports what is wrong
        return revision


def hub_commit(repo: str, revision, model) -> str | None:
    """The commit a Hub model was read at: the pinned revision's, else what an older transformers kept
    (config._commit_hash), else the cache's snapshot of the revision."""
    from huggingface_hub import try_to_load_from_cache

    commit = getattr(revision, "resolved", None) or getattr(model.config, "_commit_hash", None)
    if commit:
        return commit
    found = try_to_load_from_cache(repo, "config.json", revision=revision)
    match = re.search(r"/snapshots/([0-9a-f]{40})/", Path(found).as_posix()) if isinstance(found, str) else None
    return match.group(1) if match else None


def hub_weights(repo: str, commit: str | None) -> dict:
    """A Hub model by the blob ids of its snapshot's files in the Hugging Face cache: a blob is named by its content
    (sha256 for LFS files such as weights, the git blob id for small ones), so nothing is read."""
    from huggingface_hub import try_to_load_from_cache

    began = time.perf_counter()
    found = try_to_load_from_cache(repo, "config.json", revision=commit) if commit else None
    if not isinstance(found, str):
        return {"method": "hub-blobs", "sha256": None, "note": "the model's snapshot is not in the Hugging Face cache"}
    files = {}
    for path in weight_files(str(Path(found).parent)):
        link = os.readlink(path) if path.is_symlink() else None
        files[path.name] = Path(link).name if link else file_sha256(str(path))
    return _summed("hub-blobs", files, began)


def file_weights(path: str) -> tuple[dict, dict[str, list[int]]]:
    """A local directory's weight files, or a GGUF file, by the sha256 of their bytes (remembered by
    files.file_sha256 while a file is unchanged: read once, then only stat'ed); and each file's stat, taken before
    it is hashed, for `check_unchanged` once the model is loaded."""
    began = time.perf_counter()
    paths = weight_files(path) if os.path.isdir(path) else [Path(path)]
    stats = {str(p): file_stat(str(p)) for p in paths}
    return _summed("file-sha256", {p.name: file_sha256(str(p)) for p in paths}, began), stats


def check_unchanged(stats: dict[str, list[int]]) -> None:
    """Refuse a model whose files were written or replaced between their hashing and the end of loading: the
    weights loaded might not be those recorded."""
    for path, before in stats.items():
        try:
            now = file_stat(path)
        except OSError:
            now = None
        if now != before:
            raise UsageError(f"model file {path} changed while it was loaded: the weights loaded may not be the ones "
                             "hashed; load it again once the file stays unchanged")


def parameter_weights(model: torch.nn.Module) -> dict:
    """A model object by the sha256 of each parameter's and buffer's bytes (with its name, dtype and shape; a tied
    tensor once, named where it is tied), hashed in threads (hashlib releases the GIL). Tensors sharded across
    processes or offloaded (meta, DTensor, DeepSpeed) are not in memory here: null, with the reason."""
    began = time.perf_counter()
    tensors, seen, parts = [], {}, []
    for name, t in model.state_dict(keep_vars=True).items():
        if t.is_meta or type(t).__name__ == "DTensor" or hasattr(t, "ds_id"):
            return {"method": "parameters-sha256", "sha256": None,
                    "note": f"{name} is not held in this process's memory (sharded or offloaded): not fingerprinted"}
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            parts.append((name, seen[key]))
        else:
            seen[key] = name
            tensors.append((name, t.detach()))

    def digest(item: tuple[str, torch.Tensor]) -> list[str]:
        name, t = item
        h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)} ".encode())
        h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy for a CPU tensor
        return [name, h.hexdigest()]

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = list(pool.map(digest, tensors))
    blob = json.dumps([*digests, *(f"{name} = {first}" for name, first in parts)]).encode()
    return {"method": "parameters-sha256", "sha256": hashlib.sha256(blob).hexdigest(), "tensors": len(digests),
            "seconds": round(time.perf_counter() - began, 3)}


SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


def tokenizer_fingerprint(tokenizer) -> dict:
    """The tokenizer by what decides its ids: a fast tokenizer's serialized form (vocabulary, merges, normalizer,
    pre-tokenizer, post-processor, added tokens), a slow one's vocabulary, merges and sentencepiece model; then
    the special tokens and their ids and the add_bos/add_eos settings. Its class is recorded, not hashed (the same
    tokenizer loads as another class under another transformers version)."""
    began = time.perf_counter()
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
        digest.update(json.dumps(vocab, ensure_ascii=False).encode())
        ranks = getattr(tokenizer, "bpe_ranks", None)
        if ranks:
            digest.update(json.dumps(sorted(([*k], v) for k, v in ranks.items()), ensure_ascii=False).encode())
        sp_model = getattr(tokenizer, "sp_model", None)
        if sp_model is not None and hasattr(sp_model, "serialized_model_proto"):
            digest.update(sp_model.serialized_model_proto())
    settings = {name: [getattr(tokenizer, name, None), getattr(tokenizer, f"{name}_id", None)] for name in SPECIAL}
    settings.update({k: getattr(tokenizer, k, None) for k in ("add_bos_token", "add_eos_token")})
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return {"sha256": digest.hexdigest(), "class": type(tokenizer).__name__, "fast": backend is not None,
            "size": len(tokenizer), "seconds": round(time.perf_counter() - began, 3)}
