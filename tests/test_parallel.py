"""lm_ce.scoring.parallel without processes: batch sizes, which share each process takes, and canonical sums."""
from __future__ import annotations

import random

import pytest

from lm_ce.scoring.parallel import batch_size_for, canonical_sums, share_of
from lm_ce.scoring.windows import assign_batches, document_spans, plan_batches, windows_of
from lm_ce.sums.records import DocSums, Tally, WindowSums


@pytest.mark.parametrize(
    "batch_size, n_windows, world, expected",
    [
        (8, 3, 1, 8),  # one process: as configured
        (8, 100, 2, 8),  # plenty of windows: as configured
        (8, 10, 2, 3),  # 10 windows over 2 processes: at least 2 batches each, ceil(10 / 4)
        (8, 3, 2, 1),
        (8, 1, 4, 1),  # never below 1
        (2, 9, 3, 2),  # ceil(9 / 6) = 2
        (5, 13, 3, 3),  # ceil(13 / 6) = 3
    ],
)
def test_batch_size_for(batch_size, n_windows, world, expected):
    assert batch_size_for(batch_size, n_windows, world) == expected


class Scored:
    """A window stand-in: share_of reads only how many tokens it scores."""

    def __init__(self, n_scored: int):
        self.n_scored = n_scored


def test_share_of_by_hand():
    # shares weigh 12, 3 and 7 tokens (padding steps weigh nothing)
    shares = [[[Scored(5), Scored(5)], [Scored(2)]], [[Scored(3)], None], [[Scored(7)], None]]
    assert [share_of(r, shares, []) for r in range(3)] == [0, 2, 1]  # heaviest to rank 0, then 1, then 2
    assert [share_of(r, shares, [50, 10, 30]) for r in range(3)] == [1, 0, 2]  # heaviest to the least loaded (1)
    assert [share_of(r, shares, [10, 10, 5]) for r in range(3)] == [2, 1, 0]  # ties go to the lower rank
    # equal weights: the lower share to the less loaded process
    assert [share_of(r, [[[Scored(4)]], [[Scored(4)]]], [9, 1]) for r in range(2)] == [1, 0]


def test_every_share_is_taken_once():
    rng = random.Random(3)
    for _ in range(200):
        world = rng.randint(1, 6)
        shares = [[[Scored(rng.randint(1, 9))] for _ in range(rng.randint(0, 3))] for _ in range(world)]
        done = [rng.choice([0, 5, 10]) for _ in range(world)]
        picks = [share_of(r, shares, done) for r in range(world)]
        assert sorted(picks) == list(range(world)), (shares, done, picks)


def tally_of(windows: list[WindowSums]) -> Tally:
    """A tally as scoring leaves it: each window's sums added to its document's, in the order given."""
    t = Tally()
    for w in windows:
        t.doc(w.doc).add(DocSums(nll=w.nll, tokens=w.tokens, sum_sq=w.nll * w.nll))
    t.windows = list(windows)
    return t


def random_windows(rng: random.Random, n_docs: int) -> list[WindowSums]:
    """Window sums of several documents, with magnitudes far apart so that the order of addition shows."""
    out = []
    for doc in range(n_docs):
        target = 0
        for _ in range(rng.randint(1, 8)):
            tokens = rng.randint(1, 50)
            out.append(WindowSums(doc=doc, first_target=target, nll=rng.choice([1e-3, 1.0, 1e8, 3e15]) * rng.random(),
                                  tokens=tokens))
            target += tokens
    return out


def in_target_order(windows: list[WindowSums]) -> dict[int, float]:
    sums: dict[int, float] = {}
    for w in sorted(windows, key=lambda w: w.first_target):
        sums[w.doc] = sums.get(w.doc, 0.0) + w.nll
    return sums


def test_canonical_sums_do_not_depend_on_order_or_split():
    rng = random.Random(7)
    differed = 0
    for _ in range(100):
        windows = random_windows(rng, rng.randint(1, 4))
        expected = in_target_order(windows)
        shuffled = windows[:]
        rng.shuffle(shuffled)
        world = rng.randint(1, 4)
        merged = Tally()
        for rank in range(world):  # each process's windows, merged in rank order
            merged.merge(tally_of(shuffled[rank::world]))
        differed += any(merged.docs[d].nll != expected[d] for d in expected)
        canonical_sums(merged)
        assert {d: s.nll for d, s in merged.docs.items()} == expected  # exactly, not approximately
        assert {d: s.tokens for d, s in merged.docs.items()} == {
            d: sum(w.tokens for w in windows if w.doc == d) for d in expected}
        assert merged.windows == sorted(windows, key=lambda w: (w.doc, w.first_target))
    assert differed > 10  # the cases are ones where merging alone rounds differently


def test_processes_give_the_same_sums_as_one():
    """Plan, balance and pick shares as every process would, score windows with fixed fake losses, merge in rank
    order: the canonical sums are those of one process, and every window is scored by exactly one process."""
    rng = random.Random(11)
    lengths = [rng.randint(2, 90) for _ in range(9)]
    windows = [w for doc, n in enumerate(lengths)
               for w in windows_of(doc, list(range(n)), document_spans(n, 1, 16, rng.choice([8, 16])))]
    loss = {(w.doc, w.target_offset): rng.choice([1e-3, 1.0, 1e9]) * rng.random() for w in windows}

    def run(world: int, done: list[int]) -> Tally:
        batches = plan_batches(windows, batch_size_for(4, len(windows), world), 64)
        shares = assign_batches(batches, world)
        merged, scored = Tally(), []
        for rank in range(world):
            mine = shares[share_of(rank, shares, done)]
            part = [WindowSums(w.doc, w.target_offset, loss[w.doc, w.target_offset], w.n_scored)
                    for batch in mine if batch for w in batch]
            scored += part
            merged.merge(tally_of(part))
        assert sorted((w.doc, w.first_target) for w in scored) == sorted(loss)
        canonical_sums(merged)
        return merged

    one = run(1, [])
    for world, done in [(2, []), (3, [0, 40, 7]), (4, [5, 5, 5, 5])]:
        many = run(world, done)
        assert {d: s.nll for d, s in many.docs.items()} == {d: s.nll for d, s in one.docs.items()}
        assert {d: s.tokens for d, s in many.docs.items()} == {d: s.tokens for d, s in one.docs.items()}
    assert one.tokens == sum(w.n_scored for w in windows)
