"""Reference for byte attribution and explain's paired step error (tests only): a plain restatement of the rule,
written apart from lm_ce's code (scoring/bytespans.py, sums/bytegap.py, sums/stats.py) and checked on SmolLM2's and
Gemma-3's tokenizers when it was written. Tests compare lm_ce against it.

token_byte_spans(tokenizer, text) -> (ids, per-token group spans, 'exact' | 'offsets'); per_byte_loss(n, spans,
nll); byte_classes(text, user classes); class_decomposition; joined_owner; aligned_spans; log_delta_stderr.
"""
from __future__ import annotations

import json
import math
import re
import string

import numpy as np

LN2 = math.log(2)


# ---------------------------------------------------------------------------------------------------------
# characters -> bytes
# ---------------------------------------------------------------------------------------------------------

def char_to_byte(text: str) -> list[int]:
    """table[i] = UTF-8 byte offset of character i (table[len(text)] = total bytes)."""
    table = [0] * (len(text) + 1)
    run = 0
    for i, ch in enumerate(text):
        run += len(ch.encode("utf-8"))  # raises on a lone surrogate: such text cannot be scored as UTF-8
        table[i + 1] = run
    return table


# ---------------------------------------------------------------------------------------------------------
# each token's own bytes, where the vocabulary says them exactly
# ---------------------------------------------------------------------------------------------------------

def _byte_alphabet() -> dict[str, int]:
    """The printable stand-in character of each byte in byte-level BPE vocabularies (GPT-2's table), inverted."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


_BYTE_OF_CHAR = _byte_alphabet()
_HEX_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def vocabulary_kind(tokenizer) -> str | None:
    """'byte_level' (GPT-2/Llama-3/SmolLM2 style), 'sentencepiece' ("▁" for space, <0xHH> byte fallback), or
    None (unknown: only the offsets can be used)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.decoder is None:
        return None
    spec = json.loads(backend.decoder.__getstate__())
    kinds = [d.get("type") for d in spec.get("decoders", [spec])]
    if "ByteLevel" in kinds:
        return "byte_level"
    if "Replace" in kinds and any(d.get("type") == "Replace" and d.get("pattern", {}).get("String") == "\u2581"
                                  for d in spec.get("decoders", [spec])):
        return "sentencepiece"
    return None


def token_bytes(tokenizer, ids: list[int]) -> list[bytes] | None:
    """Each token's own bytes as the vocabulary writes them, or None when the vocabulary kind is unknown."""
    kind = vocabulary_kind(tokenizer)
    if kind is None:
        return None
    added = tokenizer.added_tokens_decoder  # id -> AddedToken: matched on the raw text, content is literal text
    pieces = tokenizer.convert_ids_to_tokens(ids)
    out = []
    for i, piece in zip(ids, pieces):
        if i in added:
            content = added[i].content
            if kind == "sentencepiece" and added[i].normalized:
                content = content.replace("\u2581", " ")
            out.append(content.encode("utf-8"))
        elif kind == "byte_level":
            try:
                out.append(bytes(_BYTE_OF_CHAR[c] for c in piece))
            except KeyError:
                return None
        else:
            m = _HEX_PIECE.fullmatch(piece)
            out.append(bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode("utf-8"))
    return out


# ---------------------------------------------------------------------------------------------------------
# spans -> a partition
# ---------------------------------------------------------------------------------------------------------

