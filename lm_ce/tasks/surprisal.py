"""Word surprisal: each word's (or region's) -log p given the words before it, with the beginning-of-word
correction of Pimentel & Meister (2024, "How to Compute the Probability of a Word").

A tokenizer that marks the start of a word on its first token (GPT-2's `Ġ`, SentencePiece's `▁`) tells that a word
has ended only when the next token starts a word; so p(word | context) = p(its tokens | context) * P(B | context,
word) / P(B | context), B the tokens that start a word. Two styles, each its package's own:

- pm (wordsprobability, the paper's package): B includes EOS (the end of the text ends a word); the first word,
  whose first token starts no word (no space before it), is divided by the probability that the text starts with a
  token of its kind, P(V \\ B | prefix), with EOS counted twice in it as the package counts it (its mask of
  mid-word tokens and its mask of EOS overlap; p(EOS | prefix) is 1.5e-8 on SmolLM2);
- minicons (word_score_tokenized with bow_correction): B without EOS; a token adds log P(B | up to it) when the next
  token starts a word (or it is the text's last) and takes away log P(B | before it) when it starts a word itself,
  except the first token; so the first word has no denominator.

Words: a row's --words-field list (regions welcome: an element is scored as one unit), or its text split at
whitespace; each word owns the whitespace before it. The text is scored after the prefix token (BOS, else EOS).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lm_ce.config.fields import Config
from lm_ce.errors import UsageError

CLOSERS = "\"')]}»”’"  # may follow a sentence's final punctuation
SENTENCE_END = (".", "!", "?", "…")


@dataclass
class Words:
    """One document's words, the text its tokens come from, and which word each token belongs to."""

    index: int
    id: str | None
    group: str | None
    words: list[str] | None  # None: nothing to score (skipped: see `skipped`)
    text: str = ""
    ids: list[int] | None = None
    owner: list[int] | None = None  # word index of each token
    skipped: str | None = None


def words_of(cfg: Config, value, where: str) -> tuple[list[str] | None, str, list[int]]:
    """(words, the text scored, each word's end in it) of a row's --words-field list or --text-field text; words None
    when there is nothing to score."""
    if cfg.words_field:
        if not isinstance(value, (list, tuple)) or not all(isinstance(w, str) for w in value):
            raise UsageError(f"{where}: field '{cfg.words_field}' is not a list of strings (the words or regions)")
        if any(not w.strip() for w in value):
            raise UsageError(f"{where}: field '{cfg.words_field}' holds an empty word; every word needs text")
        words = list(value)
        text = " ".join(words)
    else:
        if not isinstance(value, str):
            raise UsageError(f"{where}: field '{cfg.text_field}' is a {type(value).__name__}, not a text; give "
                             "--words-field for lists of words")
        if not value.strip():
            return None, "", []
        text = value.strip()
        words = text.split()
    if not words:
        return None, "", []
    ends, at = [], 0
    for w in words:
        at = text.index(w, at) + len(w)
        ends.append(at)
    return words, text, ends


