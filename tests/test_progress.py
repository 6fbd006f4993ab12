"""The time left: estimated from the planned batches' cost (body per input token, attention per pair of positions,
head per scored token), calibrated on the batches scored so far, so that a first batch unlike the rest (a document's
first window scores all its tokens, the next ones a stride each) does not set it."""
from __future__ import annotations

import math

import pytest
import torch

from lm_ce.scoring import progress as progress_lib
from lm_ce.scoring.progress import Costs, Progress
from lm_ce.scoring.windows import Window, plan_batches

COSTS = Costs(body=1000.0, attention=20.0, head=500.0)


def windows(max_length: int, stride: int, docs: int, length: int) -> list[Window]:
    """Document mode's windows: the first scores max_length tokens, each next one `stride`."""
    out = []
    for d in range(docs):
        seq = torch.arange(length)
        out.append(Window(doc=d, seq=seq, start=0, a=0, b=max_length, target_offset=0))
        for b in range(max_length + stride, length + 1, stride):
            out.append(Window(doc=d, seq=seq, start=b - max_length, a=b - stride, b=b, target_offset=b - stride))
    return out


def test_a_batch_costs_its_padded_inputs_pairs_and_scored_tokens():
    seq = torch.arange(100)
    batch = [Window(0, seq, 0, 0, 64, 0), Window(0, seq, 30, 62, 64, 62)]  # 64 and 34 long: padded to 64
    width, rows, scored = 64, 2, 64 + 2
    assert COSTS.batch(batch) == rows * width * (1000 + width * 20) + scored * 500
    assert COSTS.batch([]) == 0


def test_costs_from_a_model(tiny_llama):
    model = tiny_llama[0] if isinstance(tiny_llama, tuple) else tiny_llama
    config = model.config
    costs = Costs.of(model)
    tables = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())}
    assert costs.body == sum(p.numel() for p in model.parameters()) - sum(tables.values())
    assert costs.attention == 2 * config.hidden_size * config.num_hidden_layers
    assert costs.head == config.hidden_size * config.vocab_size


@pytest.mark.parametrize("stride", [2, 8, 64])
def test_the_estimate_after_the_first_batch_is_the_time_left(monkeypatch, stride):
    """A clock where each batch takes its cost: after the first batch the estimate is the time the rest takes,
    where the tokens scored per second of the first batch would be off many times over at a small stride."""
    batches = plan_batches(windows(128, stride, docs=6, length=600), batch_size=8, token_budget=8 * 128)
    seconds = [COSTS.batch(b) * 1e-6 for b in batches]
    clock = [0.0]
    monkeypatch.setattr(progress_lib.time, "perf_counter", lambda: clock[0])
    progress = Progress(False, costs=COSTS)
    progress.add_total(sum(w.n_scored for b in batches for w in b), cost=sum(COSTS.batch(b) for b in batches))
    clock[0] += seconds[0]
    first = sum(w.n_scored for w in batches[0])
    progress.update(first, 1.0, COSTS.batch(batches[0]))
    truth = sum(seconds[1:])
    assert math.isclose(progress.seconds_left(), truth, rel_tol=1e-9)
    by_tokens = (progress.planned - first) / (first / seconds[0])  # the estimate before: the first batch's token rate
    if stride < 64:
        assert by_tokens < truth / 2  # what a new user saw: 18 s estimated, 472 s taken
    for batch, spent in zip(batches[1:], seconds[1:]):  # and it stays right as the run goes
        clock[0] += spent
        progress.update(sum(w.n_scored for w in batch), 1.0, COSTS.batch(batch))
        left = clock[0]
        assert math.isclose(progress.seconds_left(), sum(seconds) - left, rel_tol=1e-6, abs_tol=1e-9)
    assert progress.estimates[-1][1] == pytest.approx(0.0, abs=1e-9)


def test_without_costs_the_tokens_set_the_rate(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress_lib.time, "perf_counter", lambda: clock[0])
    progress = Progress(False)
    progress.add_total(1000)
    assert progress.seconds_left() is None  # nothing scored yet
    clock[0] = 10.0
    progress.update(100, 1.0)
    assert math.isclose(progress.seconds_left(), 90.0)


def test_the_estimate_is_said_then_said_again_when_it_moves(monkeypatch, caplog):
    clock = [0.0]
    monkeypatch.setattr(progress_lib.time, "perf_counter", lambda: clock[0])
    progress = Progress(False, costs=COSTS)
    progress.add_total(300, cost=300.0)
    progress.estimate_after_next_batch()
    with caplog.at_level("WARNING", logger="lm_ce"):
        clock[0] = 1.0
        progress.update(100, 1.0, 100.0)  # 1 s per 100: 2 s left
        clock[0] = 2.0
        progress.update(100, 1.0, 100.0)  # on course: nothing more said
        clock[0] = 200.0
        progress.update(50, 1.0, 50.0)  # much slower, and a minute on: said again
    said = [r.getMessage() for r in caplog.records if "estimated scoring time" in r.getMessage()]
    assert len(said) == 2 and "about 1 s left" in said[0] and said[1].startswith("estimated scoring time (updated)")


def test_the_first_batch_warm_up_is_left_out(monkeypatch):
    """The first batch also pays for first calls and allocations: the rate is measured from its end on."""
    clock = [0.0]
    monkeypatch.setattr(progress_lib.time, "perf_counter", lambda: clock[0])
    progress = Progress(False, costs=COSTS)
    progress.add_total(1000, cost=1000.0)
    clock[0] = 10.0  # ten times what its cost takes
    progress.update(100, 1.0, 100.0)
    clock[0] = 11.0
    progress.update(100, 1.0, 100.0)  # 1 s per 100 from here on: 8 s left
    assert math.isclose(progress.seconds_left(), 8.0) and progress.estimates == [(11.0, 8.0)]