def partition(raw: list[tuple[int, int] | None], n_bytes: int | None = None) -> list[tuple[int, int]]:
    """Per-token final spans: overlapping spans grouped (each member gets the group's union), empty ones
    (None or b1 <= b0) given the span of the next group (the previous one when none follows). With n_bytes,
    bytes between groups (characters a normalizer deleted or merged: a combining mark under NFKC) are added to
    the group before them (the first group also takes the bytes before it, the last one those after it), so the
    groups cover every byte exactly once."""
    groups: list[list] = []  # [b0, b1, member token indices]
    pending: list[int] = []  # empty tokens waiting for the next group
    for t, span in enumerate(raw):
        if span is None or span[1] <= span[0]:
            pending.append(t)
            continue
        b0, b1 = span
        if groups and b0 < groups[-1][1]:  # overlaps the last group (offsets never go backwards by more)
            g = groups[-1]
            g[0], g[1] = min(g[0], b0), max(g[1], b1)
            while len(groups) > 1 and g[0] < groups[-2][1]:  # it reached back into an earlier group: merge
                h = groups.pop(-2)
                g[0], g[1], g[2] = min(g[0], h[0]), max(g[1], h[1]), h[2] + g[2]
            g[2] += pending + [t]
        else:
            groups.append([b0, b1, pending + [t]])
        pending = []
    if pending:
        if not groups:
            raise ValueError("no token of this text covers any byte: nothing to attribute the loss to")
        groups[-1][2] += pending
    if n_bytes is not None and groups:
        groups[0][0] = 0
        for g, h in zip(groups, groups[1:]):
            g[1] = h[0]
        groups[-1][1] = n_bytes
    out: list[tuple[int, int] | None] = [None] * len(raw)
    for b0, b1, members in groups:
        for t in members:
            out[t] = (b0, b1)
    return out  # type: ignore[return-value]


