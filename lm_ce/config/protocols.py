"""Protocols by name: each sets every config field that defines the number, as one tool or paper runs it.

`--protocol NAME` fills these fields; any field given explicitly (config file or flag) still wins.
The README's protocol table says what each one is and what to quote it as.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Protocol:
    name: str
    fields: dict  # Config field -> value this protocol sets
    quote: str  # what a user should call the figure
    headline: str = "perplexity"  # the metrics.* key the protocol reports first
    half_stride: bool = False  # stride defaults to max_length // 2 (the transformers docs recipe)
    data: dict = field(default_factory=dict)  # data fields it sets as well (a protocol tied to one dataset)


# Every protocol sets all of these, so that switching protocol (e.g. in a suite entry) resets them all.
WINDOW_FIELDS = ("mode", "max_length", "stride", "prefix_token", "bos_policy", "separator", "detokenizer", "chunks")

_COMMON = {"max_length": None, "stride": None, "prefix_token": "auto", "bos_policy": "first", "separator": "\n\n",
           "detokenizer": "none", "chunks": None}

PROTOCOLS = {
    p.name: p
    for p in (
        Protocol("lm-eval", {**_COMMON, "mode": "document"},
                 quote="lm-eval rolling perplexity, document-level, BOS prefix, context N"),
        Protocol("lm-eval-wikitext", {**_COMMON, "mode": "document", "detokenizer": "wikitext"},
                 quote="lm-eval wikitext word perplexity", headline="word_perplexity",
                 data={"dataset": "EleutherAI/wikitext_document_level", "dataset_config": "wikitext-2-raw-v1",
                       "split": "test", "text_field": "page"}),
        Protocol("hf-docs", {**_COMMON, "mode": "stream"}, half_stride=True,
                 quote="sliding-window perplexity, context N, stride N/2 (transformers docs)"),
        Protocol("llama-cpp", {**_COMMON, "mode": "llama-cpp", "max_length": 512},
                 quote="llama.cpp PPL, -c 512"),
        Protocol("gptq", {**_COMMON, "mode": "gptq", "max_length": 2048},
                 quote="GPTQ-style perplexity, 2048-token chunks"),
        Protocol("llama-cpp-hellaswag", {**_COMMON, "mode": "document", "task": "multiple-choice"},
                 quote="llama.cpp HellaSwag / multiple-choice accuracy (mean log-prob after the choices' common prefix)"),
        Protocol("llama-cpp-winogrande", {**_COMMON, "mode": "document", "task": "multiple-choice"},
                 quote="llama.cpp Winogrande accuracy (mean log-prob of what follows the option)"),
    )
}
DEFAULT = "lm-eval"
CHOICE_PROTOCOLS = ("lm-eval", "llama-cpp-hellaswag", "llama-cpp-winogrande")  # the protocols of --task multiple-choice


def protocol_values(name: str) -> dict:
    """The config fields protocol `name` sets (its window fields, and its data fields if it has any)."""
    p = PROTOCOLS[name]
    return {**p.fields, **p.data}


# lm-evaluation-harness's wikitext task scores each page after undoing WikiText's tokenization. The rules
# below follow that task's definition, in its order; words and bytes are still counted on the page as stored.
_WIKITEXT_RULES: list[tuple[str, str, bool]] = [  # (pattern, replacement, is a regular expression)
    ("s '", "s'", False),
    (r"/' [0-9]/", r"/'[0-9]/", True),  # as defined there: matches the literal text "/' 5/" only
    (" @-@ ", "-", False),
    (" @,@ ", ",", False),
    (" @.@ ", ".", False),
    (" : ", ": ", False),
    (" ; ", "; ", False),
    (" . ", ". ", False),
    (" ! ", "! ", False),
    (" ? ", "? ", False),
    (" , ", ", ", False),
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)", True),
    (r"\[\s*([^\]]*?)\s*\]", r"[\1]", True),
    (r"{\s*([^}]*?)\s*}", r"{\1}", True),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"', True),
    (r"'\s*([^']*?)\s*'", r"'\1'", True),
    ("= = = =", "====", False),
    ("= = =", "===", False),
    ("= =", "==", False),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}", False),
    (" \n", "\n", False),
    ("\n ", "\n", False),
    (" N ", " 1 ", False),
    (" 's", "'s", False),
]


def wikitext_detokenized(text: str) -> str:
    """A WikiText page with its tokenization undone (spaces around punctuation, @-@ and friends)."""
    for pattern, replacement, regex in _WIKITEXT_RULES:
        text = re.sub(pattern, replacement, text) if regex else text.replace(pattern, replacement)
    return text


DETOKENIZERS = {"none": None, "wikitext": wikitext_detokenized}


def detokenized(name: str, text: str) -> str:
    """The text to score under detokenizer `name` ('none' leaves it as stored)."""
    fn = DETOKENIZERS[name]
    return text if fn is None else fn(text)
