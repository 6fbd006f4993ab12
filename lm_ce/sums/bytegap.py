"""Two models' losses byte by byte: each token group's loss spread over its bytes (scoring/bytespans.py says how a
token's byte span is found), the bits-per-byte gap B − A per document, group and byte class, and the spans where
the gap is largest.

Every byte of a document's text gets one class (its character's), so the classes' contributions add up to the
gap; every scored token's loss lands on bytes, so a document's byte losses add up to its NLL. Sums over spans
whose ends are token boundaries in both tokenizations ("aligned spans") do not depend on how a token's loss is
spread over its bytes; the class split does (uniformly, here).
"""
from __future__ import annotations

import heapq
import math
import re
import string
from dataclasses import dataclass, field

import numpy as np

from lm_ce.errors import UsageError
from lm_ce.sums.stats import NULL_GROUP

LN2 = math.log(2)
BUILTIN = ("url", "newline", "whitespace", "digits", "letters", "punctuation", "non_ascii", "other")
URL = re.compile(r"(?:\b(?:https?|ftp)://|\bwww\.)[^\s<>\"'`]+", re.IGNORECASE)
_WHITESPACE = frozenset(c for c in range(0x3001) if chr(c).isspace() and c not in (10, 13))
_PUNCTUATION = frozenset(ord(c) for c in string.punctuation)
TOP = 20  # aligned spans listed
SHOWN_BYTES = 4000  # bytes of a heatmap document shown
HEATMAP = 5  # documents of each sign in the heatmap
MOST_CHANGED = 10  # documents listed by largest |Δ bits|
ATTRIBUTION = ("each scored token's loss spread uniformly over the bytes of its span in the scored text; tokens "
               "whose spans overlap (one character split across tokens) share their group's span; a token of no "
               "byte joins the next group")


def byte_losses(n_bytes: int, start: np.ndarray, end: np.ndarray, nll: np.ndarray) -> np.ndarray:
    """float64 loss of each byte: each group's summed NLL (its tokens share one span) spread uniformly over the
    group's bytes; bytes of no scored group get 0."""
    out = np.zeros(n_bytes, dtype=np.float64)
    if not len(start):
        return out
    starts, first, inverse = np.unique(start, return_index=True, return_inverse=True)
    sums = np.bincount(inverse, weights=np.asarray(nll, dtype=np.float64))
    widths = np.asarray(end)[first] - starts
    offsets = np.arange(int(widths.sum())) - np.repeat(np.cumsum(widths) - widths, widths)
    out[np.repeat(starts, widths) + offsets] = np.repeat(sums / widths, widths)
    return out


