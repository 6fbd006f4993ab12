"""Command line: `python scripts/evaluate.py [--config FILE] [--field value ...]`.

Bad input ends with one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

USAGE = """usage: lm-ce [--config FILE.yaml] [--FIELD VALUE ...]     (also: python scripts/evaluate.py ...)
       lm-ce compare RUN_A RUN_B [--output-dir DIR]   (two finished runs; see lm-ce compare --help)
       lm-ce merge SHARD_DIR... --output-dir OUT      (the shards of one --shard K/N run; see lm-ce merge --help)

Scores a text dataset with a causal LM: mean token cross-entropy, perplexity, bits per byte.
Every field below is a flag (--max-length 1024; dashes or underscores) and a key of the --config file
(max_length: 1024); flags win over the file. A list is a,b or separate words; true/false fields take
--FIELD or --no-FIELD.
"""


MERGE_USAGE = """usage: lm-ce merge SHARD_DIR... --output-dir OUT

Writes the report of a whole run from its finished shards (each run with --shard K/N, or --shard auto in a
Slurm array, into its own --output-dir), without loading a model: the same tokens, NLL sum, clustered
standard error and groups as one run over all documents; documents.jsonl (and tokens.parquet) in document
order. Shards of different runs, missing or given twice, are refused.
"""


def help_text(width: int = 100) -> str:
    """`--help`: the usage, then every config field by group with its one-line help (from the field's metadata)."""
    import dataclasses
    import textwrap

    from .config import GROUPS, Config
    from .values import MAPPINGS, field_type

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


COMPARE_USAGE = """usage: lm-ce compare RUN_A RUN_B [--output-dir DIR]

Compares two finished runs (their --output-dir) on the same data without loading a model: B minus A
in mean loss and bits per byte with paired standard errors, by group, the documents that changed most,
and token by token when both saved tokens. Writes comparison.json and comparison.md to DIR (default RUN_B).
"""


def compare_main(argv: list[str] | None = None) -> int:
    """`lm-ce compare RUN_A RUN_B [--output-dir DIR]` (also scripts/compare.py)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(COMPARE_USAGE)
        return 0
    from . import paired
    from .errors import UsageError

    try:
        runs, output_dir = _compare_args(argv)
        comparison = paired.compare_runs(*runs)
        where = paired.write(comparison, output_dir or runs[1])
    except UsageError as e:
        print(f"lm_ce: error: {e}", file=sys.stderr)
        return 2
    print(paired.markdown(comparison))
    print(f"wrote {where}/ (comparison.json, comparison.md)")
    return 0


def _compare_args(argv: list[str]) -> tuple[list[str], str | None]:
    from .errors import UsageError

    runs, output_dir = _run_dirs_args("compare", argv, "lm-ce compare RUN_A RUN_B [--output-dir DIR]")
    if len(runs) != 2:
        raise UsageError("compare needs two run directories: lm-ce compare RUN_A RUN_B [--output-dir DIR]")
    return runs, output_dir


def _run_dirs_args(command: str, argv: list[str], usage: str) -> tuple[list[str], str | None]:
    """(run directories, --output-dir or None) of a subcommand's arguments."""
    from .errors import UsageError

    runs, output_dir, rest = [], None, list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--output-dir" or arg.startswith("--output-dir="):
            value = arg.split("=", 1)[1] if "=" in arg else (rest.pop(0) if rest else None)
            if not value:
                raise UsageError("--output-dir needs a directory")
            output_dir = value
        elif arg.startswith("-"):
            raise UsageError(f"{command}: unknown option {arg}; usage: {usage}")
        else:
            runs.append(arg)
    return runs, output_dir


def merge_main(argv: list[str]) -> int:
    """`lm-ce merge SHARD_DIR... --output-dir OUT`."""
    if any(a in ("-h", "--help") for a in argv):
        print(MERGE_USAGE)
        return 0
    from . import merge, report
    from .errors import UsageError

    try:
        directories, output_dir = _run_dirs_args("merge", argv, "lm-ce merge SHARD_DIR... --output-dir OUT")
        if not directories or not output_dir:
            raise UsageError("merge needs the shards' directories and --output-dir: lm-ce merge SHARD_DIR... --output-dir OUT")
        results = merge.merge(directories, output_dir)
    except UsageError as e:
        print(f"lm_ce: error: {e}", file=sys.stderr)
        return 2
    print(report.table(results.summary))
    print(f"wrote {output_dir}/ (merged from {len(directories)} shards)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    quiet_libraries()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    from . import outdir
    from .errors import SharedUsageError, UsageError
    from .overrides import build_config
    from .suite import check_suite

    results = None
    try:
        cfg = build_config(argv)
        check_suite(cfg)  # before the output directory is claimed: its advice names the suite's entry
        from .runner import evaluate

        with outdir.claim(cfg):  # the output directory is checked and locked before the model loads
            results = evaluate(cfg)
            report_run(results, cfg)
    except SharedUsageError as e:  # every process has it: the main one says it, then all end together
        state = outdir.process_state()  # (a process that ended first would have torchrun kill the main one)
        if state.is_main_process:
            print(f"lm_ce: error: {e}", file=sys.stderr, flush=True)
        state.wait_for_everyone()
        return 2
    except (UsageError, FloatingPointError) as e:  # bad input, or a model that produced NaN/inf
        print(f"lm_ce: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside scoring (scoring itself stops cleanly and saves its progress)
        where = "before scoring started: nothing was scored" if results is None else (
            "while writing the reports: rerun the command with --resume to write them")
        print(f"lm_ce: interrupted (Ctrl-C) {where}", file=sys.stderr)
        return 130
    return 0 if results.summary["complete"] else 130


def report_run(results, cfg) -> None:
    """The main process prints the table, writes the reports and names exactly the files it wrote."""
    from accelerate import PartialState

    from . import report

    if not PartialState().is_main_process:
        return
    print(report.table(results.summary))
    if cfg.output_dir:
        # names relative to the output directory (a suite's datasets write into NAME/)
        written = report.write(results, cfg.output_dir, plot=cfg.plot, page=cfg.page)
        names = [str(p.relative_to(cfg.output_dir)) for p in written]
        if (Path(cfg.output_dir) / "state.pt").is_file():  # saved by the run itself, for --resume
            names.append("state.pt")
        print(f"wrote {Path(cfg.output_dir)}/: {', '.join(names)}")


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (so redirections and test captures see it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def quiet_libraries() -> None:
    """Our log lines on stderr; the libraries' warnings and progress bars off (we report what matters)."""
    ours = logging.getLogger("lm_ce")
    if not any(isinstance(h, _Stderr) for h in ours.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("lm_ce: %(message)s"))
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    import datasets
    import huggingface_hub
    import transformers

    huggingface_hub.utils.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


if __name__ == "__main__":
    sys.exit(main())
