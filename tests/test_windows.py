"""lm_ce.scoring.windows on small hand-checked cases: spans, window records, batches and their shares."""
from __future__ import annotations

import itertools
import random

import pytest

from lm_ce.scoring.windows import MAX_PADDING, assign_batches, document_spans, plan_batches, stream_spans, windows_of

from .reference import document_windows, stream_windows


def test_document_spans_by_hand():
    # S = [prefix] + 10 tokens, windows of 4 (lm-eval's rolling windows): targets 1..10
    assert document_spans(11, 1, 4, 4) == [(0, 0, 4), (4, 4, 8), (6, 8, 10)]
    # stride 2: every later window keeps 2 tokens of context before its 2 new targets
    assert document_spans(11, 1, 4, 2) == [(0, 0, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]
    # a prompt of 6 tokens (targets from 7) longer than a window: the first window ends `stride` past it
    assert document_spans(12, 7, 4, 2) == [(4, 6, 8), (6, 8, 10), (7, 10, 11)]
    # a prompt shorter than a window: the first window still scores up to max_length
    assert document_spans(9, 3, 4, 4) == [(0, 2, 4), (4, 4, 8)]


def test_document_spans_edges():
    assert document_spans(0, 1, 4, 4) == []
    assert document_spans(1, 1, 4, 4) == []  # one token: nothing before it
    assert document_spans(2, 1, 4, 4) == [(0, 0, 1)]
    assert document_spans(5, 5, 4, 4) == []  # the prompt is the whole sequence
    assert document_spans(5, 0, 4, 4) == [(0, 0, 4)]  # S[0] is never a target, even if asked


def test_stream_spans_by_hand():
    # overlapping: one window every 2 tokens, each scoring what the earlier ones did not
    assert stream_spans(10, 4, 2) == [(0, 0, 3), (2, 3, 5), (4, 5, 7), (6, 7, 9)]
    # disjoint: each window's first token has no context and is not scored (S[4], S[8])
    assert stream_spans(10, 4, 4) == [(0, 0, 3), (4, 4, 7), (8, 8, 9)]
    assert stream_spans(0, 4, 2) == []
    assert stream_spans(1, 4, 2) == []
    assert stream_spans(2, 4, 2) == [(0, 0, 1)]
    assert stream_spans(3, 4, 100) == [(0, 0, 2)]


def test_spans_agree_with_the_reference():
    """The package's rules against the independent reference (tests/reference.py) on many shapes."""
    for n_seq, max_length in itertools.product([0, 1, 2, 3, 5, 8, 9, 17, 33, 64, 65], [1, 2, 3, 4, 8, 16]):
        for stride in sorted({1, max(1, max_length // 2), max_length}):
            for first in sorted({1, 2, max_length, max_length + 3, n_seq - 1} - {0, -1}):
                case = (n_seq, first, max_length, stride)
                spans = document_spans(n_seq, first, max_length, stride)
                assert spans == document_windows(n_seq, first, max_length, stride), case
                assert [j for _, a, b in spans for j in range(a + 1, b + 1)] == list(range(first, n_seq)), case
            assert stream_spans(n_seq, max_length, stride) == stream_windows(n_seq, max_length, stride)


def predictions(window) -> list[tuple[int, int]]:
    """(target index in S, tokens of context it is predicted from) for each scored input position."""
    out = []
    for i in range(window.n_context, window.length):  # input position i holds S[start+i] and predicts S[start+i+1]
        target = window.start + i + 1
        out.append((target, target - window.start))
    return out


def test_windows_of_records_and_context_positions():
    seq = list(range(100, 111))  # 11 tokens; values differ from indices
    spans = [(0, 0, 4), (4, 4, 8), (6, 8, 10)]
    windows = windows_of(7, seq, spans)
    assert [(w.doc, w.start, w.a, w.b) for w in windows] == [(7, 0, 0, 4), (7, 4, 4, 8), (7, 6, 8, 10)]
    assert [w.length for w in windows] == [4, 4, 4]
    assert [w.n_context for w in windows] == [0, 0, 2]
    assert [w.n_scored for w in windows] == [4, 4, 2]
    assert [w.target_offset for w in windows] == [0, 4, 8]  # targets of the document before each window
    assert windows[0].seq.tolist() == seq and windows[2].seq is windows[0].seq  # one tensor per document
    # the input S[start:b] and the targets S[a+1..b] of the last window
    last = windows[2]
    assert last.seq[last.start : last.b].tolist() == [106, 107, 108, 109]
    assert last.seq[last.a + 1 : last.b + 1].tolist() == [109, 110]
    scored = [p for w in windows for p in predictions(w)]
    assert [t for t, _ in scored] == list(range(1, 11))  # every target once, in order
    # the last window's targets S[9], S[10] see 3 and 4 tokens; targets 5..8 only those since S[4]
    assert scored == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 1), (6, 2), (7, 3), (8, 4), (9, 3), (10, 4)]


def test_later_windows_keep_at_least_max_length_minus_stride_of_context():
    n_seq, max_length, stride = 40, 8, 3
    windows = windows_of(0, list(range(n_seq)), document_spans(n_seq, 1, max_length, stride))
    assert [w.n_scored for w in windows] == [8] + [3] * 10 + [1]  # 39 targets
    for w in windows[1:]:
        least = min(context for _, context in predictions(w))
        assert least == (max_length - stride + 1 if w.n_scored == stride else max_length)
    offsets = [w.target_offset for w in windows]
    assert offsets == [sum(w.n_scored for w in windows[:i]) for i in range(len(windows))]


def windows_of_lengths(lengths: list[int]) -> list:
    """One single-window document per input length (doc = its position), scoring every input position."""
    return [windows_of(i, list(range(n + 1)), [(0, 0, n)])[0] for i, n in enumerate(lengths)]


def shape(batches) -> list[list[int]]:
    return [[w.length for w in batch] for batch in batches]


def test_plan_batches_longest_first_and_padding_rule():
    windows = windows_of_lengths([5, 10, 4, 9, 10])
    # 10,10,9: 1 pad of 30 slots; adding 5 would make 11 of 40 (> 10%); 5,4: 1 of 10 (= 10%, allowed)
    assert shape(plan_batches(windows, 8, 1000)) == [[10, 10, 9], [5, 4]]
    assert shape(plan_batches(windows_of_lengths([10, 8]), 8, 1000)) == [[10, 8]]  # 2 of 20 slots: exactly 10%
    assert shape(plan_batches(windows_of_lengths([10, 7]), 8, 1000)) == [[10], [7]]  # 3 of 20: over
    assert MAX_PADDING == 0.1


def test_plan_batches_size_and_budget():
    windows = windows_of_lengths([10] * 5)
    assert shape(plan_batches(windows, 2, 1000)) == [[10, 10], [10, 10], [10]]
    assert shape(plan_batches(windows, 8, 25)) == [[10, 10], [10, 10], [10]]  # 3 windows would be 30 tokens
    assert shape(plan_batches(windows, 8, 50)) == [[10] * 5]
    assert shape(plan_batches(windows_of_lengths([50, 3]), 8, 10)) == [[50], [3]]  # too long for the budget: alone
    # equal lengths are ordered by document: the plan does not depend on the order given
    shuffled = plan_batches(list(reversed(windows)), 2, 1000)
    assert [[w.doc for w in b] for b in shuffled] == [[0, 1], [2, 3], [4]]


def test_plan_batches_properties():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(2, 64) for _ in range(rng.randint(1, 40))]
        batch_size, budget = rng.randint(1, 9), rng.randint(16, 300)
        windows = windows_of_lengths(lengths)
        batches = plan_batches(windows, batch_size, budget)
        assert sorted(id(w) for b in batches for w in b) == sorted(id(w) for w in windows)  # each once
        widths = [max(w.length for w in b) for b in batches]
        assert widths == sorted(widths, reverse=True)
        for batch, width in zip(batches, widths):
            assert len(batch) <= batch_size
            slots = len(batch) * width
            assert len(batch) == 1 or slots <= budget
            assert slots - sum(w.length for w in batch) <= MAX_PADDING * slots


def batches_of(tokens: list[int]) -> list[list]:
    """Batches holding one window each, of these lengths."""
    return [[w] for w in windows_of_lengths(tokens)]


def test_assign_batches_by_hand():
    batches = batches_of([40, 30, 20, 10, 10])
    shares = assign_batches(batches, 2)
    # 40 -> 0; 30 -> 1; 20 -> 1 (30 < 40); 10 -> 0 (40 < 50); 10 -> 0 (50 = 50: the lower rank)
    assert shares == [[batches[0], batches[3], batches[4]], [batches[1], batches[2], None]]
    assert assign_batches(batches, 1) == [batches]
    assert assign_batches(batches[:1], 3) == [[batches[0]], [None], [None]]


def test_assign_batches_properties():
    rng = random.Random(1)
    for _ in range(100):
        batches = batches_of(sorted((rng.randint(2, 100) for _ in range(rng.randint(1, 30))), reverse=True))
        world = rng.randint(1, 5)
        shares = assign_batches(batches, world)
        assert len(shares) == world
        assert len({len(s) for s in shares}) == 1  # equal step counts: no process waits in a collective
        taken = [b for s in shares for b in s if b is not None]
        assert sorted(map(id, taken)) == sorted(map(id, batches))  # each batch exactly once
        for s in shares:
            real = [b for b in s if b is not None]
            assert s == real + [None] * (len(s) - len(real))  # padding only at the end
        loads = [sum(w.length for b in s if b for w in b) for s in shares]
        assert max(loads) - min(loads) <= max(w.length for b in batches for w in b)  # greedy: within one batch


@pytest.mark.parametrize("world", [2, 3])
def test_assign_batches_empty(world):
    assert assign_batches([], world) == [[] for _ in range(world)]
