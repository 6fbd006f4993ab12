"""What a person sees and does during a long run: the progress bar, and (at the command line) Ctrl-C / SIGTERM to
stop and save."""
from __future__ import annotations

import logging
import math
import signal
import threading
import time

log = logging.getLogger("lm_ce")


class Progress:
    """tqdm over scored tokens with the running perplexity; silent off the main process."""

    def __init__(self, enabled: bool, *, main: bool = True):
        self.enabled = enabled  # the bar (--progress, on the main process)
        self.main = main  # the main process: says the cost of costly windows, bar or not
        self.bar = None
        self.nll = 0.0
        self.tokens = 0
        self.planned = 0  # tokens of the windows planned so far
        self.counted = 0  # of those, scored (before a resume included)
        self.cost_said = False
        self.timed_from: tuple[float, int] | None = None  # (clock, tokens) when the cost estimate started

    def estimate_after_next_batch(self) -> None:
        """Log the estimated scoring time once the next batch is scored (its rate times the tokens left)."""
        self.timed_from = (time.perf_counter(), self.counted)

    def add_total(self, n: int, done: int = 0) -> None:
        self.planned += n
        self.counted += done
        if self.enabled and self.bar is None:  # opened when there is work, not before the data loads
            from tqdm.auto import tqdm

            self.bar = tqdm(total=0, unit="tok", unit_scale=True, dynamic_ncols=True, desc="scoring")
        if self.bar is not None:
            self.bar.total += n
            if done:
                self.bar.update(done)
            self.bar.refresh()

    def update(self, tokens: int, nll: float) -> None:
        self.tokens += tokens
        self.counted += tokens
        self.nll += nll
        if self.timed_from is not None and tokens:
            self._say_estimate()
        if self.bar is not None and tokens:
            self.bar.update(tokens)
            self.bar.set_postfix(ppl=f"{math.exp(min(self.nll / max(self.tokens, 1), 700)):.4g}", refresh=False)

    def _say_estimate(self) -> None:
        started, before = self.timed_from
        self.timed_from = None
        rate = (self.counted - before) / max(time.perf_counter() - started, 1e-9)
        left = self.planned - self.counted
        if self.main:
            log.warning("estimated scoring time: about %s for the %s tokens left of those planned so far (%.3g "
                        "tokens/s on the first batch)", duration(left / rate), f"{left:,}", rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def duration(seconds: float) -> str:
    """'3 h 05 min', '12 min', '40 s'."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    return f"{int(seconds // 60)} min" if seconds >= 60 else f"{int(seconds)} s"


class StopRequest:
    """At the command line (`handle_signals`): Ctrl-C / SIGTERM ask the run to save and stop at the next batch, and a
    second Ctrl-C stops at once. From Python, lm_ce is a guest in the caller's process: no handler is installed, so
    a Ctrl-C reaches the caller as KeyboardInterrupt (the runner saves what is consistent first)."""

    def __init__(self, handle_signals: bool = False):
        self.handle_signals = handle_signals
        self.requested = False
        self.previous = {}

    def __enter__(self) -> StopRequest:
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested: saving progress after the current batch (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
