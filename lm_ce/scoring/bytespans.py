"""Each token's byte span in the text it came from: the rule that attributes a token's loss to bytes, so that two
models with different tokenizers can be compared byte by byte.

A token's span comes from its own bytes where the vocabulary states them exactly (byte-level BPE's byte alphabet,
SentencePiece's "▁" and <0xHH> pieces, added tokens' literal text) and they concatenate to the text; else from the
fast tokenizer's offset mapping, turned from characters into UTF-8 bytes. Spans that overlap (several tokens of one
character) are grouped and every member gets the group's union; a token covering no byte joins the next group (the
last one at the end); bytes no token covers (a normalizer removed them) join the group before them. The groups
then partition the text's bytes, so a loss spread over each group's bytes keeps every token's loss.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger("lm_ce")

EXACT, OFFSETS = 0, 1  # how a text's spans were found: the tokens' own bytes, or the offset mapping
_HEX_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character of each byte (GPT-2's table), inverted."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[chr(b)] = b
        else:
            out[chr(256 + extra)] = b
            extra += 1
    return out


BYTE_OF_CHAR = _byte_of_char()


def vocabulary_kind(tokenizer) -> str | None:
    """'byte_level' (GPT-2, Llama-3, SmolLM2), 'sentencepiece' ("▁" for a space, <0xHH> byte fallback: Llama-2,
    Gemma), or None (only the offset mapping can be used), read from the backend tokenizer's decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return None
    try:
        spec = json.loads(decoder.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return None
    parts = spec.get("decoders") or [spec]
    if any(d.get("type") == "ByteLevel" for d in parts):
        return "byte_level"
    if any(d.get("type") == "Replace" and (d.get("pattern") or {}).get("String") == "\u2581" for d in parts):
        return "sentencepiece"
    return None


def char_to_byte(text: str) -> np.ndarray:
    """table[i] = the UTF-8 byte offset of character i (table[len(text)] = the text's bytes)."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    sizes = 1 + (points >= 0x80).astype(np.int64) + (points >= 0x800) + (points >= 0x10000)
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def partition(raw: list[tuple[int, int] | None], n_bytes: int | None = None) -> list[tuple[int, int]]:
    """Per-token group spans: overlapping spans grouped (each member gets the union), empty ones (None, or end <=
    start) joined to the next group (the last one when none follows). With n_bytes, bytes between groups are added
    to the group before them (the first group also takes the bytes before it), so the groups cover every byte
    once. A text none of whose tokens covers a byte gets empty spans (0, 0)."""
    groups: list[list] = []  # [start, end, member token indices]
    pending: list[int] = []
    for t, span in enumerate(raw):
        if span is None or span[1] <= span[0]:
            pending.append(t)
            continue
        b0, b1 = span
        if groups and b0 < groups[-1][1]:
            g = groups[-1]
            g[0], g[1] = min(g[0], b0), max(g[1], b1)
            while len(groups) > 1 and g[0] < groups[-2][1]:  # reaching back into an earlier group: one group
                h = groups.pop(-2)
                g[0], g[1], g[2] = min(g[0], h[0]), max(g[1], h[1]), h[2] + g[2]
            g[2] += [*pending, t]
        else:
            groups.append([b0, b1, [*pending, t]])
        pending = []
    if not groups:
        return [(0, 0)] * len(raw)
    groups[-1][2] += pending
    if n_bytes is not None:
        groups[0][0] = 0
        for g, h in zip(groups, groups[1:]):
            g[1] = h[0]
        groups[-1][1] = max(groups[-1][1], n_bytes)
    out: list[tuple[int, int]] = [(0, 0)] * len(raw)
    for b0, b1, members in groups:
        for t in members:
            out[t] = (b0, b1)
    return out


@dataclass(frozen=True)
class TextSpans:
    """The byte spans of one text's tokens (int64 [n, 2]: start, end) and how they were found (EXACT, OFFSETS)."""

    spans: torch.Tensor
    method: int


class SpanMaker:
    """Byte spans of one tokenizer's tokens, its vocabulary read once (each token's own bytes cached by id)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.usable = bool(getattr(tokenizer, "is_fast", False))
        self.kind = vocabulary_kind(tokenizer) if self.usable else None
        self.added = dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self._own: dict[int, bytes | None] = {}
        if not self.usable:
            log.warning("the tokenizer is not a fast (Rust) tokenizer: it has no offset mapping, so tokens.parquet's "
                        "byte_start and byte_end are -1 and no byte-level comparison can be made")

    def encode(self, texts: list[str]) -> list[tuple[list[int], TextSpans]]:
        """(ids, spans) of each text, encoded with no special tokens added (as windows.encode does)."""
        if not texts:
            return []
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [(list(ids), self.spans(text, ids, offsets))
                for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"])]

    def spans(self, text: str, ids: list[int], offsets: list[tuple[int, int]]) -> TextSpans:
        """The group spans of a text's tokens: from their own bytes when these spell the text, else the offsets."""
        text_bytes = text.encode("utf-8")
        own = self.own_bytes(ids)
        if own is not None:
            joined = b"".join(own)
            if joined != text_bytes and own and own[0][:1] == b" " and joined == b" " + text_bytes:
                own = [own[0][1:], *own[1:]]  # a dummy-prefix space (Llama-2 style) is no byte of the text
                joined = joined[1:]
            if joined == text_bytes:
                ends = np.cumsum([len(piece) for piece in own], dtype=np.int64)
                starts = ends - [len(piece) for piece in own]
                raw = list(zip(starts.tolist(), ends.tolist()))
                if all(len(piece) for piece in own):
                    return TextSpans(torch.tensor(raw, dtype=torch.long).reshape(-1, 2), EXACT)
                return TextSpans(torch.tensor(partition(raw, len(text_bytes)), dtype=torch.long).reshape(-1, 2), EXACT)
        table = char_to_byte(text)
        raw = [(int(table[s]), int(table[e])) if e > s else None for s, e in offsets]
        return TextSpans(torch.tensor(partition(raw, len(text_bytes)), dtype=torch.long).reshape(-1, 2), OFFSETS)

    def own_bytes(self, ids: list[int]) -> list[bytes] | None:
        """Each token's bytes as the vocabulary writes them, or None when some token's cannot be told."""
        if self.kind is None:
            return None
        missing = [i for i in set(ids) if i not in self._own]
        for i, piece in zip(missing, self.tokenizer.convert_ids_to_tokens(missing)):
            self._own[i] = self._piece_bytes(i, piece)
        out = [self._own[i] for i in ids]
        return None if any(b is None for b in out) else out

    def _piece_bytes(self, token_id: int, piece: str | None) -> bytes | None:
        if token_id in self.added:
            content = self.added[token_id].content
            if self.kind == "sentencepiece" and getattr(self.added[token_id], "normalized", False):
                content = content.replace("\u2581", " ")
            return content.encode("utf-8")
        if piece is None:
            return None
        if self.kind == "byte_level":
            try:
                return bytes(BYTE_OF_CHAR[c] for c in piece)
            except KeyError:
                return None
        m = _HEX_PIECE.fullmatch(piece)
        return bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode("utf-8")


def sequence_bytes(seq_len: int, first: int, spans: TextSpans | None, owner: int | torch.Tensor = -1) -> torch.Tensor:
    """int64 [seq_len, 3] (byte start, byte end, owner document) of a sequence S whose positions first.. hold the
    text's tokens in order (the positions before them, a prefix, and after them, special tokens the tokenizer
    appended, take the neighbouring group's span: never a target, or joined to the last group). `owner`: the
    document, or the owner of every byte (joined texts). Without spans: every row is -1."""
    out = torch.full((seq_len, 3), -1, dtype=torch.long)
    if spans is None or not len(spans.spans) or first + len(spans.spans) > seq_len:
        return out
    n = len(spans.spans)
    out[first : first + n, :2] = spans.spans
    out[:first, :2] = spans.spans[0]
    out[first + n :, :2] = spans.spans[-1]
    if isinstance(owner, int):
        out[:, 2] = owner
    elif len(owner):
        out[:, 2] = owner[out[:, 0].clamp(0, len(owner) - 1)]
    return out


def continuation_spans(whole: TextSpans, first: int, offset: int, n_bytes: int) -> TextSpans:
    """The spans of tokens first.. of a prompt + continuation, relative to the continuation's n_bytes bytes that
    start at byte `offset` (a target that lies in the prompt's moved whitespace joins the next group)."""
    shifted = (whole.spans[first:] - offset).clamp(0, n_bytes)
    raw = [(int(a), int(b)) for a, b in shifted]
    return TextSpans(torch.tensor(partition(raw, n_bytes), dtype=torch.long).reshape(-1, 2), whole.method)


def text_bytes(maker: SpanMaker | None, seq_len: int, first: int, spans: TextSpans | None, doc: int,
               prompted: tuple[str, str] | None = None) -> torch.Tensor | None:
    """[seq_len, 3] of one document's sequence, its text's tokens from position `first` on (None without a maker).
    `prompted` (prompt, text): the pair was encoded whole; the spans are those of the text's targets in the text."""
    if maker is None:
        return None
    if prompted is not None and maker.usable:
        prompt, text = prompted
        ((ids, whole),) = maker.encode([prompt + text])
        spans = continuation_spans(whole, len(ids) - (seq_len - first), len(prompt.encode("utf-8")),
                                   len(text.encode("utf-8")))
    return sequence_bytes(seq_len, first, spans, doc)


def locate(seq: list[int] | torch.Tensor, ids: list[int]) -> int | None:
    """Where a text's ids begin in the sequence made of them (after a prefix or a BOS the tokenizer put), or None."""
    seq = seq.tolist() if isinstance(seq, torch.Tensor) else list(seq)
    for first in range(0, min(3, len(seq) - len(ids) + 1)):
        if seq[first : first + len(ids)] == ids:
            return first
    return None


def joined_bytes(maker: SpanMaker, seq: list[int] | torch.Tensor, parts: list[tuple[int, str]],
                 separator: str) -> torch.Tensor:
    """[len(seq), 3] of a joined pass: the texts of `parts` ((document index, scored text)) joined by the separator,
    tokenized once more with offsets; each token owned by the document owning its first byte."""
    joined = separator.join(text for _, text in parts)
    if not maker.usable or not joined:
        return sequence_bytes(len(seq), 0, None)
    ((ids, spans),) = maker.encode([joined])
    first = locate(seq, ids)
    if first is None:  # the tokenizer's special tokens changed the text's own tokens: no spans rather than wrong ones
        log.warning("the joined text's tokens differ from those scored: tokens.parquet's byte_start and byte_end are -1")
        return sequence_bytes(len(seq), 0, None)
    owner = byte_owner([len(text.encode("utf-8")) for _, text in parts], len(separator.encode("utf-8")),
                       [index for index, _ in parts])
    return sequence_bytes(len(seq), first, spans, owner)


def byte_owner(sizes: list[int], separator_bytes: int, documents: list[int]) -> torch.Tensor:
    """The document owning each byte of texts joined by a separator: a document owns its text and the separator
    after it (the last one, its text only). `sizes` are the texts' bytes, `documents` their document indices."""
    owner = [torch.full((size + (separator_bytes if k + 1 < len(sizes) else 0),), doc, dtype=torch.long)
             for k, (size, doc) in enumerate(zip(sizes, documents))]
    return torch.cat(owner) if owner else torch.zeros(0, dtype=torch.long)
