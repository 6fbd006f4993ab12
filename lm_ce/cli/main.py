"""Command line: `lm-ce [--config FILE] [--field value ...]` (also `python scripts/evaluate.py ...`), and its
subcommands.

Bad input ends with one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from lm_ce.cli.commands import cache_main, compare_main, merge_main
from lm_ce.cli.help import help_text


NON_FINITE = 3  # the exit code of a model that produced NaN/inf (2: bad input; 130: interrupted)


def main(argv: list[str] | None = None) -> int:
    """Run the command; output cut off by its reader (`lm-ce --help | head`) ends quietly, as other tools do."""
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:
        # the reader is gone: point stdout at /dev/null so that Python's flush at exit raises nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, what a shell reports for a command ended by a closed pipe


def _main(argv: list[str]) -> int:
    if argv[:1] == ["--version"] or argv[:1] == ["-V"]:
        from lm_ce import __version__

        print(f"lm_ce {__version__}")  # as results.json's environment.lm_ce records it
        return 0
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    if argv[:1] == ["cache"]:
        return cache_main(argv[1:])
    if argv[:1] == ["explain"]:
        from lm_ce.cli.explain import explain_main

        if not any(a in ("-h", "--help") for a in argv):
            quiet_libraries()
        return explain_main(argv[1:])
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    quiet_libraries()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    from lm_ce.config.sources import build_config
    from lm_ce.errors import SharedUsageError, UsageError
    from lm_ce.rundir import claims as outdir

    results = None
    try:
        cfg = build_config(argv)
        from lm_ce.runner import evaluate, prepare

        prepare(cfg)  # before the output directory is claimed: its advice names the suite's entry

        with outdir.claim(cfg):  # the output directory is checked and locked before the model loads
            results = evaluate(cfg, owns_process=True)  # its Ctrl-C / SIGTERM: save and stop at the next batch
            report_run(results, cfg)
    except SharedUsageError as e:  # every process has it: the main one says it, then all end together
        state = outdir.process_state()  # (a process that ended first would have torchrun kill the main one)
        if state.is_main_process:
            print(f"lm_ce: error: {e}", file=sys.stderr, flush=True)
        state.wait_for_everyone()
        return 2
    except UsageError as e:  # bad input
        print(f"lm_ce: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # the model produced NaN/inf: the input may be fine (docs/reliability.md)
        print(f"lm_ce: error: {e}", file=sys.stderr)
        return NON_FINITE
    except KeyboardInterrupt:  # Ctrl-C outside scoring (scoring itself stops cleanly and saves its progress)
        where = "before scoring started: nothing was scored" if results is None else (
            "while writing the reports: rerun the command with --resume to write them")
        print(f"lm_ce: interrupted (Ctrl-C) {where}", file=sys.stderr)
        return 130
    return 0 if results.summary["complete"] else 130


def report_run(results, cfg) -> None:
    """The main process prints the table, writes the reports and names exactly the files it wrote."""
    from accelerate import PartialState

    from lm_ce.reports import files as report_files
    from lm_ce.reports import tables

    if not PartialState().is_main_process:
        return
    print(tables.table(results.summary))
    if cfg.output_dir:
        # names relative to the output directory (a suite's datasets write into NAME/)
        written = report_files.write(results, cfg.output_dir, plot=cfg.plot, page=cfg.page)
        names = [str(p.relative_to(cfg.output_dir)) for p in written]
        if (Path(cfg.output_dir) / "state.json").is_file():  # saved by the run itself, for --resume and merge
            names += ["state.json", *(p.name for p in sorted(Path(cfg.output_dir).glob("state-*.safetensors")))]
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
