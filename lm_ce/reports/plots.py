"""The run's PNG plots: the loss by position in the window, and the perplexity against context length.

Drawn on a `matplotlib.figure.Figure` of their own, without pyplot: the caller's backend (a notebook's inline
plots), its current figure and its list of open figures stay as they were. The layout is matplotlib's
constrained layout, and long titles and labels are wrapped, so that no text is cut at the figure's edges."""
from __future__ import annotations

import textwrap
from pathlib import Path

from lm_ce.files import atomic_path

TITLE_CHARS = 110  # a line of the 7-point title across the 7-inch figure
LABEL_CHARS = 80  # a line of a 10-point axis label


def plot_positions(positions, path: Path, caption: str) -> bool:
    """Mean loss against the position in the window (the long-context check), as a PNG; False without matplotlib."""
    fig = positions_figure(positions, caption)
    return fig is not None and _save(fig, path)


def positions_figure(positions, caption: str):
    """The figure of position_loss.png (None without matplotlib)."""
    fig = _figure()
    if fig is None:
        return None
    seen = positions.count > 0
    x = seen.nonzero().squeeze(1)
    mean = positions.nll[seen] / positions.count[seen]
    ax = fig.subplots()
    ax.plot(x.numpy(), mean.numpy(), lw=0.6, alpha=0.4, label="per position")
    buckets = [(sum(b["positions"]) / 2, b["mean_loss"]) for b in positions.buckets()]
    ax.plot([b[0] for b in buckets], [b[1] for b in buckets], "o-", label="powers-of-two buckets")
    ax.set_xscale("symlog")
    if len(x):
        ticks = position_ticks(int(x.min()), int(x.max()))
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel(_wrap("position in the window (tokens of context before the prediction)", LABEL_CHARS))
    ax.set_ylabel("mean loss (nats/token)")
    ax.set_title(_wrap(caption, TITLE_CHARS), fontsize=7)
    ax.legend()
    return fig


def position_ticks(first: int, last: int) -> list[int]:
    """Tick positions on the symlog axis: 0 and the powers of two from first to last, with the ends themselves
    where fewer than three fall inside (a llama-cpp run scores only the positions 256-511)."""
    ticks = ([0] if first == 0 else []) + [2 ** k for k in range(last.bit_length() + 1) if first <= 2 ** k <= last]
    if len(ticks) < 3:
        ticks = sorted({first, *ticks, last})
    return ticks


def plot_curve(curve: dict, path: Path, caption: str) -> bool:
    """Mean loss of the same targets against the context length (--context-curve), as a PNG; False without matplotlib."""
    fig = curve_figure(curve, caption)
    return fig is not None and _save(fig, path)


def curve_figure(curve: dict, caption: str):
    """The figure of context_curve.png (None without matplotlib)."""
    fig = _figure()
    if fig is None:
        return None
    ax = fig.subplots()
    ax.plot(curve["lengths"], curve["mean_loss"], "o-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(curve["lengths"], [str(n) for n in curve["lengths"]])
    ax.minorticks_off()
    ax.set_xlabel(_wrap("context length L (tokens of context, at most one stride less; results.json: "
                        "context_curve.context)", LABEL_CHARS))
    ax.set_ylabel("mean loss (nats/token)")
    ax.set_title(_wrap(f"{caption}\n{curve['tokens'][0]:,} targets: {curve['targets']}", TITLE_CHARS), fontsize=7)
    return fig


def _wrap(text: str, width: int) -> str:
    """Each line of `text` wrapped to `width` characters (a long path is broken too)."""
    return "\n".join(textwrap.fill(line, width) or line for line in text.split("\n"))


def _save(fig, path: Path) -> bool:
    with atomic_path(path, suffix=".png") as tmp:  # matplotlib reads the format from the name
        fig.savefig(tmp, dpi=120)  # a Figure without pyplot draws PNGs with Agg, whatever the backend
    return True


def _figure():
    """A 7 x 4 inch Figure in constrained layout, not registered with pyplot; None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(figsize=(7, 4), layout="constrained")
