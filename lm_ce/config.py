"""The experiment: one flat dataclass, and the checks that refuse settings which cannot work together.

A config file is a complete, reproducible experiment; overrides.py reads it from YAML, the command
line or keyword settings.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from .protocols import DEFAULT, DETOKENIZERS, PROTOCOLS, protocol_values


class UsageError(Exception):
    """Bad input: the message says what is wrong and what to do. The CLI prints it and exits 2."""


class SharedUsageError(UsageError):
    """A UsageError the main process found and told every process of the run: the CLI prints it once."""


def first_line(e: BaseException) -> str:
    """An exception's message on one line (libraries spread theirs over several), short enough for a one-line error."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text[:300] if text else type(e).__name__


@dataclass
class Config:
    # model
    model: str = "gpt2"  # Hub id, local directory, local .gguf file, or pkg:<module>/<file>
    revision: str | None = None
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16
    trust_remote_code: bool = False
    gguf_cache: bool = True  # cache dequantized GGUF weights, keyed by the file's content hash
    compile: bool = False  # torch.compile the model body (pays on long runs, see README)
    threads: int | None = None  # torch intra-op threads per process (default: cores / processes)
    # placement of a model larger than one device (README: "A model that does not fit")
    device_map: str | dict | None = None  # auto | balanced | balanced_low_0 | sequential | {module: 0 | cpu | disk}
    max_memory: dict | None = None  # {0: 20GiB, cpu: 64GiB}; on the command line 0=20GiB,cpu=64GiB
    offload_folder: str | None = None  # where weights mapped to disk are kept (default: a temporary folder)
    # data
    dataset: str = "wikitext"  # Hub dataset, or a datasets builder (json, csv, text, parquet); <memory>: rows in memory
    dataset_config: str | None = "wikitext-2-raw-v1"
    split: str = "test"
    data_files: list[str] | None = None  # local files; the builder follows their extension
    text_field: str = "text"
    prompt_field: str | None = None  # tokens of this field are context only (conditional scoring)
    group_field: str | None = None  # report one row per value of this field
    id_field: str | None = None  # names each document in documents.jsonl
    join_by: list[str] | None = None  # consecutive rows with equal values of these fields form one document
    streaming: bool = False
    data_cache: str = "default"  # default | output | off: where datasets keeps its Arrow copy of the data (README)
    limit: int | None = None  # the first N documents
    # windows
    protocol: str = "lm-eval"  # lm-eval | lm-eval-wikitext | hf-docs | llama-cpp | gptq: sets the fields below (see README)
    mode: str = "document"  # document | stream | llama-cpp | gptq
    max_length: int | None = None  # input tokens per window (default: the model's positions, at most 2048)
    stride: int | None = None  # new tokens scored per later window (default: max_length)
    prefix_token: str = "auto"  # auto | bos | eos | none (auto: bos, else eos, in document mode; none in stream mode)
    separator: str = "\n\n"  # joins documents in stream, llama-cpp and gptq modes
    bos_policy: str = "first"  # first | every-window | none: where the prefix token goes (document and stream modes)
    chunks: int | None = None  # llama-cpp and gptq modes: score at most this many chunks
    detokenizer: str = "none"  # none | wikitext: undo WikiText's tokenization before scoring (lm-eval's wikitext task)
    batch_size: int = 8  # windows per batch at most
    token_budget: int | None = None  # input tokens per batch at most (default: batch_size * max_length, at most 4096 on CPU)
    padding_side: str = "right"  # right | left; must not change the result
    chunk_documents: int = 1024  # documents tokenized and planned at a time (bounds memory)
    shard: str | None = None  # K/N (K from 0): score every N-th chunk of documents from chunk K; auto: from Slurm's array
    # analysis
    compare_to: list[str] | None = None  # models scored on the same tokens against the first (KL, top-1, delta ppl)
    save_tokens: bool = False  # tokens.parquet-style files: every scored token's id, text, position, NLL, top-1
    # output
    output_dir: str | None = None
    resume: bool = False  # continue the run saved in output_dir (same model, data and settings)
    overwrite: bool = False  # replace the run in output_dir: its files are deleted first (files lm_ce did not write are kept)
    checkpoint_seconds: int = 300  # save progress to output_dir this often (and on Ctrl-C / SIGTERM)
    plot: bool = True  # loss by position in the window as a PNG (position_loss.png)
    progress: bool = True
    seed: int = 0
    # suites: datasets scored one after the other with one model load (config files only; see README)
    suite: list[dict] | None = None  # entries: {name: ..., any data or window field: ...}

    def resolved(self) -> dict:
        """The config as plain data, written next to the results so any run can be repeated."""
        return dataclasses.asdict(self)


