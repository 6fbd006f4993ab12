"""An output directory belongs to one run: claimed at start-up, before the model loads.

A directory holding another run's files is refused unless --resume continues that run or --overwrite
replaces it (deleting only the files lm_ce writes; other files are kept). A run is known by lm_ce's
own marker, a results.json or state.json that lm_ce wrote (or the state.pt of an earlier version, known by its
bytes and never loaded): files with a run's names (config.yaml, documents.jsonl, ...) and no marker are someone
else's, never replaced or deleted. What a directory holds is told from state.json alone: no records are loaded.
A lock file keeps a second live run out: the run holds an OS lock on it, which the system drops when the process
dies, so a lock file left by a killed run is recognized as stale and taken over.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from lm_ce.config.fields import Config
from lm_ce.config.sources import words_of
from lm_ce.errors import SharedUsageError, UsageError
from lm_ce.rundir import state as saved
from lm_ce.rundir.state import LEGACY, STATE

log = logging.getLogger("lm_ce")

# The files a run writes and what each holds: the manual's lists of them are drawn from here (docs/hooks/run_files.py)
WRITES = {
    "results.json": "every figure and what was run: [its keys](reports.md#resultsjson), a contract other tools read",
    "results.md": "the printed report as Markdown tables",
    "results.html": "one page to open in a browser, offline: the figures, the groups, the loss-by-position plot "
                    "(inline SVG) and the documents of highest and lowest mean loss coloured token by token "
                    "(`--no-page` to skip)",
    "config.yaml": "the resolved configuration: `--config DIR/config.yaml` repeats the run exactly",
    "documents.jsonl": "document mode: one row per document",
    "position_loss.png": "mean loss by position in the window (`--no-plot` to skip)",
    "context_curve.png": "with `--context-curve`: mean loss of the same targets against the context length",
    "tokens.parquet": "with `--save-tokens`: every scored token",
    "words.parquet": "with `--task surprisal`: every word ([Word surprisal](surprisal.md#what-it-writes))",
    "sentences.parquet": "with `--task surprisal`: every sentence",
}
REPORTS = tuple(WRITES)
# Every file a run writes, with the records' files state.json names (state.body_files): --overwrite deletes these
# and nothing else
RUN_FILES = (*REPORTS, STATE, LEGACY)
LOCK = ".lm_ce.lock"

_held: dict[Path, list] = {}  # directories this process holds: [lock file descriptor, nested claims, folders created]


@dataclass
class Claim:
    """The hold of one run on its output directory (None: no output directory); release it when the run ends."""

    directory: Path | None
    main: bool = True  # only the main process holds the lock

    def release(self) -> None:
        if self.directory is None or not self.main or self.directory not in _held:
            return
        held = _held[self.directory]
        held[1] -= 1
        if held[1] == 0:
            del _held[self.directory]
            try:
                os.unlink(self.directory / LOCK)  # while still locked, so no one takes a file about to vanish
            except OSError:
                pass
            os.close(held[0])
            for folder in held[2]:  # created by this claim, deepest first: a run that wrote nothing (its model
                try:  # missing, say) leaves no empty directory behind
                    folder.rmdir()  # only an empty one
                except OSError:
                    break
        self.directory = None

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(cfg: Config) -> Claim:
    """Take cfg.output_dir for this run (lock it; check, and with --overwrite clear, what is there), or a UsageError.

    Nested claims of one directory in one process are one hold. With several processes the main process
    claims and every process gets the same answer.
    """
    if not cfg.output_dir:
        return Claim(None)
    state = process_state()
    directory = Path(cfg.output_dir).absolute()
    error = None
    if state.is_main_process:
        try:
            _claim(directory, cfg)
        except UsageError as e:
            error = str(e)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error:  # with several processes every one has it: the CLI prints it once
        raise (SharedUsageError if state.num_processes > 1 else UsageError)(error)
    return Claim(directory, main=state.is_main_process)


def process_state():
    """accelerate's process state, started as runner.evaluate's Accelerator starts it (CPU processes when
    there is no accelerator: started otherwise, torchrun's CPU processes would each count as the main one)."""
    import torch
    from accelerate import PartialState

    mps = getattr(torch.backends, "mps", None)
    return PartialState(cpu=not torch.cuda.is_available() and not (mps is not None and mps.is_available()))


def _claim(directory: Path, cfg: Config) -> None:
    if directory in _held:
        _held[directory][1] += 1
        return
    created = [folder for folder in (directory, *directory.parents) if not folder.exists()]
    make(directory)
    fd = _lock(directory)
    try:
        found = previous_run(directory)
        refuse_previous(directory, cfg, found)
        if found and cfg.overwrite:
            removed = clear(directory)
            log.info("--overwrite: deleted the previous run's files in %s (%s)", directory, ", ".join(removed))
    except BaseException:
        os.unlink(directory / LOCK)
        os.close(fd)
        raise
    _held[directory] = [fd, 1, created]


def check_free(cfg: Config) -> None:
    """Refuse, without taking it, an output directory that a run could not claim (the callback asks this before
    training starts, where the claim comes at the first evaluation)."""
    directory = Path(cfg.output_dir).absolute() if cfg.output_dir else None
    if directory is not None and directory.is_dir():
        refuse_previous(directory, cfg, previous_run(directory))


def refuse_previous(directory: Path, cfg: Config, found: Previous | None) -> None:
    """A UsageError when `directory` holds files lm_ce did not write, or a run that cfg neither resumes nor
    overwrites; in the words of cfg's source."""
    w = words_of(cfg)
    if found and found.foreign:
        them = "them" if len(found.foreign) > 1 else "it"
        raise w.error(f"{w('output_dir')} {directory} holds {', '.join(found.foreign)}, not written by lm_ce (no "
                      f"results.json or {STATE} of an lm_ce run there), which a run would replace: move {them} "
                      f"elsewhere or use another {w('output_dir')}")
    if found and not cfg.overwrite and not cfg.resume:
        resume = f"continue it with {w('resume', True)}, " if found.resumable else ""
        raise w.error(f"{w('output_dir')} {directory} holds {found.words}: {resume}replace it with "
                      f"{w('overwrite', True)} (deletes those files), or use another {w('output_dir')}")


def make(directory: Path) -> None:
    """The directory, created if missing, or a UsageError when it is a file or cannot be created."""
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"--output-dir {directory} is a file, not a directory; give a directory (created if missing)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in directory.parents if p.exists() and not p.is_dir()), None)
        why = f": {blocker} is a file; give another directory" if blocker else f" ({e.strerror}); give a writable directory"
        raise UsageError(f"--output-dir {directory} cannot be created{why}") from None


def _lock(directory: Path) -> int:
    """The open, OS-locked lock file (also the check that the directory is writable), or a UsageError."""
    path = directory / LOCK
    for _ in range(5):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            why = f"is not writable ({e.strerror})"
            raise UsageError(f"--output-dir {directory} {why}; give a writable directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            busy = e.errno in (errno.EAGAIN, errno.EACCES) or _pid_alive(fd)  # no OS locks here: the pid tells
            holder = _holder(fd)
            if busy:
                os.close(fd)
                raise UsageError(
                    f"--output-dir {directory} is in use by another run ({holder}); wait for it to end, or use "
                    "another --output-dir"
                ) from None
            log.warning("%s: the file system has no file locks (%s); the lock file's pid guards it", directory, e.strerror)
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file as we opened it: take the new one
            os.close(fd)
            continue
        if os.fstat(fd).st_size:
            log.warning("%s: a lock left by %s, which is no longer running: taken over", directory, _holder(fd))
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return fd
    raise UsageError(f"--output-dir {directory}: its lock file keeps changing hands; use another --output-dir")


def in_use(directory: Path) -> str | None:
    """Who holds the directory's lock, when a live run does ('pid N on HOST since TIME'); else None."""
    try:
        fd = os.open(directory / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES) or _pid_alive(fd):
                return _holder(fd)
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _pid_alive(fd: int) -> bool:
    """Whether the lock file names another process of this host that still runs (where OS locks are missing)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        if info["host"] != socket.gethostname() or info["pid"] == os.getpid():
            return False
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _holder(fd: int) -> str:
    """Who wrote the lock file: 'pid N on HOST since TIME'."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']} since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is starting"


@dataclass
class Previous:
    """What another run left in a directory."""

    words: str  # e.g. 'a finished run (results.json, results.md, config.yaml, state.pt)'
    resumable: bool  # interrupted, with saved progress
    foreign: list[str] = field(default_factory=list)  # files with a run's names but no marker of lm_ce: not a run


def previous_run(directory: Path) -> Previous | None:
    """What another run left in the directory, or None when it holds no file a run writes."""
    found = [name for name in RUN_FILES if (directory / name).exists()]
    if not found:
        return None
    files = ", ".join(found)
    results = _json(directory / "results.json")
    ours = (results.keys() >= RESULTS_MARKER or (STATE in found and saved.is_ours(directory / STATE))
            or (LEGACY in found and saved.legacy(directory / LEGACY)))
    if not ours:
        return Previous(f"files not written by lm_ce ({files})", False, found)
    if STATE in found:
        try:
            header = saved.read_header(directory)
        except saved.StateError as e:
            return Previous(f"a run whose {STATE} cannot be used ({e}; {files})", False)
        if not header["complete"]:
            return Previous(f"an interrupted run ({header['tokens']:,} tokens scored before the stop; {files})", True)
        return Previous(f"a finished run ({files})", False)
    if LEGACY in found:
        return Previous(f"a run of an earlier lm_ce ({files}; this version never loads its {LEGACY})", False)
    if results.get("complete") is False:
        return Previous(f"an interrupted run without saved progress ({files})", False)
    return Previous(f"a finished run ({files})", False)


RESULTS_MARKER = {"complete", "model", "config", "environment"}  # keys every results.json of lm_ce has (runs, suites)


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def clear(directory: Path) -> list[str]:
    """Delete the files a run writes (and their half-written temporaries); other files stay. The names deleted."""
    removed = []
    for path in [*(directory / name for name in RUN_FILES), *saved.body_files(directory)]:
        if path.is_file():
            path.unlink()
            removed.append(path.name)
        for tmp in directory.glob(f".{path.name}.tmp*"):
            tmp.unlink()
    for tmp in directory.glob(".state-*.safetensors.tmp*"):
        tmp.unlink()
    return removed