def token_byte_spans(tokenizer, text: str, raw_too: bool = False):
    """(ids, per-token byte spans forming a partition, 'exact' | 'offsets') of `text` encoded without special
    tokens, as lm_ce's windows.encode does (raw_too: the spans before grouping as a fourth item)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if ids != tokenizer(text, add_special_tokens=False)["input_ids"]:
        raise AssertionError("asking for offsets changed the token ids")
    text_bytes = text.encode("utf-8")
    own = token_bytes(tokenizer, ids)
    if own is not None:
        joined = b"".join(own)
        if joined != text_bytes and joined == b" " + text_bytes and own and own[0][:1] == b" ":
            own = [own[0][1:]] + own[1:]  # a dummy-prefix space (Llama-2 style) belongs to no byte of the text
            joined = joined[1:]
        if joined == text_bytes:
            raw, at = [], 0
            for piece in own:
                raw.append((at, at + len(piece)))
                at += len(piece)
            return (ids, partition(raw), "exact") + ((raw,) if raw_too else ())
    table = char_to_byte(text)
    raw = [(table[s], table[e]) if e > s else None for s, e in enc["offset_mapping"]]
    return (ids, partition(raw, len(text_bytes)), "offsets") + ((raw,) if raw_too else ())


def offset_byte_spans(tokenizer, text: str) -> list[tuple[int, int] | None]:
    """The offset mapping alone, in bytes, before grouping (for the self-test's cross-checks)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    table = char_to_byte(text)
    return [(table[s], table[e]) if e > s else None for s, e in enc["offset_mapping"]]


def coverage(spans: list[tuple[int, int]], n_bytes: int) -> tuple[int, int]:
    """(bytes covered exactly once, bytes covered by no group); raises when two groups overlap."""
    distinct = sorted(set(spans))
    covered, last = 0, 0
    for b0, b1 in distinct:
        if b0 < last:
            raise AssertionError(f"groups overlap at byte {b0}")
        if not (0 <= b0 < b1 <= n_bytes):
            raise AssertionError(f"span {b0, b1} outside the text's {n_bytes} bytes")
        covered += b1 - b0
        last = b1
    return covered, n_bytes - covered


# ---------------------------------------------------------------------------------------------------------
# losses per byte
# ---------------------------------------------------------------------------------------------------------

def per_byte_loss(n_bytes: int, spans: list[tuple[int, int]], nll) -> np.ndarray:
    """Each group's NLL (sum over its member tokens) spread uniformly over the group's bytes."""
    group_nll: dict[tuple[int, int], list[float]] = {}
    for span, x in zip(spans, nll):
        group_nll.setdefault(span, []).append(float(x))
    out = np.zeros(n_bytes, dtype=np.float64)
    for (b0, b1), xs in group_nll.items():
        out[b0:b1] += math.fsum(xs) / (b1 - b0)
    return out


def per_byte_loss_last(n_bytes: int, spans: list[tuple[int, int]], nll) -> np.ndarray:
    """The alternative rule (each group's NLL all on its last byte), only to show which sums are rule-free."""
    out = np.zeros(n_bytes, dtype=np.float64)
    for (b0, b1), x in zip(spans, nll):
        out[b1 - 1] += float(x)
    return out


# ---------------------------------------------------------------------------------------------------------
# byte classes
# ---------------------------------------------------------------------------------------------------------

BUILTIN_CLASSES = ("url", "newline", "whitespace", "digits", "letters", "punctuation", "non_ascii", "other")
_URL = re.compile(r"(?:\b(?:https?|ftp)://|\bwww\.)[^\s<>\"'`]+", re.IGNORECASE)
_URL_TRAILING = ".,;:!?'\""
_ASCII_PUNCT = set(string.punctuation)


def url_char_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of URLs: scheme://... or www...., up to whitespace or <>"'`; trailing . , ; : ! ? ' " are
    dropped, and a trailing ) or ] when the URL holds more closing than opening ones."""
    out = []
    for m in _URL.finditer(text):
        s, e = m.span()
        while e > s:
            last = text[e - 1]
            body = text[s:e]
            if last in _URL_TRAILING or (last == ")" and body.count(")") > body.count("(")) or \
                    (last == "]" and body.count("]") > body.count("[")):
                e -= 1
            else:
                break
        if e > s:
            out.append((s, e))
    return out


def char_class(ch: str) -> str:
    """The built-in class of one character outside URLs and user classes."""
    if ch in "\n\r":
        return "newline"
    if ch.isspace():
        return "whitespace"
    if "0" <= ch <= "9":
        return "digits"
    if ("a" <= ch <= "z") or ("A" <= ch <= "Z"):
        return "letters"
    if ch in _ASCII_PUNCT:
        return "punctuation"
    if ord(ch) >= 0x80:
        return "non_ascii"
    return "other"  # ASCII control characters that are not whitespace


def byte_classes(text: str, user_classes: list[tuple[str, str]] = ()) -> tuple[list[str], np.ndarray]:
    """(class names, class index of every byte). Precedence: user classes in the order given (a character
    inside a non-empty match of the regex), then url, then the character's own class. Every byte belongs to
    exactly one class: all bytes of a character take the character's class."""
    names = [name for name, _ in user_classes] + list(BUILTIN_CLASSES)
    if len(set(names)) != len(names):
        raise ValueError("class names must be unique (and differ from the built-in ones)")
    index = {name: i for i, name in enumerate(names)}
    per_char = [-1] * len(text)
    for name, pattern in user_classes:
        for m in re.finditer(pattern, text):
            for c in range(*m.span()):
                if per_char[c] < 0:
                    per_char[c] = index[name]
    for s, e in url_char_spans(text):
        for c in range(s, e):
            if per_char[c] < 0:
                per_char[c] = index["url"]
    table = char_to_byte(text)
    out = np.empty(table[-1], dtype=np.int32)
    for c, ch in enumerate(text):
        k = per_char[c] if per_char[c] >= 0 else index[char_class(ch)]
        out[table[c]:table[c + 1]] = k
    return names, out


