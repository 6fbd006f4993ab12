"""The run's PNG plots: the loss by position in the window, and the perplexity against context length."""
from __future__ import annotations

from pathlib import Path

from lm_ce.files import atomic_path


def plot_positions(positions, path: Path, caption: str) -> bool:
    """Mean loss against the position in the window (the long-context check), as a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    seen = positions.count > 0
    x = seen.nonzero().squeeze(1)
    mean = positions.nll[seen] / positions.count[seen]
    fig, ax = plt.subplots(figsize=(7, 4))
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
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return True


def plot_curve(curve: dict, path: Path, caption: str) -> bool:
    """Mean loss of the same targets against the context length (--context-curve), as a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(curve["lengths"], curve["mean_loss"], "o-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(curve["lengths"], [str(n) for n in curve["lengths"]])
    ax.minorticks_off()
    ax.set_xlabel("context length L (tokens of context, at most one stride less; results.json: context_curve.context)")
    ax.set_ylabel("mean loss (nats/token)")
    ax.set_title(f"{caption}\n{curve['tokens'][0]:,} targets: {curve['targets']}", fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:  # matplotlib reads the format from the name
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return True
