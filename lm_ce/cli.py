"""Command line: `python scripts/evaluate.py [--config FILE] [--field value ...]`.

Bad input ends with one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

USAGE = """usage: evaluate.py [--config FILE.yaml] [--FIELD VALUE ...]

Scores a text dataset with a causal LM: mean token cross-entropy, perplexity, bits per byte.
Every field of the config (lm_ce/config.py; see README) is a flag, e.g.
  --model gpt2 --dataset wikitext --dataset-config wikitext-2-raw-v1 --split test
  --data-files a.jsonl --text-field text --limit 100 --mode document|stream|llama-cpp|gptq
  --protocol lm-eval|lm-eval-wikitext|hf-docs|llama-cpp|gptq --bos-policy first|every-window|none
  --max-length 1024 --stride 512 --batch-size 8 --dtype float32 --output-dir runs/x [--resume | --overwrite]

Two finished runs: lm-ce compare RUN_A RUN_B [--output-dir DIR] (see lm-ce compare --help)
"""


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
    from .config import UsageError

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
    from .config import UsageError

    runs, output_dir, rest = [], None, list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--output-dir" or arg.startswith("--output-dir="):
            value = arg.split("=", 1)[1] if "=" in arg else (rest.pop(0) if rest else None)
            if not value:
                raise UsageError("--output-dir needs a directory")
            output_dir = value
        elif arg.startswith("-"):
            raise UsageError(f"compare: unknown option {arg}; usage: lm-ce compare RUN_A RUN_B [--output-dir DIR]")
        else:
            runs.append(arg)
    if len(runs) != 2:
        raise UsageError("compare needs two run directories: lm-ce compare RUN_A RUN_B [--output-dir DIR]")
    return runs, output_dir


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    quiet_libraries()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    from . import outdir
    from .config import SharedUsageError, UsageError
    from .overrides import build_config

    results = None
    try:
        cfg = build_config(argv)
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
        names = [str(p.relative_to(cfg.output_dir)) for p in report.write(results, cfg.output_dir, plot=cfg.plot)]
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
