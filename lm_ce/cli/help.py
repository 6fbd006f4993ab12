"""The command line's help: the usage of each command, and every config field by group (from its metadata)."""
from __future__ import annotations

USAGE = """usage: lm-ce [--config FILE.yaml] [--FIELD VALUE ...]     (also: python scripts/evaluate.py ...)
       lm-ce compare RUN_A RUN_B [--output-dir DIR]   (two finished runs; see lm-ce compare --help)
       lm-ce merge SHARD_DIR... --output-dir OUT      (the shards of one --shard K/N run; see lm-ce merge --help)
       lm-ce cache list | clear [NAME...]             (lm_ce's cache: GGUF weights, file hashes; lm-ce cache --help)
       lm-ce explain --from P --to P --output-dir D   (why two protocols differ; see lm-ce explain --help)
       lm-ce --version                                (the installed lm_ce's version)

Scores a text dataset with a causal LM: mean token cross-entropy, perplexity, bits per byte.
Every field below is a flag (--max-length 1024; dashes or underscores) and a key of the --config file
(max_length: 1024); flags win over the file. A list is a,b or separate words; true/false fields take
--FIELD or --no-FIELD.
"""


MERGE_USAGE = """usage: lm-ce merge SHARD_DIR... --output-dir OUT

Writes the report of a whole run from its finished shards (each run with --shard K/N, or --shard auto in a
Slurm array, into its own --output-dir), without loading a model: the same tokens, NLL sum, clustered
standard error and groups as one run over all documents; documents.jsonl (and tokens.parquet) in document
order. Shards of different runs, missing or given twice, are refused, and so is a shard whose
documents.jsonl or tokens.parquet is not what its saved state records (missing, cut or changed): nothing
is written then.
"""


CACHE_USAGE = """usage: lm-ce cache list
       lm-ce cache clear [NAME...]

lm_ce's cache folder (LM_CE_CACHE, else ~/.cache/lm_ce; LM_CE_CACHE="" turns it off) holds the dequantized
weights of GGUF files (gguf/NAME, one per file content, dtype and transformers/gguf versions) and the sha256
of data and model files (sha256/, signed memos). `list` shows each entry's size, source file and date;
`clear` removes every entry and the memos, or only the entries NAME... (as `list` names them; `sha256`
for the memos).
"""


def help_text(width: int = 100) -> str:
    """`--help`: the usage, then every config field by group with its one-line help (from the field's metadata)."""
    import dataclasses
    import textwrap

    from lm_ce.config.fields import GROUPS, Config
    from lm_ce.config.values import MAPPINGS, field_type

    fields = dataclasses.fields(Config)
    lines = [USAGE]
    for group in GROUPS:
        lines.append(f"{group}:")
        for f in (f for f in fields if f.metadata["group"] == group):
            kind, _, is_list = field_type(f.name)
            flag = "--" + f.name.replace("_", "-")
            if f.name == "suite":
                flag = "suite: [...]"
            elif kind is bool:
                flag = f"--[no-]{flag[2:]}"
            elif f.name in MAPPINGS:
                flag += " K=V,..."
            else:
                flag += " " + ("N" if kind is int else "VALUE") + (",..." if is_list else "")
            text = f"  {flag:<30} " + f.metadata["help"]
            if f.default is not None:  # kept on one line: \0 stands for its spaces while wrapping
                shown = ("on" if f.default else "off") if isinstance(f.default, bool) else (
                    repr(f.default)[1:-1] if isinstance(f.default, str) else f.default)
                text += f" [default:\0{shown}]"
            lines += [line.replace("\0", " ") for line in
                      textwrap.wrap(text, width, subsequent_indent=" " * 33, break_on_hyphens=False)]
        lines.append("")
    return "\n".join(lines)


COMPARE_USAGE = """usage: lm-ce compare RUN_A RUN_B [--output-dir DIR] [--byte-class NAME=REGEX ...]

Compares two finished runs (their --output-dir) on the same data without loading a model: B minus A
in mean loss and bits per byte with paired standard errors, by group, the documents that changed most,
and token by token when both saved tokens. Writes comparison.json and comparison.md to DIR (default RUN_B).

Runs of models with different tokenizers, in document mode, both with --save-tokens: also byte by byte,
each token's loss spread over its bytes; the gap by byte class (url, newline, whitespace, digits, letters,
punctuation, non_ascii, other, and each --byte-class NAME=REGEX, which comes first), by document and by span,
in comparison.json's `bytes`, documents.jsonl (one row per document) and comparison.html (a heatmap).
"""


EXPLAIN_USAGE = """usage: lm-ce explain --from PROTOCOL[,FIELD=VALUE...] --to PROTOCOL[,FIELD=VALUE...] --output-dir DIR
                     [--order FACTOR,...] [--metric M] [--to-metric M] [--resume | --overwrite] [--FIELD VALUE ...]

Moves from one protocol's number to another's one factor at a time (detokenizer, window_length, stride,
prefix_token, join, bos_sink, chunk_selection, then unit and log_base), scoring every state with one model
load, and reports each step's value, its log delta (nats per unit; the steps add up to the ends' difference)
and its standard error paired by document. Window fields of an end follow its protocol after a comma
(--to llama-cpp,max_length=256). --order sets the order of the factors that differ (each step's delta depends
on the steps before it). --metric and --to-metric: the metrics of the ends (default: each protocol's headline).
The other flags are a run's (--model, --data-files, --text-field, --limit, ...). Each state is a run in
DIR/steps/NN-factor (--resume continues the chain); DIR gets results.json (explain), results.md,
results.html and explain.png.
"""
