"""Multiple-choice items from rows: the generic layout ({context, choices, label}) and the HellaSwag, ARC and
Winogrande datasets' own rows, turned into the context, choices and correct choices that every protocol scores,
as lm-evaluation-harness's tasks for those datasets build them. A bad row is refused in one line naming it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from lm_ce.config.fields import Config
from lm_ce.errors import UsageError


@dataclass(frozen=True)
class Blank:
    """A Winogrande sentence cut at its blank: the text before it and the text after it (its leading space kept)."""

    before: str
    after: str


@dataclass(frozen=True)
class Item:
    """One item: the context, the choices, the indices of the correct ones; a Winogrande item also has its blank
    (its choices are the options that fill it, its context the text before it)."""

    index: int
    id: str | None
    group: str | None
    context: str
    choices: list[str]
    labels: list[int]
    blank: Blank | None = None


def item_of(cfg: Config, index: int, row: dict, source: str) -> Item:
    """The item of one row, read in the configured layout."""
    where = f"{source}, row {index}"
    ident, group = text_of(row.get(cfg.id_field)) if cfg.id_field else None, None
    if cfg.group_field and row.get(cfg.group_field) is not None:
        group = text_of(row.get(cfg.group_field))
    read = {"generic": generic, "hellaswag": hellaswag, "arc": arc, "winogrande": winogrande}[cfg.layout]
    context, choices, labels, blank = read(cfg, row, where)
    return Item(index, ident, group, context, choices, labels, blank)


def text_of(value) -> str | None:
    """An id or group as text (a whole number read as a float written as the whole number)."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def generic(cfg: Config, row: dict, where: str):
    """{context, choices, label} under the names --context-field, --choices-field and --label-field give."""
    context = _string(row, cfg.context_field, where)
    choices = _strings(row.get(cfg.choices_field), cfg.choices_field, where)
    return context, choices, labels_of(row.get(cfg.label_field), choices, cfg.label_field, where), None


def hellaswag(cfg: Config, row: dict, where: str):
    """A HellaSwag row (activity_label, ctx_a, ctx_b, endings, label), as lm-eval's hellaswag task reads it: the
    context is `activity_label: ctx_a Ctx_b` (ctx_b capitalized as str.capitalize does) and every text is cleaned of
    WikiHow's `[title]` and other bracketed markers."""
    parts = [_string(row, name, where) for name in ("activity_label", "ctx_a", "ctx_b")]
    context = clean_hellaswag(parts[0] + ": " + parts[1] + " " + parts[2].capitalize())
    endings = [clean_hellaswag(e) for e in _strings(row.get("endings"), "endings", where)]
    return context, endings, labels_of(row.get("label"), endings, "label", where), None


def clean_hellaswag(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: strip, ' [title]' to '. ', bracketed markers removed, double spaces single."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def arc(cfg: Config, row: dict, where: str):
    """An ARC row (question, choices {text, label}, answerKey), as lm-eval's arc tasks read it: the context is
    `Question: <question>\\nAnswer:`, the choices the texts, the answer the position of answerKey among the labels."""
    question = _string(row, "question", where)
    block = row.get("choices")
    if not isinstance(block, dict):
        raise UsageError(f"{where}: field 'choices' is not a mapping of 'text' and 'label' lists (the ARC layout); "
                         "use --layout generic for other rows")
    texts = _strings(block.get("text"), "choices.text", where)
    keys = [str(k) for k in block.get("label") or []]
    key = row.get("answerKey")
    if len(keys) != len(texts) or str(key) not in keys:
        raise UsageError(f"{where}: answerKey {key!r} is not one of the choices' labels {keys}; fix the row")
    return f"Question: {question}\nAnswer:", texts, [keys.index(str(key))], None


def winogrande(cfg: Config, row: dict, where: str):
    """A Winogrande row (sentence with one '_', option1, option2, answer '1' or '2')."""
    sentence = _string(row, "sentence", where)
    options = [_string(row, name, where) for name in ("option1", "option2")]
    if sentence.count("_") != 1:
        raise UsageError(f"{where}: the sentence has {sentence.count('_')} blanks ('_'); a Winogrande sentence has one")
    answer = str(row.get("answer"))
    if answer not in ("1", "2"):
        raise UsageError(f"{where}: answer {row.get('answer')!r} is not 1 or 2; fix the row (a test split has no answers)")
    k = sentence.index("_")
    return sentence[:k], options, [int(answer) - 1], Blank(sentence[:k], sentence[k + 1:])


def _string(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        raise UsageError(f"{where}: field '{name}' is {_kind(value)}, not a string; fix the row or the field name")
    return value


def _strings(value, name: str, where: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or len(value) < 2 or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{where}: field '{name}' is {_kind(value)}; give a list of two or more strings (the choices)")
    if any(v == "" for v in value):
        raise UsageError(f"{where}: field '{name}' has an empty choice; every choice needs text to score")
    return list(value)


def _kind(value) -> str:
    return "missing" if value is None else f"a {type(value).__name__}"


def labels_of(value, choices: list[str], name: str, where: str) -> list[int]:
    """The correct choices: an index from 0, a string of digits, a choice's own text, or a list of indices (several
    correct choices). An index outside the choices is refused (lm-eval would count the item wrong)."""
    if isinstance(value, bool):
        value = None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        value = choices.index(value) if value in choices else int(value) if value.strip().isdigit() else value
    found = value if isinstance(value, list) else [value]
    if not found or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(choices) for v in found):
        raise UsageError(f"{where}: field '{name}' is {value!r}: give the index (0 to {len(choices) - 1}) of the "
                         "correct choice, its text, or a list of indices")
    return sorted(set(found))
