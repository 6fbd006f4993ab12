"""What a person sees and does during a long run: the progress bar, and (at the command line) Ctrl-C / SIGTERM to
stop and save."""
from __future__ import annotations

import logging
import math
import signal
import threading
import time
from dataclasses import dataclass

import torch

log = logging.getLogger("lm_ce")


@dataclass(frozen=True)
class Costs:
    """What a batch costs, in multiply-adds from the model's shape: the body's weights for every input position
    (padding included), attention's query-key and value products for every pair of positions in a row, and the
    head for every scored token. A small --stride reads a whole window to score a few tokens, so time follows
    this cost, not the tokens scored."""

    body: float  # per input position: the parameters outside the embedding and output tables
    attention: float  # per pair of positions in a row: 2 x hidden size x layers
    head: float  # per scored token: hidden size x vocabulary

    @classmethod
    def of(cls, model) -> "Costs":
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 0
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 0
        tables: dict[int, int] = {}  # the embedding and output tables (one, when tied)
        for get in ("get_input_embeddings", "get_output_embeddings"):
            try:
                weight = getattr(getattr(model, get)(), "weight", None)
            except (AttributeError, NotImplementedError):
                weight = None
            if isinstance(weight, torch.Tensor):
                tables[id(weight)] = weight.numel()
        body = sum(p.numel() for p in model.parameters()) - sum(tables.values())
        return cls(body=max(body, 1), attention=2.0 * hidden * layers, head=float(hidden * (getattr(config, "vocab_size", 0) or 0)))

    def batch(self, windows) -> float:
        """The cost of one batch of windows (padded to its longest)."""
        if not windows:
            return 0.0
        width = max(w.length for w in windows)
        return len(windows) * width * (self.body + width * self.attention) + sum(w.n_scored for w in windows) * self.head


class Progress:
    """tqdm over scored tokens with the running perplexity and the time left; silent off the main process.

    The time left is the planned batches' cost (`Costs`) not yet scored, at the rate of cost per second measured
    over the batches scored so far: updated after every batch, so a first batch unlike the rest (a document's first
    window scores all its tokens, the next ones a stride each) does not set it."""

    def __init__(self, enabled: bool, *, main: bool = True, costs: Costs | None = None):
        self.enabled = enabled  # the bar (--progress, on the main process)
        self.main = main  # the main process: says the cost of costly windows, bar or not
        self.costs = costs  # None: the time left follows the tokens scored
        self.bar = None
        self.nll = 0.0
        self.tokens = 0
        self.planned = 0  # tokens of the windows planned so far
        self.counted = 0  # of those, scored (before a resume included)
        self.cost_planned = 0.0  # cost of the batches planned so far in this process's run (a resume's done ones not)
        self.cost_done = 0.0  # of those, scored
        self.started: float | None = None  # the clock when the first batch was planned
        self.warm: tuple[float, float, int] | None = None  # (clock, cost done, tokens) after the first batch: the rate
        # is measured from there on, the first batch's warm-up (first calls, allocations) left out
        self.cost_said = False
        self.estimate_wanted = False  # log the time left once the next batch is scored (costly windows)
        self.said: tuple[float, float] | None = None  # (clock, estimated total seconds) of the last estimate logged
        self.estimates: list[tuple[float, float]] = []  # (seconds scored so far, seconds left) after each batch

    def estimate_after_next_batch(self) -> None:
        """Log the estimated scoring time once the next batch is scored, and again when it changes much."""
        self.estimate_wanted = True

    def add_total(self, n: int, done: int = 0, cost: float = 0.0) -> None:
        """`n` more tokens planned (`done` of them scored before a resume), their batches still to score costing
        `cost`."""
        self.planned += n
        self.counted += done
        self.cost_planned += cost
        if self.started is None:
            self.started = time.perf_counter()
        if self.enabled and self.bar is None:  # opened when there is work, not before the data loads
            from tqdm.auto import tqdm

            self.bar = tqdm(total=0, unit="tok", unit_scale=True, dynamic_ncols=True, desc="scoring")
        if self.bar is not None:
            self.bar.total += n
            if done:
                self.bar.update(done)
            self.bar.refresh()

    def update(self, tokens: int, nll: float, cost: float = 0.0) -> None:
        self.tokens += tokens
        self.counted += tokens
        self.nll += nll
        self.cost_done += cost
        left = self.seconds_left()
        if tokens and self.warm is None:
            self.warm = (time.perf_counter(), self.cost_done, self.tokens)
        elif left is not None:  # from the second batch on
            self.estimates.append((time.perf_counter() - self.started, left))
            if self.main and (self.estimate_wanted or self.said is not None):
                self._say_estimate(left)
        if self.bar is not None and tokens:
            self.bar.update(tokens)
            shown = {"ppl": f"{math.exp(min(self.nll / max(self.tokens, 1), 700)):.4g}"}
            if left is not None:
                shown["left"] = duration(left)
            self.bar.set_postfix(shown, refresh=False)

    def seconds_left(self) -> float | None:
        """The scoring time left for what is planned so far: its cost left at the cost per second measured since the
        first batch (tokens per second without `costs`), or over the first batch while it is the only one; None
        before a batch is scored."""
        if self.started is None:
            return None
        now = time.perf_counter()
        since, cost, tokens = self.warm if self.warm and now > self.warm[0] else (self.started, 0.0, 0)
        elapsed = max(now - since, 1e-9)
        if self.costs is not None and self.cost_done > cost:
            return max(self.cost_planned - self.cost_done, 0.0) * elapsed / (self.cost_done - cost)
        if self.costs is None and self.tokens > tokens:
            return max(self.planned - self.counted, 0) * elapsed / (self.tokens - tokens)
        return None

    def _say_estimate(self, left: float) -> None:
        """The first estimate; then a new one when the total it gives moved by more than a fifth, at most once a
        minute."""
        now = time.perf_counter()
        total = now - self.started + left
        if self.said is not None and (now - self.said[0] < 60 or abs(total - self.said[1]) <= 0.2 * self.said[1]):
            return
        again = " (updated)" if self.said is not None else ""
        self.said, self.estimate_wanted = (now, total), False
        log.warning("estimated scoring time%s: about %s left for the %s tokens left of those planned so far (from "
                    "the windows' cost, at the rate of the batches scored so far)", again, duration(left),
                    f"{self.planned - self.counted:,}")

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
