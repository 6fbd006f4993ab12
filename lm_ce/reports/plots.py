"""The run's PNG plots: the loss by position in the window, and the perplexity against context length.

Drawn on a `matplotlib.figure.Figure` of their own, without pyplot: the caller's backend (a notebook's inline
plots), its current figure and its list of open figures stay as they were."""
from __future__ import annotations

from pathlib import Path

from lm_ce.files import atomic_path


def plot_positions(positions, path: Path, caption: str) -> bool:
    """Mean loss against the position in the window (the long-context check), as a PNG; False without matplotlib."""
    fig = _figure()
    if fig is None:
        return False
    seen = positions.count > 0
    x = seen.nonzero().squeeze(1)
    mean = positions.nll[seen] / positions.count[seen]
    ax = fig.subplots()
    ax.plot(x.numpy(), mean.numpy(), lw=0.6, alpha=0.4, label="per position")
    buckets = [(sum(b["positions"]) / 2, b["mean_loss"]) for b in positions.buckets()]
    ax.plot([b[0] for b in buckets], [b[1] for b in buckets], "o-", label="powers-of-two buckets")
    ax.set_xscale("symlog")
    ax.set_xlabel("position in the window (tokens of context before the prediction)")
    ax.set_ylabel("mean loss (nats/token)")
    ax.set_title(caption, fontsize=7)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:  # matplotlib reads the format from the name
        fig.savefig(tmp, dpi=120)  # a Figure without pyplot draws PNGs with Agg, whatever the backend
    return True


def plot_curve(curve: dict, path: Path, caption: str) -> bool:
    """Mean loss of the same targets against the context length (--context-curve), as a PNG; False without matplotlib."""
    fig = _figure()
    if fig is None:
        return False
    ax = fig.subplots()
    ax.plot(curve["lengths"], curve["mean_loss"], "o-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(curve["lengths"], [str(n) for n in curve["lengths"]])
    ax.minorticks_off()
    ax.set_xlabel("context length L (tokens of context, at most one stride less; results.json: context_curve.context)")
    ax.set_ylabel("mean loss (nats/token)")
    ax.set_title(f"{caption}\n{curve['tokens'][0]:,} targets: {curve['targets']}", fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:  # matplotlib reads the format from the name
        fig.savefig(tmp, dpi=120)  # a Figure without pyplot draws PNGs with Agg, whatever the backend
    return True


def _figure():
    """A 7 x 4 inch Figure, not registered with pyplot; None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(figsize=(7, 4))
