"""The settings that cannot work together, refused by name before anything is loaded."""
from __future__ import annotations

import re

from lm_ce.config.fields import CHOICES, Config
from lm_ce.config.protocols import CHOICE_PROTOCOLS, PROTOCOLS
from lm_ce.config.values import MAPPINGS
from lm_ce.errors import UsageError

CHUNK_TOKENS = {"llama-cpp": 3, "gptq": 2}  # the shortest chunk that scores a token (windows.llama_cpp_spans, gptq_spans)


def check(cfg: Config) -> None:
    """Refuse settings that cannot work together, before anything is loaded."""
    for name in CHOICES:
        value = getattr(cfg, name)
        if value not in CHOICES[name]:
            raise UsageError(f"field '{name}' is '{value}'; choose one of {', '.join(CHOICES[name])}")
    for name in ("max_length", "stride", "batch_size", "token_budget", "limit", "chunk_documents", "threads", "checkpoint_seconds", "chunks",
                 "context_curve_divisor", "longppl_short", "longppl_step"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if cfg.page_documents < 0:
        raise UsageError(f"--page-documents must be 0 or more, got {cfg.page_documents}")
    if cfg.max_length and cfg.stride and cfg.stride > cfg.max_length:
        raise UsageError(
            f"--stride {cfg.stride} is larger than --max-length {cfg.max_length}: tokens between windows "
            "would never be scored; use a stride at most max_length"
        )
    if cfg.shard is not None and not valid_shard(cfg.shard):
        raise UsageError(f"--shard {cfg.shard}: give K/N with 0 <= K < N (e.g. 0/4), or auto (from "
                         "SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT)")
    if cfg.shard is not None and cfg.mode != "document":
        by = f", set by --protocol {cfg.protocol}" if PROTOCOLS[cfg.protocol].fields.get("mode") == cfg.mode else ""
        raise UsageError(f"--shard cuts the documents into chunks, which needs --mode document; --mode is {cfg.mode}"
                         f"{by} (a joined text cannot be cut into shards): give --mode document, or drop --shard")
    if cfg.min_k is not None and not (0 < cfg.min_k <= 1 and cfg.mode == "document"):
        raise UsageError(f"--min-k {cfg.min_k}: give the fraction K of each document's lowest tokens, 0 < K <= 1 "
                         f"(e.g. 0.2), in --mode document (the signals are per document; --mode is {cfg.mode})")
    if cfg.longppl_evaluator is not None:
        check_longppl(cfg)
    if cfg.resume and not cfg.output_dir:
        raise UsageError("--resume needs --output-dir: the directory of the run to continue")
    if cfg.data_cache == "output" and not cfg.output_dir:
        raise UsageError("--data-cache output keeps the data's Arrow copy in --output-dir: give --output-dir, or use off")
    for name, parse in MAPPINGS.items():
        parse(getattr(cfg, name), f"field '{name}'", "config")
    if cfg.max_memory and not cfg.device_map:
        raise UsageError("--max-memory needs --device-map (auto, balanced, balanced_low_0 or sequential) to place the model")
    if cfg.overwrite and not cfg.output_dir:
        raise UsageError("--overwrite needs --output-dir: the directory whose run is replaced")
    if cfg.overwrite and cfg.resume:
        raise UsageError("--overwrite and --resume contradict each other: --resume continues the saved run, "
                         "--overwrite deletes it; choose one")
    if not (cfg.model or "").strip():
        raise UsageError("--model is empty: give a Hub id, a local directory, a .gguf file or pkg:<module>/<file>")
    if cfg.output_dir == "":  # `--output-dir ""`: without this nothing would be written, silently
        raise UsageError("--output-dir is empty: give a directory (created if missing), or leave it out to write "
                         "no files")
    twice = sorted({name for name in cfg.compare_to or [] if cfg.compare_to.count(name) > 1})
    if twice:
        raise UsageError(f"--compare-to names {', '.join(twice)} more than once; give each model once")
    if cfg.dataset_revision is not None and cfg.data_files:
        raise UsageError(f"--dataset-revision {cfg.dataset_revision} names a revision of a Hub dataset; --data-files "
                         "have none (their content is hashed and recorded): drop --dataset-revision")
    if cfg.data_files == []:  # `--data-files ""`: without this the default Hub dataset would be scored
        raise UsageError("--data-files is empty: give one or more files (--data-files a.jsonl,b.jsonl), "
                         "or leave it out to score --dataset")
    if cfg.mode == "stream" and cfg.max_length == 1:
        raise UsageError("--mode stream --max-length 1 scores nothing: a stream window's first token is only "
                         "context, so a window needs 2 tokens or more; use --max-length 2 or more")
    if cfg.mode in CHUNK_TOKENS and cfg.max_length is not None and cfg.max_length < CHUNK_TOKENS[cfg.mode]:
        least = CHUNK_TOKENS[cfg.mode]
        why = ("llama-cpp scores only the tokens after the middle of each chunk" if cfg.mode == "llama-cpp"
               else "a chunk's first token is only context")
        raise UsageError(f"--mode {cfg.mode} --max-length {cfg.max_length} scores nothing: {why}, so a chunk needs "
                         f"{least} tokens or more; use --max-length {least} or more")
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
    check_context_curve(cfg)
    check_task(cfg)


# What a task other than perplexity cannot do: (field, value that is refused, why)
TASK_REFUSES = (("compare_to", None, "score each model with its own --output-dir, then lm-ce compare pairs them item by item"),
                ("save_tokens", False, "its per-item or per-word figures are in documents.jsonl and words.parquet"),
                ("context_curve", None, "it scores each item or document as one sequence"),
                ("min_k", None, "membership signals are per perplexity document"),
                ("longppl_evaluator", None, "LongPPL is a perplexity figure"),
                ("prompt_field", None, "the task says which tokens are scored"),
                ("join_by", None, "each row is one item or document"))


def check_task(cfg: Config) -> None:
    """--task multiple-choice and surprisal: document mode, their own protocols, and none of the perplexity analyses."""
    if cfg.task == "perplexity":
        if cfg.protocol.startswith("llama-cpp-"):
            raise UsageError(f"--protocol {cfg.protocol} scores multiple-choice items: give --task multiple-choice "
                             "(or leave --task out)")
        if cfg.words_field is not None:
            raise UsageError("--words-field is read by --task surprisal; add --task surprisal, or drop --words-field")
        return
    task = f"--task {cfg.task}"
    allowed = CHOICE_PROTOCOLS if cfg.task == "multiple-choice" else ("lm-eval",)
    if cfg.protocol not in allowed:
        raise UsageError(f"{task} --protocol {cfg.protocol}: " + (f"choose one of {', '.join(allowed)}" if len(allowed) > 1
                         else "surprisal has one definition; drop --protocol"))
    if cfg.mode != "document":
        raise UsageError(f"{task} scores one item or document a row, in --mode document (--mode is {cfg.mode})")
    for name, off, why in TASK_REFUSES:
        if getattr(cfg, name) not in (off, []):
            raise UsageError(f"{task} does not take --{name.replace('_', '-')}: {why}")
    if cfg.detokenizer != "none":
        raise UsageError(f"{task} scores the texts as given: drop --detokenizer")
    if cfg.task == "multiple-choice":
        if (cfg.protocol == "llama-cpp-winogrande") != (cfg.layout == "winogrande") and cfg.protocol != "lm-eval":
            raise UsageError(f"--protocol {cfg.protocol} with --layout {cfg.layout}: llama-cpp-winogrande scores "
                             "Winogrande rows (--layout winogrande), llama-cpp-hellaswag the other layouts")
        if cfg.words_field is not None:
            raise UsageError("--words-field is read by --task surprisal, not multiple-choice; drop it")
        return
    if cfg.prefix_token == "none" or cfg.bos_policy == "none":
        raise UsageError(f"{task} conditions the first word on a prefix token (BOS, else EOS): drop --prefix-token none "
                         "and --bos-policy none")


def check_context_curve(cfg: Config) -> None:
    """--context-curve: increasing lengths of at least 1 (2 in stream mode), in document or stream mode."""
    lengths = cfg.context_curve
    if lengths is None:
        return
    shown = ",".join(map(str, lengths))
    least = 2 if cfg.mode == "stream" else 1
    if not lengths:
        raise UsageError("--context-curve is empty: give increasing context lengths, e.g. --context-curve 128,256,512")
    if lengths[0] < least or any(b <= a for a, b in zip(lengths, lengths[1:])):
        raise UsageError(f"--context-curve {shown}: give strictly increasing lengths of at least {least}, "
                         "e.g. --context-curve 128,256,512")
    if cfg.mode not in ("document", "stream"):
        raise UsageError(f"--context-curve scores document or stream windows; --mode {cfg.mode} cuts fixed chunks "
                         "(use --mode document or stream)")


def valid_shard(shard: str) -> bool:
    """Whether --shard is `auto` or K/N with 0 <= K < N (ASCII digits)."""
    if shard == "auto":
        return True
    match = re.fullmatch(r"([0-9]+)/([0-9]+)", shard)
    return match is not None and int(match[1]) < int(match[2])


def check_longppl(cfg: Config) -> None:
    """LongPPL is per document, and maps another tokenizer's tokens through the text alone (no prompt)."""
    if not cfg.longppl_evaluator.strip():
        raise UsageError("--longppl-evaluator is empty: give self, or a model (Hub id, directory, .gguf file)")
    if cfg.mode != "document":
        raise UsageError(f"--longppl-evaluator works per document, in --mode document (--mode is {cfg.mode})")
    if cfg.prompt_field and cfg.longppl_evaluator != "self":
        raise UsageError("--longppl-evaluator with --prompt-field: only self (another model's tokens are mapped "
                         "through the text alone, without the prompt); use --longppl-evaluator self")