CHOICES = {
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "protocol": tuple(PROTOCOLS),
    "mode": ("document", "stream", "llama-cpp", "gptq"),
    "bos_policy": ("first", "every-window", "none"),
    "detokenizer": tuple(DETOKENIZERS),
    "prefix_token": ("auto", "bos", "eos", "none"),
    "padding_side": ("right", "left"),
    "data_cache": ("default", "output", "off"),
}
FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def with_protocol(values: dict) -> dict:
    """The fields given explicitly, over those their protocol sets (lm-eval when none is named)."""
    return {**protocol_values(values.get("protocol", DEFAULT)), **values}


def check(cfg: Config) -> None:
    """Refuse settings that cannot work together, before anything is loaded."""
    for name in CHOICES:
        value = getattr(cfg, name)
        if value not in CHOICES[name]:
            raise UsageError(f"field '{name}' is '{value}'; choose one of {', '.join(CHOICES[name])}")
    for name in ("max_length", "stride", "batch_size", "token_budget", "limit", "chunk_documents", "threads", "checkpoint_seconds", "chunks"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if cfg.max_length and cfg.stride and cfg.stride > cfg.max_length:
        raise UsageError(
            f"--stride {cfg.stride} is larger than --max-length {cfg.max_length}: tokens between windows "
            "would never be scored; use a stride at most max_length"
        )
    if cfg.shard is not None and (cfg.mode != "document" or not re.fullmatch(r"auto|\d+/\d+", cfg.shard)
                                  or cfg.shard != "auto" and not int(cfg.shard.split("/")[0]) < int(cfg.shard.split("/")[1])):
        raise UsageError(f"--shard {cfg.shard}: give K/N with 0 <= K < N (or auto, from SLURM_ARRAY_TASK_ID and "
                         "SLURM_ARRAY_TASK_COUNT), in --mode document")
    if cfg.resume and not cfg.output_dir:
        raise UsageError("--resume needs --output-dir: the directory of the run to continue")
    if cfg.data_cache == "output" and not cfg.output_dir:
        raise UsageError("--data-cache output keeps the data's Arrow copy in --output-dir: give --output-dir, or use off")
    from .overrides import MAPPINGS  # overrides builds on this module

    for name, parse in MAPPINGS.items():
        parse(getattr(cfg, name), f"field '{name}'", "config")
    if cfg.max_memory and not cfg.device_map:
        raise UsageError("--max-memory needs --device-map (auto, balanced, balanced_low_0 or sequential) to place the model")
    if cfg.overwrite and not cfg.output_dir:
        raise UsageError("--overwrite needs --output-dir: the directory whose run is replaced")
    if cfg.overwrite and cfg.resume:
        raise UsageError("--overwrite and --resume contradict each other: --resume continues the saved run, "
                         "--overwrite deletes it; choose one")
    if cfg.data_files == []:  # `--data-files ""`: without this the default Hub dataset would be scored
        raise UsageError("--data-files is empty: give one or more files (--data-files a.jsonl,b.jsonl), "
                         "or leave it out to score --dataset")
    if cfg.mode == "stream" and cfg.max_length == 1:
        raise UsageError("--mode stream --max-length 1 scores nothing: a stream window's first token is only "
                         "context, so a window needs 2 tokens or more; use --max-length 2 or more")
    if cfg.prompt_field and cfg.mode != "document":
        raise UsageError(f"--prompt-field needs --mode document: a joined text ({cfg.mode}) has no per-document prompt")
    chunked = cfg.mode in ("llama-cpp", "gptq")
    if cfg.chunks is not None and not chunked:
        raise UsageError(f"--chunks counts llama-cpp or gptq chunks; --mode {cfg.mode} has none (drop --chunks)")
    if chunked and cfg.stride is not None:
        raise UsageError(f"--mode {cfg.mode} cuts non-overlapping chunks and takes no --stride; drop --stride")
    if chunked and cfg.bos_policy != "first":
        raise UsageError(f"--bos-policy applies to document and stream windows; --mode {cfg.mode} places BOS as "
                         "the tokenizer does; drop --bos-policy")
    if cfg.bos_policy == "none" and cfg.prefix_token in ("bos", "eos"):
        raise UsageError(f"--bos-policy none and --prefix-token {cfg.prefix_token} contradict; give one of them")
    if cfg.bos_policy == "every-window" and cfg.prefix_token == "none":
        raise UsageError("--bos-policy every-window puts the prefix token in every window; it needs --prefix-token "
                         "auto, bos or eos, not none")


def resolve_path(spec: str) -> str:
    """A path as given, or for `pkg:<module>/<file>` the file inside that installed package."""
    if not spec.startswith("pkg:"):
        return spec
    module, _, rel = spec[4:].partition("/")
    import importlib.util

    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise UsageError(
            f"{spec}: Python package '{module}' is not installed; install the package that ships it "
            "(see the README's first command)"
        )
    return str(Path(list(found.submodule_search_locations)[0]) / rel)
