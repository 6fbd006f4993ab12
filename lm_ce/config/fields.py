"""The experiment: one flat dataclass of fields, their choices, and the protocol defaults under them.

A config file is a complete, reproducible experiment. The config layer stacks one way: errors -> config
(the fields) -> values (typed values of fields) -> checks (settings that cannot work together) -> overrides
(YAML, flags, keyword settings and suite entries) -> suite (running a suite).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lm_ce.config.protocols import DEFAULT, DETOKENIZERS, PROTOCOLS, protocol_values
from lm_ce.errors import UsageError

GROUPS = ("model", "data", "windows", "analysis", "task", "output", "placement", "suite")  # --help's sections, in order


def option(default, group: str, help: str):
    """A config field with its group and one-line help: the source of `--help` and of the docs' field table."""
    if group not in GROUPS:
        raise ValueError(f"config field group {group!r} is none of {GROUPS}")
    return dataclasses.field(default=default, metadata={"group": group, "help": help})


@dataclass
class Config:
    model: str = option("gpt2", "model", "Hub id, local directory, local .gguf file, or pkg:<module>/<file>")
    revision: str | None = option(None, "model", "Hub revision (branch, tag or commit) of the model")
    dtype: str = option("auto", "model", "auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16")
    trust_remote_code: bool = option(False, "model", "run the model's own code from the Hub (only for models you trust)")
    gguf_cache: bool = option(True, "model", "cache dequantized GGUF weights, keyed by the file's content hash")
    compile: bool = option(False, "model", "torch.compile the model body (pays on long runs)")
    attn_implementation: str | None = option(None, "model", "attention kernel: eager | sdpa | flex_attention | "
                                                            "flash_attention_2 | ... | a Hub kernel (org/repo) "
                                                            "(default: transformers' choice for the architecture)")
    threads: int | None = option(None, "model", "torch intra-op threads per process (default: cores / processes)")
    # placement of a model larger than one device
    device_map: str | dict | None = option(None, "placement", "auto | balanced | balanced_low_0 | sequential | "
                                                              "module=device pairs (device: 0, 1, ..., cpu or disk)")
    max_memory: dict | None = option(None, "placement", "memory per device for --device-map, e.g. 0=20GiB,cpu=64GiB "
                                                        "(YAML: {0: 20GiB, cpu: 64GiB})")
    offload_folder: str | None = option(None, "placement", "where weights mapped to disk are kept "
                                                           "(default: a temporary folder)")
    dataset: str = option("wikitext", "data", "Hub dataset, or a datasets builder (json, csv, text, parquet) "
                                              "for --data-files")
    dataset_config: str | None = option("wikitext-2-raw-v1", "data", "the Hub dataset's configuration (subset)")
    split: str = option("test", "data", "the dataset split scored")
    dataset_revision: str | None = option(None, "data", "Hub revision (branch, tag or commit) of the dataset; the "
                                                        "commit read is recorded (data.resolved_revision)")
    data_files: list[str] | None = option(None, "data", "local files (a.jsonl,b.jsonl); the builder follows "
                                                        "their extension")
    text_field: str = option("text", "data", "the field holding each document's text")
    prompt_field: str | None = option(None, "data", "tokens of this field are context only (conditional scoring)")
    group_field: str | None = option(None, "data", "report one row per value of this field")
    id_field: str | None = option(None, "data", "names each document in documents.jsonl")
    join_by: list[str] | None = option(None, "data", "consecutive rows with equal values of these fields form "
                                                     "one document")
    streaming: bool = option(False, "data", "read the dataset as a stream instead of downloading it whole")
    data_cache: str = option("default", "data", "default | output | off: where datasets keeps its Arrow copy "
                                                "of the data")
    limit: int | None = option(None, "data", "score only the first N documents")
    protocol: str = option("lm-eval", "windows", "lm-eval | lm-eval-wikitext | hf-docs | llama-cpp | gptq | "
                                                 "llama-cpp-hellaswag | llama-cpp-winogrande: sets the window fields "
                                                 "(fields given explicitly win)")
    mode: str = option("document", "windows", "document | stream | llama-cpp | gptq")
    max_length: int | None = option(None, "windows", "input tokens per window (default: the model's positions, "
                                                     "at most 2048)")
    stride: int | None = option(None, "windows", "new tokens scored per later window (default: max_length)")
    prefix_token: str = option("auto", "windows", "auto | bos | eos | none (auto: bos, else eos, in document "
                                                  "mode; none in stream mode)")
    separator: str = option("\n\n", "windows", "joins documents in stream, llama-cpp and gptq modes")
    bos_policy: str = option("first", "windows", "first | every-window | none: where the prefix token goes "
                                                 "(document and stream modes)")
    chunks: int | None = option(None, "windows", "llama-cpp and gptq modes: score at most this many chunks")
    detokenizer: str = option("none", "windows", "none | wikitext: undo WikiText's tokenization before scoring "
                                                 "(lm-eval's wikitext task)")
    batch_size: int = option(8, "windows", "windows per batch at most")
    token_budget: int | None = option(None, "windows", "input tokens per batch at most (default: batch_size * "
                                                       "max_length, at most 4096 on CPU)")
    padding_side: str = option("right", "windows", "right | left (must not change the result)")
    chunk_documents: int = option(1024, "windows", "documents tokenized and planned at a time (bounds memory)")
    shard: str | None = option(None, "data", "K/N (K from 0): score every N-th chunk of documents from chunk K, "
                                             "for lm-ce merge; auto: from Slurm's array task id and count")
    compare_to: list[str] | None = option(None, "analysis", "other models scored against the first on the same "
                                                            "data (KL, top-1, delta perplexity)")
    save_tokens: bool = option(False, "analysis", "save every scored token's id, text, position, NLL and top-1 "
                                                  "(tokens.parquet)")
    byte_classes: list[str] | None = option(None, "analysis", "NAME=REGEX classes of bytes for the byte-level comparison "
                                                             "with a --compare-to model of another tokenizer, before "
                                                             "the built-in ones (a regex with a comma: in a config "
                                                             "file)")
    context_curve: list[int] | None = option(None, "analysis", "context lengths, increasing (128,256,512): the same "
                                                               "targets scored with each (context_curve.png)")
    context_curve_divisor: int = option(4, "analysis", "--context-curve windows of length L advance by L/N tokens: "
                                                       "each target sees L - L/N + 1 to L tokens of context, "
                                                       "N input tokens read per target")
    min_k: float | None = option(None, "analysis", "K in (0, 1], e.g. 0.2: add membership signals to each document "
                                                   "row (min_k, min_k_plus_plus, zlib_ratio over its lowest K of tokens)")
    longppl_evaluator: str | None = option(None, "analysis", "self, or a model (as --model): adds LongPPL, the "
                                                             "perplexity over the tokens that need long context")
    longppl_short: int = option(4096, "analysis", "LongPPL's short context: a target is scored again with this many "
                                                  "tokens before it (up to --longppl-step - 1 more)")
    longppl_step: int = option(1024, "analysis", "LongPPL's short-context windows score this many targets each (the "
                                                 "paper's sliding_window; 1: exactly --longppl-short tokens of context)")
    longppl_alpha: float = option(2.0, "analysis", "a LongPPL key token gains more than this from long context: "
                                                   "loss_short - loss_full > alpha")
    longppl_beta: float = option(2.0, "analysis", "a LongPPL key token is predicted with long context: "
                                                  "loss_full < beta")
    task: str = option("perplexity", "task", "perplexity | multiple-choice | surprisal: what is scored (a task other than "
                                             "perplexity: one item or document a row)")
    layout: str = option("generic", "task", "multiple choice: the rows' layout: generic (--context-field, --choices-field, "
                                            "--label-field) | hellaswag | arc | winogrande (their datasets' own rows)")
    context_field: str = option("context", "task", "multiple choice (generic layout): the field of each item's context")
    choices_field: str = option("choices", "task", "multiple choice (generic layout): the field of each item's choices, "
                                                   "a list of strings")
    label_field: str = option("label", "task", "multiple choice (generic layout): the field of the correct choice: its "
                                               "index from 0, its text, or a list of indices")
    choice_delimiter: str = option(" ", "task", "multiple choice: put between the context and each choice (lm-eval's "
                                                "target_delimiter)")
    llama_cpp_quirk: bool = option(True, "task", "--protocol llama-cpp-winogrande: read the second option's first token "
                                                 "from the first option's logits when the tail is short, as llama.cpp "
                                                 "does (--no-llama-cpp-quirk: from its own)")
    words_field: str | None = option(None, "task", "surprisal: the field of each row's words or regions, a list of "
                                                   "strings (default: --text-field split at whitespace)")
    surprisal_unit: str = option("bits", "task", "surprisal: bits | nats")
    bow_correction: bool = option(True, "task", "surprisal: a word's probability includes that a new word starts after "
                                                "it (Pimentel & Meister 2024); --no-bow-correction: plain token sums")
    bow_style: str = option("pm", "task", "surprisal: pm (the paper's package, wordsprobability: the end of the text "
                                          "ends a word, the first word over P(its kind of first token | BOS)) | minicons")
    output_dir: str | None = option(None, "output", "directory of the run's reports and saved progress")
    resume: bool = option(False, "output", "continue the run saved in --output-dir (same model, data and settings)")
    overwrite: bool = option(False, "output", "replace the run in --output-dir: its files are deleted first "
                                              "(files lm_ce did not write are kept)")
    checkpoint_seconds: int = option(300, "output", "save progress to --output-dir this often (and on Ctrl-C "
                                                    "or SIGTERM)")
    plot: bool = option(True, "output", "plot the loss by position in the window (position_loss.png)")
    page: bool = option(True, "output", "write results.html: the figures, the plot and the documents of highest "
                                        "and lowest loss, coloured token by token (one offline file)")
    page_documents: int = option(5, "output", "documents of highest and of lowest mean loss shown in results.html "
                                              "(0: none; document mode)")
    progress: bool = option(True, "output", "show a progress bar")
    seed: int = option(0, "output", "torch's random seed, set before the model loads")
    suite: list[dict] | None = option(None, "suite", "datasets scored one after the other with one model load: "
                                                     "entries {name: ..., any data or window field} "
                                                     "(config files only)")

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
    "task": ("perplexity", "multiple-choice", "surprisal"),
    "layout": ("generic", "hellaswag", "arc", "winogrande"),
    "surprisal_unit": ("bits", "nats"),
    "bow_style": ("pm", "minicons"),
}
# The fields of a row each multiple-choice layout reads (generic: the ones --context-field etc. name).
LAYOUT_FIELDS = {
    "hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    "arc": ("question", "choices", "answerKey"),
    "winogrande": ("sentence", "option1", "option2", "answer"),
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
