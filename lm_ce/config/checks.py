"""The settings that cannot work together, refused by name before anything is loaded."""
from __future__ import annotations

import re

from lm_ce.config.fields import CHOICES, Config
from lm_ce.config.protocols import CHOICE_PROTOCOLS, PROTOCOLS
from lm_ce.config.values import Words, note, noted

CHUNK_TOKENS = {"llama-cpp": 3, "gptq": 2}  # the shortest chunk that scores a token (windows.llama_cpp_spans, gptq_spans)


def check(cfg: Config, words: Words | None = None) -> None:
    """Refuse settings that cannot work together, before anything is loaded, in the words of the settings' source
    (`--stride` on the command line, `stride` in a file or in Python); a Config that passed is marked checked."""
    w = words or Words()
    for name in CHOICES:
        value = getattr(cfg, name)
        if value not in CHOICES[name]:
            raise w.error(f"field '{name}' is '{value}'; choose one of {', '.join(CHOICES[name])}")
    for name in ("max_length", "stride", "batch_size", "token_budget", "limit", "chunk_documents", "threads", "checkpoint_seconds", "chunks",
                 "context_curve_divisor", "longppl_short", "longppl_step"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise w.error(f"{w(name)} must be at least 1, got {value}")
    if cfg.page_documents < 0:
        raise w.error(f"{w('page_documents')} must be 0 or more, got {cfg.page_documents}")
    if cfg.max_length and cfg.stride and cfg.stride > cfg.max_length:
        raise w.error(
            f"{w('stride', cfg.stride)} is larger than {w('max_length', cfg.max_length)}: tokens between windows "
            "would never be scored; use a stride at most max_length"
        )
    if cfg.shard is not None and not valid_shard(cfg.shard):
        raise w.error(f"{w('shard', cfg.shard)}: give K/N with 0 <= K < N (e.g. 0/4), or auto (from "
                      "SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT)")
    if cfg.shard is not None and cfg.mode != "document":
        raise w.error(f"{w('shard')} cuts the documents into chunks, which needs {w('mode', 'document')}; "
                      f"{w('mode')} is {cfg.mode}{set_by(cfg, 'mode', w)} (a joined text cannot be cut into shards): "
                      f"give {w('mode', 'document')}, or drop {w('shard')}")
    if cfg.min_k is not None and not (0 < cfg.min_k <= 1 and cfg.mode == "document"):
        raise w.error(f"{w('min_k', cfg.min_k)}: give the fraction K of each document's lowest tokens, 0 < K <= 1 "
                      f"(e.g. 0.2), in {w('mode', 'document')} (the signals are per document; {w('mode')} is "
                      f"{cfg.mode})")
    if cfg.longppl_evaluator is not None:
        check_longppl(cfg, w)
    check_output(cfg, w)
    if cfg.max_memory and not cfg.device_map:
        raise w.error(f"{w('max_memory')} needs {w('device_map')} (auto, balanced, balanced_low_0 or sequential) to "
                      "place the model")
    if not (cfg.model or "").strip():
        raise w.error(f"{w('model')} is empty: give a Hub id, a local directory, a .gguf file or pkg:<module>/<file>")
    twice = sorted({name for name in cfg.compare_to or [] if cfg.compare_to.count(name) > 1})
    if twice:
        raise w.error(f"{w('compare_to')} names {', '.join(twice)} more than once; give each model once")
    if cfg.dataset_revision is not None and cfg.data_files:
        raise w.error(f"{w('dataset_revision', cfg.dataset_revision)} names a revision of a Hub dataset; "
                      f"{w('data_files')} have none (their content is hashed and recorded): drop "
                      f"{w('dataset_revision')}")
    if cfg.data_files == []:  # `--data-files ""`: without this the default Hub dataset would be scored
        raise w.error(f"{w('data_files')} is empty: give one or more files ({w('data_files', ['a.jsonl', 'b.jsonl'])}),"
                      f" or leave it out to score {w('dataset')}")
    check_windows(cfg, w)
    check_context_curve(cfg, w)
    check_task(cfg, w)
    note(cfg, checked=True)


def checked(cfg: Config) -> Config:
    """The Config, checked unless a source's constructor already checked it (each rule runs once)."""
    if not noted(cfg, "checked"):
        check(cfg)
    return cfg


def check_positions(cfg: Config, positions: int | None, words: Words | None = None) -> None:
    """Once the model is loaded (before anything is scored): the window, its stride and the context curve's longest
    length fit in the model's positions (a suite checks every entry, each named with the protocol that set a value)."""
    w = words or Words()
    max_length = cfg.max_length or min(positions or 2048, 2048)
    if positions and max_length > positions:
        by = set_by(cfg, "max_length", w)
        raise w.error(f"{w('max_length', max_length)}{by}{',' if by else ''} is beyond the model's {positions} "
                      f"positions; use {w('max_length', positions)} or less")
    if cfg.stride and cfg.stride > max_length:
        raise w.error(f"{w('stride', cfg.stride)} is larger than {w('max_length', max_length)} (the model's "
                      "default); use a stride at most max_length")
    if cfg.context_curve and positions and cfg.context_curve[-1] > positions:
        raise w.error(f"{w('context_curve', cfg.context_curve)}: {cfg.context_curve[-1]} is beyond the model's "
                      f"{positions} positions; use lengths of at most {positions}")


def set_by(cfg: Config, name: str, w: Words) -> str:
    """', set by --protocol X' when field `name` has the value its protocol sets and was not given explicitly."""
    if name in w.given or PROTOCOLS[cfg.protocol].fields.get(name, object()) != getattr(cfg, name):
        return ""
    return f", set by {w('protocol', cfg.protocol)}"


def check_output(cfg: Config, w: Words) -> None:
    """--resume, --overwrite and --data-cache output need --output-dir; --overwrite and --resume exclude each other."""
    if cfg.resume and not cfg.output_dir:
        raise w.error(f"{w('resume')} needs {w('output_dir')}: the directory of the run to continue")
    if cfg.data_cache == "output" and not cfg.output_dir:
        raise w.error(f"{w('data_cache', 'output')} keeps the data's Arrow copy in {w('output_dir')}: give "
                      f"{w('output_dir')}, or use off")
    if cfg.overwrite and not cfg.output_dir:
        raise w.error(f"{w('overwrite')} needs {w('output_dir')}: the directory whose run is replaced")
    if cfg.overwrite and cfg.resume:
        raise w.error(f"{w('overwrite')} and {w('resume')} contradict each other: {w('resume')} continues the saved "
                      f"run, {w('overwrite')} deletes it; choose one")
    if cfg.output_dir == "":  # `--output-dir ""`: without this nothing would be written, silently
        raise w.error(f"{w('output_dir')} is empty: give a directory (created if missing), or leave it out to write "
                      "no files")


def check_windows(cfg: Config, w: Words) -> None:
    """Windows that score nothing, and window fields that the mode does not take."""
    if cfg.mode == "stream" and cfg.max_length == 1:
        raise w.error(f"{w('mode', 'stream')} {w('max_length', 1)} scores nothing: a stream window's first token is "
                      f"only context, so a window needs 2 tokens or more; use {w('max_length', 2)} or more")
    if cfg.mode in CHUNK_TOKENS and cfg.max_length is not None and cfg.max_length < CHUNK_TOKENS[cfg.mode]:
        least = CHUNK_TOKENS[cfg.mode]
        why = ("llama-cpp scores only the tokens after the middle of each chunk" if cfg.mode == "llama-cpp"
               else "a chunk's first token is only context")
        raise w.error(f"{w('mode', cfg.mode)} {w('max_length', cfg.max_length)} scores nothing: {why}, so a chunk "
                      f"needs {least} tokens or more; use {w('max_length', least)} or more")
    if cfg.prompt_field and cfg.mode != "document":
        raise w.error(f"{w('prompt_field')} needs {w('mode', 'document')}: a joined text ({cfg.mode}) has no "
                      "per-document prompt")
    chunked = cfg.mode in ("llama-cpp", "gptq")
    if cfg.chunks is not None and not chunked:
        raise w.error(f"{w('chunks')} counts llama-cpp or gptq chunks; {w('mode', cfg.mode)} has none (drop "
                      f"{w('chunks')})")
    if chunked and cfg.stride is not None:
        by = set_by(cfg, "mode", w)
        raise w.error(f"{w('mode', cfg.mode)}{by}{',' if by else ''} cuts non-overlapping chunks and takes no "
                      f"{w('stride')}; drop {w('stride')}")
    if chunked and cfg.bos_policy != "first":
        raise w.error(f"{w('bos_policy')} applies to document and stream windows; {w('mode', cfg.mode)} places BOS "
                      f"as the tokenizer does; drop {w('bos_policy')}")
    if cfg.bos_policy == "none" and cfg.prefix_token in ("bos", "eos"):
        raise w.error(f"{w('bos_policy', 'none')} and {w('prefix_token', cfg.prefix_token)} contradict; give one of "
                      "them")
    if cfg.bos_policy == "every-window" and cfg.prefix_token == "none":
        raise w.error(f"{w('bos_policy', 'every-window')} puts the prefix token in every window; it needs "
                      f"{w('prefix_token')} auto, bos or eos, not none")


# What a task other than perplexity cannot do: (field, value that is refused, why)
TASK_REFUSES = (("compare_to", None, "score each model with its own {output_dir}, then lm-ce compare pairs them item by item"),
                ("save_tokens", False, "its per-item or per-word figures are in documents.jsonl and words.parquet"),
                ("context_curve", None, "it scores each item or document as one sequence"),
                ("min_k", None, "membership signals are per perplexity document"),
                ("longppl_evaluator", None, "LongPPL is a perplexity figure"),
                ("prompt_field", None, "the task says which tokens are scored"),
                ("join_by", None, "each row is one item or document"))


def check_task(cfg: Config, w: Words | None = None) -> None:
    """--task multiple-choice and surprisal: document mode, their own protocols, and none of the perplexity analyses."""
    w = w or Words()
    if cfg.task == "perplexity":
        if cfg.protocol.startswith("llama-cpp-"):
            raise w.error(f"{w('protocol', cfg.protocol)} scores multiple-choice items: give "
                          f"{w('task', 'multiple-choice')} (or leave {w('task')} out)")
        if cfg.words_field is not None:
            raise w.error(f"{w('words_field')} is read by {w('task', 'surprisal')}; add {w('task', 'surprisal')}, or "
                          f"drop {w('words_field')}")
        return
    task = w("task", cfg.task)
    allowed = CHOICE_PROTOCOLS if cfg.task == "multiple-choice" else ("lm-eval",)
    if cfg.protocol not in allowed:
        raise w.error(f"{task} {w('protocol', cfg.protocol)}: " + (
            f"choose one of {', '.join(allowed)}" if len(allowed) > 1
            else f"surprisal has one definition; drop {w('protocol')}"))
    if cfg.mode != "document":
        raise w.error(f"{task} scores one item or document a row, in {w('mode', 'document')} ({w('mode')} is "
                      f"{cfg.mode})")
    for name, off, why in TASK_REFUSES:
        if getattr(cfg, name) not in (off, []):
            raise w.error(f"{task} does not take {w(name)}: {why.format(output_dir=w('output_dir'))}")
    if cfg.detokenizer != "none":
        raise w.error(f"{task} scores the texts as given: drop {w('detokenizer')}")
    if cfg.task == "multiple-choice":
        if (cfg.protocol == "llama-cpp-winogrande") != (cfg.layout == "winogrande") and cfg.protocol != "lm-eval":
            raise w.error(f"{w('protocol', cfg.protocol)} with {w('layout', cfg.layout)}: llama-cpp-winogrande scores "
                          f"Winogrande rows ({w('layout', 'winogrande')}), llama-cpp-hellaswag the other layouts")
        if cfg.words_field is not None:
            raise w.error(f"{w('words_field')} is read by {w('task', 'surprisal')}, not multiple-choice; drop it")
        return
    if cfg.prefix_token == "none" or cfg.bos_policy == "none":
        raise w.error(f"{task} conditions the first word on a prefix token (BOS, else EOS): drop "
                      f"{w('prefix_token', 'none')} and {w('bos_policy', 'none')}")


def check_context_curve(cfg: Config, w: Words | None = None) -> None:
    """--context-curve: increasing lengths of at least 1 (2 in stream mode), in document or stream mode."""
    w = w or Words()
    lengths = cfg.context_curve
    if lengths is None:
        return
    least = 2 if cfg.mode == "stream" else 1
    example = w("context_curve", [128, 256, 512])
    if not lengths:
        raise w.error(f"{w('context_curve')} is empty: give increasing context lengths, e.g. {example}")
    if lengths[0] < least or any(b <= a for a, b in zip(lengths, lengths[1:])):
        raise w.error(f"{w('context_curve', lengths)}: give strictly increasing lengths of at least {least}, "
                      f"e.g. {example}")
    if cfg.mode not in ("document", "stream"):
        raise w.error(f"{w('context_curve')} scores document or stream windows; {w('mode', cfg.mode)} cuts fixed "
                      f"chunks (use {w('mode', 'document')} or stream)")


def valid_shard(shard: str) -> bool:
    """Whether --shard is `auto` or K/N with 0 <= K < N (ASCII digits)."""
    if shard == "auto":
        return True
    match = re.fullmatch(r"([0-9]+)/([0-9]+)", shard)
    return match is not None and int(match[1]) < int(match[2])


def check_longppl(cfg: Config, w: Words) -> None:
    """LongPPL is per document, and maps another tokenizer's tokens through the text alone (no prompt)."""
    if not cfg.longppl_evaluator.strip():
        raise w.error(f"{w('longppl_evaluator')} is empty: give self, or a model (Hub id, directory, .gguf file)")
    if cfg.mode != "document":
        raise w.error(f"{w('longppl_evaluator')} works per document, in {w('mode', 'document')} ({w('mode')} is "
                      f"{cfg.mode})")
    if cfg.prompt_field and cfg.longppl_evaluator != "self":
        raise w.error(f"{w('longppl_evaluator')} with {w('prompt_field')}: only self (another model's tokens are "
                      f"mapped through the text alone, without the prompt); use {w('longppl_evaluator', 'self')}")