def owners(tokenizer, text: str, ends: list[int], where: str) -> tuple[list[int], list[int]]:
    """(token ids, word of each token): a token belongs to the word whose characters, with the whitespace before it,
    hold the token's first character; a token that reaches into the next word is refused."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        raise UsageError("--task surprisal maps tokens to words through their character offsets, which this tokenizer "
                         "does not give (a slow tokenizer): load its fast version") from None
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    owner, word = [], 0
    for start, end in offsets:
        while word < len(ends) - 1 and start >= ends[word]:
            word += 1
        if end > ends[word] and word < len(ends) - 1:
            raise UsageError(f"{where}: a token of the text spans the words {word} and {word + 1}; their surprisals "
                             "cannot be told apart with this tokenizer")
        owner.append(word)
    missing = sorted(set(range(len(ends))) - set(owner))
    if missing:
        raise UsageError(f"{where}: word {missing[0]} gets no token of its own; check the words")
    return ids, owner


def bow_mask(tokenizer, vocab: int) -> torch.Tensor:
    """[vocab] bool: the tokens that start a word: their string starts with the marker a lone space becomes (`Ġ`,
    `▁`), and added tokens that take the space before them (lstrip)."""
    space = tokenizer(" ", add_special_tokens=False)["input_ids"]
    marker = (tokenizer.convert_ids_to_tokens(space[0]) or "")[:1] if space else ""
    if not marker:
        raise UsageError("--task surprisal: the tokenizer turns a space into no token, so the word starts cannot be "
                         "found; use --no-bow-correction")
    mask = torch.zeros(vocab, dtype=torch.bool)
    ids = [i for s, i in tokenizer.get_vocab().items() if i < vocab and s.startswith(marker)]
    ids += [i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "lstrip", False) and i < vocab]
    mask[ids] = True
    return mask


@dataclass
class RowValues:
    """What a word needs of the distribution after one position of the scored sequence (natural logs)."""

    logp: float  # of the next token (nan after the last)
    bow: float  # log P(B)
    bow_eos: float  # log P(B and EOS)
    not_bow: float  # log P(not B), EOS counted twice (wordsprobability's first-word denominator)
    entropy: float
    rank: int  # of the next token: 1 + the tokens more probable (0 after the last)


def row_values(logp: torch.Tensor, targets: list[int | None], bow: torch.Tensor, eos: int | None) -> list[RowValues]:
    """RowValues of a block of float64 log-probability rows, given the token each row predicts."""
    bow = bow.to(logp.device)
    minus = torch.tensor(-math.inf, dtype=logp.dtype, device=logp.device)
    in_bow = torch.logsumexp(torch.where(bow, logp, minus), dim=-1)
    out_bow = torch.logsumexp(torch.where(bow, minus, logp), dim=-1)
    if eos is not None and not bool(bow[eos]):
        with_eos, out_bow = torch.logaddexp(in_bow, logp[:, eos]), torch.logaddexp(out_bow, logp[:, eos])
    else:
        with_eos = in_bow
    entropy = torch.special.entr(logp.exp()).sum(dim=-1)
    out = []
    for i, t in enumerate(targets):
        lp = float(logp[i, t]) if t is not None else math.nan
        rank = int((logp[i] > logp[i, t]).sum()) + 1 if t is not None else 0
        out.append(RowValues(lp, float(in_bow[i]), float(with_eos[i]), float(out_bow[i]), float(entropy[i]), rank))
    return out


def word_nats(rows: list[RowValues], owner: list[int], starts_word: list[bool], style: str | None) -> list[float]:
    """Each word's surprisal in nats. rows[t] is the distribution that predicts token t (rows[n] the one after the
    last token); style pm, minicons, or None (no correction: the sum of the tokens' surprisals)."""
    n, words = len(owner), owner[-1] + 1
    out, first, last = [0.0] * words, [n] * words, [0] * words
    for t in range(n):
        out[owner[t]] -= rows[t].logp
        first[owner[t]] = min(first[owner[t]], t)
        last[owner[t]] = t
    if style == "pm":
        for k in range(words):
            start = rows[first[k]].bow_eos if k else rows[0].bow_eos if starts_word[0] else rows[0].not_bow
            out[k] -= rows[last[k] + 1].bow_eos - start
    elif style == "minicons":
        for t in range(n):
            if t == n - 1 or starts_word[t + 1]:
                out[owner[t]] -= rows[t + 1].bow
            if t > 0 and starts_word[t]:
                out[owner[t]] += rows[t].bow
    return out


def sentence_of(words: list[str]) -> list[int]:
    """Each word's sentence (from 0): a sentence ends with a word ending in . ! ? or … (closing quotes and brackets
    after it allowed). A rule of thumb ('Mr.' ends one too): documents or rows give exact boundaries."""
    out, sentence = [], 0
    for w in words:
        out.append(sentence)
        if w.rstrip(CLOSERS).endswith(SENTENCE_END):
            sentence += 1
    return out