def class_decomposition(classes: list[np.ndarray], loss_a: list[np.ndarray], loss_b: list[np.ndarray],
                        names: list[str], n_bytes_total: int) -> dict:
    """Over documents (lists of per-byte arrays): gap = bpb_B - bpb_A and each class's contribution
    (sum over its bytes of loss_B - loss_A) / (N ln 2), N the bytes both runs divide by."""
    diff = {name: [] for name in names}
    count = {name: 0 for name in names}
    for cls, a, b in zip(classes, loss_a, loss_b):
        d = b - a
        for k, name in enumerate(names):
            mask = cls == k
            diff[name].extend(d[mask].tolist())
            count[name] += int(mask.sum())
    denom = n_bytes_total * LN2
    total_a = math.fsum(x for a in loss_a for x in a.tolist())
    total_b = math.fsum(x for b in loss_b for x in b.tolist())
    out = {"gap_bits_per_byte": (total_b - total_a) / denom, "classes": {}, "bytes": {}, "class_gap_bits_per_byte": {}}
    for name in names:
        s = math.fsum(diff[name])
        out["classes"][name] = s / denom
        out["bytes"][name] = count[name]
        out["class_gap_bits_per_byte"][name] = s / (count[name] * LN2) if count[name] else None
    return out


# ---------------------------------------------------------------------------------------------------------
# joined streams: which document owns each byte
# ---------------------------------------------------------------------------------------------------------

def joined_owner(texts: list[str], separator: str = "\n\n") -> np.ndarray:
    """Owner document of every byte of separator.join(texts): a document owns its own bytes and the separator
    after it (the last one owns only its own)."""
    owner = []
    sep = len(separator.encode("utf-8"))
    for k, t in enumerate(texts):
        owner += [k] * (len(t.encode("utf-8")) + (sep if k < len(texts) - 1 else 0))
    return np.asarray(owner, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------
# spans common to two tokenizations
# ---------------------------------------------------------------------------------------------------------

def aligned_spans(spans_a: list[tuple[int, int]], spans_b: list[tuple[int, int]], n_bytes: int) -> list[tuple[int, int]]:
    """The maximal byte ranges between boundaries that both partitions have (0 and n_bytes included). Each is a
    union of whole groups of A and of whole groups of B, so both models' losses over it are sums of whole
    tokens: the same under any rule that keeps a token's loss inside its own span."""
    def cuts(spans):
        c = {0, n_bytes}
        for b0, b1 in set(spans):
            c.update((b0, b1))
        return c
    common = sorted(cuts(spans_a) & cuts(spans_b))
    return list(zip(common[:-1], common[1:]))


# ---------------------------------------------------------------------------------------------------------
# explain: paired standard error of a step's log delta
# ---------------------------------------------------------------------------------------------------------

def log_delta_stderr(y_i, n_i, y_j, n_j) -> tuple[float, float | None]:
    """(D, SE) for D = sum(y_j)/sum(n_j) - sum(y_i)/sum(n_i) over the same clusters c (numerator y: nats,
    denominator n: tokens, words or bytes; a cluster absent from a state has y = n = 0 there).
    Linearized (delta method) clustered estimator: z_c = (y_jc - v_j n_jc)/N_j - (y_ic - v_i n_ic)/N_i,
    SE^2 = C/(C-1) sum_c z_c^2. With n_i == n_j it is lm_ce's paired formula (paired.paired)."""
    y_i, n_i, y_j, n_j = (np.asarray(x, dtype=np.float64) for x in (y_i, n_i, y_j, n_j))
    big_ni, big_nj = n_i.sum(), n_j.sum()
    v_i, v_j = math.fsum(y_i) / big_ni, math.fsum(y_j) / big_nj
    keep = (n_i > 0) | (n_j > 0) | (y_i != 0) | (y_j != 0)
    z = ((y_j - v_j * n_j) / big_nj - (y_i - v_i * n_i) / big_ni)[keep]
    c = len(z)
    se = math.sqrt(c / (c - 1) * math.fsum(z * z)) if c >= 2 else None
    return v_j - v_i, se


def paired_lm_ce(a, b, units) -> tuple[float, float]:
    """lm_ce's paired.paired (value, stderr) restated: d_c = b_c - a_c, D = sum d / N,
    SE^2 = C/(C-1) sum (d_c - D n_c)^2 / N^2."""
    d = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    n = np.asarray(units, np.float64)
    big_n = n.sum()
    value = math.fsum(d) / big_n
    dev = d - value * n
    return value, math.sqrt(len(d) / (len(d) - 1) * math.fsum(dev * dev)) / big_n
