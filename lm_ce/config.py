"""The experiment: one flat dataclass of fields, their choices, and the protocol defaults under them.

A config file is a complete, reproducible experiment. The config layer stacks one way: errors -> config
(the fields) -> values (typed values of fields) -> checks (settings that cannot work together) -> overrides
(YAML, flags, keyword settings and suite entries) -> suite (running a suite).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .errors import SharedUsageError, UsageError, first_line  # noqa: F401 (also importable from here, as before)
from .protocols import DEFAULT, DETOKENIZERS, PROTOCOLS, protocol_values


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