def url_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of URLs (scheme:// or www.), trailing punctuation and unbalanced closing brackets dropped."""
    out = []
    for m in URL.finditer(text):
        s, e = m.span()
        while e > s:
            body, last = text[s:e], text[e - 1]
            if last in ".,;:!?'\"" or (last == ")" and body.count(")") > body.count("(")) or (
                    last == "]" and body.count("]") > body.count("[")):
                e -= 1
            else:
                break
        out.append((s, e))
    return out


def char_classes(text: str, user: list[tuple[str, re.Pattern]] = ()) -> tuple[list[str], np.ndarray]:
    """(class names, class index of every character). Precedence: the user's classes in their order (characters
    inside a non-empty match), url, then the character's own: newline (\\n, \\r), whitespace (any other
    str.isspace()), digits 0-9, letters A-Z a-z, ASCII punctuation, non_ascii (any other character from U+0080),
    other (ASCII control characters)."""
    names = [name for name, _ in user] + list(BUILTIN)
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    out = np.full(len(points), names.index("other"), dtype=np.int64)
    rules = [("non_ascii", points >= 0x80), ("punctuation", np.isin(points, list(_PUNCTUATION))),
             ("letters", ((points >= 65) & (points <= 90)) | ((points >= 97) & (points <= 122))),
             ("digits", (points >= 48) & (points <= 57)), ("whitespace", np.isin(points, list(_WHITESPACE))),
             ("newline", (points == 10) | (points == 13))]
    for name, mask in rules:  # lowest precedence first: later rules overwrite
        out[mask] = names.index(name)
    marked = np.zeros(len(points), dtype=bool)
    for name, spans in [*((n, [m.span() for m in p.finditer(text) if m.end() > m.start()]) for n, p in user),
                        ("url", url_spans(text))]:
        for s, e in spans:
            free = ~marked[s:e]
            out[s:e][free] = names.index(name)
            marked[s:e] = True
    return names, out


def byte_classes(text: str, user: list[tuple[str, re.Pattern]] = ()) -> tuple[list[str], np.ndarray]:
    """(class names, class index of every UTF-8 byte of the text): each byte takes its character's class."""
    names, per_char = char_classes(text, user)
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    sizes = 1 + (points >= 0x80).astype(np.int64) + (points >= 0x800) + (points >= 0x10000)
    return names, np.repeat(per_char, sizes)


def aligned_spans(a_start: np.ndarray, b_start: np.ndarray, n_bytes: int) -> np.ndarray:
    """[k, 2] byte ranges between the boundaries both tokenizations have (0 and n_bytes included): each a union of
    whole token groups of A and of B."""
    cuts = np.intersect1d(np.union1d(a_start, [0, n_bytes]), np.union1d(b_start, [0, n_bytes]))
    return np.stack([cuts[:-1], cuts[1:]], axis=1) if len(cuts) > 1 else np.zeros((0, 2), dtype=np.int64)


@dataclass
class Tokens:
    """One run's scored tokens of one document: group byte spans and NLL (nats)."""

    start: np.ndarray
    end: np.ndarray
    nll: np.ndarray


@dataclass
class Shown:
    """A document of the heatmap: each character with both models' bits on it, and where tokens begin."""

    index: int
    id: str | None
    gap_bits: float  # B − A over the whole document
    bits_per_byte_gap: float
    chars: list[str]
    bits_a: list[float]
    bits_b: list[float]
    cut_a: list[bool]  # a token group of A begins at this character
    cut_b: list[bool]
    more: bool  # the text goes on past the shown characters


@dataclass
class ByteGap:
    """The gap B − A accumulated document by document, over the bytes both runs divide by (`total_bytes`)."""

    user: list[tuple[str, re.Pattern]]
    total_bytes: int
    names: list[str] = field(default_factory=list)
    delta: dict[str, list[float]] = field(default_factory=dict)  # class -> per-document sums of ℓB − ℓA (nats)
    loss_a: dict[str, list[float]] = field(default_factory=dict)
    loss_b: dict[str, list[float]] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    spans: list = field(default_factory=list)  # heap of (|Δ bits|, n, span row)
    shown: list[Shown] = field(default_factory=list)
    worst_sum_error: float = 0.0  # largest |Σ byte losses − Σ token NLL| / Σ token NLL over documents and runs

    def __post_init__(self):
        self.names = [name for name, _ in self.user] + list(BUILTIN)
        for table in (self.delta, self.loss_a, self.loss_b):
            table.update({name: [] for name in self.names})
        self.count = {name: 0 for name in self.names}

    def add(self, index: int, text: str, a: Tokens, b: Tokens, show: dict | None = None) -> np.ndarray:
        """One document's scored text and both runs' tokens; returns the per-byte ℓB − ℓA. `show`: keep its
        characters for the heatmap ({'id':, 'gap_bits':, 'bits_per_byte_gap':})."""
        n = len(text.encode("utf-8"))
        la, lb = byte_losses(n, a.start, a.end, a.nll), byte_losses(n, b.start, b.end, b.nll)
        for run, losses in ((a, la), (b, lb)):
            want = math.fsum(np.asarray(run.nll, dtype=np.float64))
            if want:
                self.worst_sum_error = max(self.worst_sum_error, abs(math.fsum(losses) - want) / abs(want))
        _, classes = byte_classes(text, self.user)
        d = lb - la
        k = len(self.names)
        for table, values in ((self.delta, d), (self.loss_a, la), (self.loss_b, lb)):
            sums = np.bincount(classes, weights=values, minlength=k)
            for name, value in zip(self.names, sums):
                table[name].append(float(value))
        for name, c in zip(self.names, np.bincount(classes, minlength=k)):
            self.count[name] += int(c)
        self._spans(index, text, d, a, b)
        if show is not None:
            self.shown.append(_shown(index, text, la, lb, a, b, show))
        return d

    def _spans(self, index: int, text: str, d: np.ndarray, a: Tokens, b: Tokens) -> None:
        n = len(d)
        spans = aligned_spans(np.unique(a.start), np.unique(b.start), n)
        if not len(spans):
            return
        sums = np.add.reduceat(d, spans[:, 0]) / LN2 if n else np.zeros(0)
        raw = text.encode("utf-8")
        for k in np.argsort(-np.abs(sums))[:TOP]:
            s, e = int(spans[k, 0]), int(spans[k, 1])
            item = (abs(float(sums[k])), len(self.spans), {"index": index, "byte_start": s, "byte_end": e,
                                                           "delta_bits": float(sums[k]), "raw": raw, "a": a, "b": b})
            if len(self.spans) < TOP:
                heapq.heappush(self.spans, item)
            elif item[0] > self.spans[0][0]:
                heapq.heapreplace(self.spans, item)

    def top_spans(self) -> list[dict]:
        """The aligned spans of largest |Δ bits|: text, and each tokenization's boundaries marked with |."""
        out = []
        for _, _, row in sorted(self.spans, key=lambda t: (-t[0], t[1])):
            s, e, raw = row["byte_start"], row["byte_end"], row["raw"]
            out.append({"index": row["index"], "byte_start": s, "byte_end": e, "delta_bits": row["delta_bits"],
                        "text": raw[s:e].decode("utf-8", "replace"),
                        "tokens_a": _marked(raw, s, e, row["a"].start), "tokens_b": _marked(raw, s, e, row["b"].start)})
        return out

    def summary(self) -> dict:
        """comparison.json's `bytes`: the total gap and each class's contribution (they add up to it), bytes and the
        gap within each class, both runs' bits per byte on each class."""
        denom = self.total_bytes * LN2
        delta = {name: math.fsum(v) for name, v in self.delta.items()}
        gap = math.fsum(delta.values()) / denom if denom else None

        def per(name: str, table: dict) -> float | None:
            return math.fsum(table[name]) / (self.count[name] * LN2) if self.count[name] else None

        return {
            "gap_bits_per_byte": gap,
            "classes": {name: delta[name] / denom if denom else None for name in self.names},
            "class_bytes": dict(self.count),
            "class_gap_within": {name: per(name, self.delta) for name in self.names},
            "class_bits_per_byte_a": {name: per(name, self.loss_a) for name in self.names},
            "class_bits_per_byte_b": {name: per(name, self.loss_b) for name in self.names},
            "aligned_spans_top": self.top_spans(),
            "byte_sum_relative_error": self.worst_sum_error,
        }


def _marked(raw: bytes, s: int, e: int, starts: np.ndarray) -> str:
    """The bytes [s, e) as text with | where a token group begins (and at both ends)."""
    cuts = [int(c) for c in np.unique(starts) if s < c < e]
    pieces = [raw[x:y].decode("utf-8", "replace") for x, y in zip([s, *cuts], [*cuts, e])]
    return "|" + "|".join(pieces) + "|"


def _shown(index: int, text: str, la: np.ndarray, lb: np.ndarray, a: Tokens, b: Tokens, show: dict) -> Shown:
    """A heatmap document: its first SHOWN_BYTES bytes, character by character."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    sizes = 1 + (points >= 0x80).astype(np.int64) + (points >= 0x800) + (points >= 0x10000)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    keep = int(np.searchsorted(bounds[:-1], SHOWN_BYTES))
    offsets, stop = bounds[:keep], int(bounds[keep])
    bits_a = np.add.reduceat(la[:stop], offsets) / LN2 if keep else np.zeros(0)
    bits_b = np.add.reduceat(lb[:stop], offsets) / LN2 if keep else np.zeros(0)
    return Shown(index, show.get("id"), show["gap_bits"], show["bits_per_byte_gap"], list(text[:keep]),
                 bits_a.tolist(), bits_b.tolist(), np.isin(offsets, a.start).tolist(), np.isin(offsets, b.start).tolist(),
                 keep < len(text))


def user_classes(items: list[str] | None, source: str = "--byte-class") -> list[tuple[str, re.Pattern]]:
    """NAME=REGEX items as (name, compiled pattern), or a UsageError naming the bad item."""
    out = []
    for item in items or []:
        name, eq, pattern = item.partition("=")
        name = name.strip()
        if not eq or not name or not pattern:
            raise UsageError(f"{source} {item!r}: write NAME=REGEX, e.g. quotes=[\"“”]")
        if name in BUILTIN or name in [n for n, _ in out]:
            raise UsageError(f"{source} {item!r}: the class name '{name}' is taken (built in: {', '.join(BUILTIN)}); "
                             "give each class its own name")
        try:
            out.append((name, re.compile(pattern)))
        except re.error as e:
            raise UsageError(f"{source} {item!r}: not a regular expression ({e})") from None
    return out


def by_document(columns: dict) -> dict[int, Tokens]:
    """Each document's scored tokens from token columns (doc, position, nll, byte_start, byte_end: arrays or lists)."""
    cols = {k: np.asarray(columns[k]) for k in ("doc", "position", "nll", "byte_start", "byte_end")}
    order = np.lexsort((cols["position"], cols["doc"]))
    cols = {k: v[order] for k, v in cols.items()}
    docs, first = np.unique(cols["doc"], return_index=True)
    bounds = [*first.tolist(), len(order)]
    return {int(d): Tokens(cols["byte_start"][s:e], cols["byte_end"][s:e], cols["nll"][s:e].astype(np.float64))
            for d, s, e in zip(docs, bounds, bounds[1:])}


def compare_documents(pairs: list[tuple[dict, dict]], tokens: tuple[dict, dict], texts: dict[int, str],
                      user: list[tuple[str, re.Pattern]]) -> tuple[dict, list[dict], list[Shown]]:
    """(the `bytes` block, one row per document, the heatmap's documents) of documents both runs scored: `pairs`
    their rows (index, id, group, bytes, nll_sum) in A and B, `tokens` each run's `by_document`, `texts` the scored
    texts. The block's gap is over the rows' bytes, as the runs' bits per byte are."""
    total = sum(x["bytes"] for x, _ in pairs)
    delta = {x["index"]: y["nll_sum"] - x["nll_sum"] for x, y in pairs}
    ranked = sorted(delta, key=lambda i: delta[i])
    shown = set(ranked[:HEATMAP]) | set(ranked[::-1][:HEATMAP])
    gap = ByteGap(user, total)
    rows = []
    for x, _ in pairs:
        i, n_bytes = x["index"], x["bytes"]
        text = texts.get(i)
        if text is None or i not in tokens[0] or i not in tokens[1]:
            raise UsageError(f"document {i}: its text or tokens are missing; compare finished runs of the same data")
        size = len(text.encode("utf-8"))
        if any(len(t[i].end) and (int(t[i].end.max()) > size or int(t[i].start.min()) < 0) for t in tokens):
            raise UsageError(f"document {i}: the runs scored bytes its text does not have now ({size} bytes): the data "
                             "changed since the runs; compare runs of the same data")
        show = {"id": x.get("id"), "gap_bits": delta[i] / LN2, "bits_per_byte_gap": delta[i] / (n_bytes * LN2)}
        gap.add(i, text, tokens[0][i], tokens[1][i], show if i in shown else None)
        row = {"index": i, "id": x.get("id"), "group": x.get("group"), "bytes": n_bytes,
               "bits_per_byte_a": x["nll_sum"] / (n_bytes * LN2), "bits_per_byte_b": (x["nll_sum"] + delta[i]) / (n_bytes * LN2),
               "bits_per_byte_gap": delta[i] / (n_bytes * LN2), "delta_bits": delta[i] / LN2}
        rows.append({**row, **{f"gap_{name}": gap.delta[name][-1] / (n_bytes * LN2) for name in gap.names}})
    block = {**gap.summary(), "bytes": total, "documents": len(pairs), "attribution": ATTRIBUTION,
             "user_classes": {name: p.pattern for name, p in user}, "groups": _groups(rows, total)}
    top = sorted(rows, key=lambda r: -abs(r["delta_bits"]))[:MOST_CHANGED]
    block["documents_top"] = [{k: r[k] for k in ("index", "id", "group", "bytes", "bits_per_byte_a", "bits_per_byte_b",
                                                  "bits_per_byte_gap", "delta_bits")} for r in top]
    return block, rows, sorted(gap.shown, key=lambda d: -d.gap_bits)


def _groups(rows: list[dict], total: int) -> dict:
    """Per group: its bytes, its own gap (over its bytes) and its contribution to the total gap (over all bytes).
    Documents with no group value form the group `(null)` (with other groups present), so the contributions add up."""
    out: dict = {}
    names = sorted({r["group"] for r in rows if r["group"] is not None}, key=str)
    for name in [*names, None] if names and any(r["group"] is None for r in rows) else names:
        part = [r for r in rows if r["group"] == name]
        n = sum(r["bytes"] for r in part)
        bits = math.fsum(r["delta_bits"] for r in part)
        out[NULL_GROUP if name is None else name] = {"documents": len(part), "bytes": n, "gap_bits_per_byte": bits / n, "contribution": bits / total}
    return out
