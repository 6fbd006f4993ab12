"""The errors every module may raise: bad input that the CLI prints as one line and ends with exit code 2, and a
broken invariant of lm_ce's own (a bug to report, never the input's fault)."""
from __future__ import annotations


class UsageError(Exception):
    """Bad input: the message says what is wrong and what to do. The CLI prints it and exits 2."""


class SharedUsageError(UsageError):
    """A UsageError the main process found and told every process of the run: the CLI prints it once."""


class InternalError(RuntimeError):
    """An invariant of lm_ce's own that does not hold: a bug in lm_ce, not bad input (the CLI shows the traceback)."""


def first_line(e: BaseException) -> str:
    """An exception's message on one line (libraries spread theirs over several), short enough for a one-line error."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text[:300] if text else type(e).__name__
