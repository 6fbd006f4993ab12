"""What a person sees and does during a long run: the progress bar, and Ctrl-C / SIGTERM to stop and save."""
from __future__ import annotations

import logging
import math
import signal
import threading

log = logging.getLogger("lm_ce")


class Progress:
    """tqdm over scored tokens with the running perplexity; silent off the main process."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.nll = 0.0
        self.tokens = 0

    def add_total(self, n: int, done: int = 0) -> None:
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
        self.nll += nll
        if self.bar is not None and tokens:
            self.bar.update(tokens)
            self.bar.set_postfix(ppl=f"{math.exp(min(self.nll / max(self.tokens, 1), 700)):.4g}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StopRequest:
    """Ctrl-C / SIGTERM ask the run to save and stop at the next batch; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
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
