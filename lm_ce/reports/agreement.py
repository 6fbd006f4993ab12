"""Two multiple-choice runs compared item by item (lm-ce compare): the same prediction how often, which items each
gets right, and the difference of their accuracies with its standard error paired by item (each item one cluster:
SE^2 = n/(n-1) * sum_i (d_i - D)^2 / n^2, d_i = B's outcome minus A's)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lm_ce.sums.stats import paired


def choice_agreement(rows: list[tuple[dict, dict]]) -> dict:
    """Two multiple-choice runs item by item: how often they predict the same choice, which items each gets right,
    and B's accuracy minus A's with its standard error paired by item."""
    n = len(rows)
    correct = {m: (np.array([x[m] for x, _ in rows], np.float64), np.array([y[m] for _, y in rows], np.float64))
               for m in ("acc", "acc_norm")}
    a, b = correct["acc"]
    out = {"items": n, "same_pred": sum(x["pred"] == y["pred"] for x, y in rows) / n,
           "same_pred_norm": sum(x["pred_norm"] == y["pred_norm"] for x, y in rows) / n,
           "acc_a": float(a.mean()), "acc_b": float(b.mean()), "both_correct": int((a * b).sum()),
           "only_a_correct": int((a * (1 - b)).sum()), "only_b_correct": int(((1 - a) * b).sum()),
           "neither_correct": int(((1 - a) * (1 - b)).sum())}
    for m, (x, y) in correct.items():
        out[f"delta_{m}"] = paired(x, y, np.ones(n))
    return out


def agreement_lines(agree: dict, delta: Callable[[dict], str]) -> list[str]:
    """comparison.md's section of two multiple-choice runs (`delta` writes a paired difference)."""
    return ["", "## Multiple choice, item by item", "", "| | value |", "|---|---|", f"| items | {agree['items']} |",
            f"| same prediction (acc / acc_norm) | {agree['same_pred']:.4g} / {agree['same_pred_norm']:.4g} |",
            f"| acc A, B | {agree['acc_a']:.4g}, {agree['acc_b']:.4g} |",
            f"| B − A acc | {delta(agree['delta_acc'])} |",
            f"| B − A acc_norm | {delta(agree['delta_acc_norm'])} |",
            f"| both right / only A / only B / neither | {agree['both_correct']} / {agree['only_a_correct']} / "
            f"{agree['only_b_correct']} / {agree['neither_correct']} |"]


def task_identity(a: dict, b: dict) -> list[tuple[str, object, object]]:
    """(key, A's, B's) of what a task's figures are defined by: the task, and a multiple-choice protocol and layout."""
    out = [("settings.task", a["settings"].get("task", "perplexity"), b["settings"].get("task", "perplexity"))]
    x, y = a.get("multiple_choice") or {}, b.get("multiple_choice") or {}
    out += [(f"multiple_choice.{k}", x.get(k), y.get(k)) for k in ("protocol", "layout")]
    return out
