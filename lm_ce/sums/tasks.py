"""What the tasks other than perplexity record: one multiple-choice item's or one document's row, and the running
sums their figures come from (accuracies and the surprisal per word, with standard errors clustered by item or by
document).

Plain records of ints, floats and lists: the run's saved state holds the sums, documents.jsonl the rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from lm_ce.sums import stats

LN2 = math.log(2)


@dataclass
class ChoiceRow:
    """One multiple-choice item's fields in documents.jsonl: each choice's log-likelihood (natural log, summed over
    the tokens the protocol scores), its scored tokens, bytes and characters, the predictions and the correct choices."""

    label: list[int]  # the correct choices (lm-eval: one index; several: any of them counts as correct)
    choice_loglikelihoods: list[float]
    choice_tokens: list[int]
    choice_bytes: list[int]
    choice_chars: list[int]
    pred: int  # the protocol's prediction (lm-eval: argmax of the sums; llama.cpp: of the means per token)
    pred_norm: int  # lm-eval: argmax of the sums per character; llama.cpp: the same as pred
    pred_bytes: int  # argmax of the sums per byte (llama.cpp: the same as pred)
    is_greedy: list[bool] = field(default_factory=list)  # every scored token of the choice is the model's top-1

    def correct(self, pred: int) -> int:
        return int(pred in self.label)

    def fields(self) -> dict:
        """The row's fields: label as an index (a list when there are several), acc/acc_norm/acc_bytes as 0.0 or 1.0."""
        row = {k: getattr(self, k) for k in ("choice_loglikelihoods", "choice_tokens", "choice_bytes", "choice_chars",
                                             "pred", "pred_norm", "pred_bytes", "is_greedy")}
        row["label"] = self.label[0] if len(self.label) == 1 else list(self.label)
        row.update(acc=float(self.correct(self.pred)), acc_norm=float(self.correct(self.pred_norm)),
                   acc_bytes=float(self.correct(self.pred_bytes)))
        return row

    @classmethod
    def of(cls, row: dict) -> ChoiceRow:
        """The record of a documents.jsonl row (written by `fields`)."""
        label = row["label"] if isinstance(row["label"], list) else [row["label"]]
        return cls(label, *(row[k] for k in ("choice_loglikelihoods", "choice_tokens", "choice_bytes", "choice_chars",
                                             "pred", "pred_norm", "pred_bytes", "is_greedy")))


@dataclass
class SurprisalRow:
    """One document's surprisal in documents.jsonl (in the run's unit; its words are in words.parquet)."""

    surprisal_sum: float
    surprisal_mean: float | None  # per word
    sentences: int

    def fields(self) -> dict:
        return {"surprisal_sum": self.surprisal_sum, "surprisal_mean": self.surprisal_mean, "sentences": self.sentences}

    @classmethod
    def of(cls, row: dict) -> SurprisalRow:
        return cls(row["surprisal_sum"], row["surprisal_mean"], row["sentences"])


def row_of(row: dict) -> ChoiceRow | SurprisalRow | None:
    """A task's record in a documents.jsonl row, or None for a perplexity row."""
    if "choice_loglikelihoods" in row:
        return ChoiceRow.of(row)
    if "surprisal_sum" in row:
        return SurprisalRow.of(row)
    return None


def accuracy(correct: int, n: int) -> dict:
    """A proportion with its standard error over n independent clusters of one item each: sqrt(p(1-p)/(n-1)), which
    is lm-eval's sample_stddev/sqrt(n) and llama.cpp's `+/-`, and the 95% Wilson interval (llama.cpp's HellaSwag)."""
    if n == 0:
        return {"value": None, "stderr": None, "wilson95": None}
    p = correct / n
    z = stats.Z95
    zz = z * z / n
    half = zz * math.sqrt(n * (4.0 * p * (1 - p) + zz)) / (2 * z)
    wilson = [(p + zz / 2 - half) / (1 + zz), (p + zz / 2 + half) / (1 + zz)]
    return {"value": p, "stderr": math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None, "wilson95": wilson}


@dataclass
class ChoiceSums:
    """Running counts of finished items: how many, and how many each prediction got right."""

    items: int = 0
    choices: int = 0
    acc: int = 0
    acc_norm: int = 0
    acc_bytes: int = 0
    scoring: str = ""  # how the choices were read: their shared prefix once, or each whole (and why)

    def add(self, row: ChoiceRow) -> None:
        self.items += 1
        self.choices += len(row.choice_loglikelihoods)
        self.acc += row.correct(row.pred)
        self.acc_norm += row.correct(row.pred_norm)
        self.acc_bytes += row.correct(row.pred_bytes)

    def merge(self, other: ChoiceSums) -> None:
        for name in ("items", "choices", "acc", "acc_norm", "acc_bytes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def figures(self) -> dict:
        """results.json's multiple_choice: acc, acc_norm, acc_bytes with their standard errors and Wilson intervals."""
        out: dict = {"items": self.items, "choices": self.choices, "scoring": self.scoring}
        for name in ("acc", "acc_norm", "acc_bytes"):
            a = accuracy(getattr(self, name), self.items)
            out.update({name: a["value"], f"{name}_stderr": a["stderr"], f"{name}_wilson95": a["wilson95"]})
        return out


@dataclass
class SurprisalSums:
    """Running sums of finished documents' word surprisals (nats): totals, and documents as clusters of words."""

    documents: int = 0
    words: int = 0
    sentences: int = 0
    tokens: int = 0
    surprisal: stats.ExactSum = field(default_factory=stats.ExactSum)
    sum_sq: stats.ExactSum = field(default_factory=stats.ExactSum)  # of each word's surprisal squared (iid stderr)
    by_document: stats.Clustered = field(default_factory=stats.Clustered)

    def add(self, nats: list[float], tokens: int, sentences: int) -> None:
        """One document: its words' surprisals (nats), its scored tokens and its sentences."""
        self.documents += 1
        self.words += len(nats)
        self.sentences += sentences
        self.tokens += tokens
        total = math.fsum(nats)
        self.surprisal.add(total)
        self.sum_sq.add(math.fsum(x * x for x in nats))
        self.by_document.add(total, len(nats))

    def merge(self, other: SurprisalSums) -> None:
        self.documents += other.documents
        self.words += other.words
        self.sentences += other.sentences
        self.tokens += other.tokens
        self.surprisal.merge(other.surprisal)
        self.sum_sq.merge(other.sum_sq)
        self.by_document.merge(other.by_document)

    def figures(self, unit: str) -> dict:
        """results.json's surprisal: totals and the mean surprisal per word in `unit`, its standard error clustered by
        document (words of one text are not independent) and the per-word one, and 95% intervals."""
        scale = 1 / LN2 if unit == "bits" else 1.0
        total = self.surprisal.value
        out: dict = {"unit": unit, "documents": self.documents, "words": self.words, "sentences": self.sentences,
                     "tokens": self.tokens, "surprisal_sum": total * scale,
                     "mean_surprisal": total / self.words * scale if self.words else None}
        spread = stats.uncertainty(self.by_document, self.sum_sq.value, "documents")
        if "mean_loss_stderr" in spread:
            se = spread["mean_loss_stderr"] * scale
            mean = out["mean_surprisal"]
            out.update(mean_surprisal_stderr=se, mean_surprisal_ci95=[mean - stats.Z95 * se, mean + stats.Z95 * se])
        out["clusters"] = spread["clusters"]
        if "mean_loss_stderr_iid" in spread:
            out["mean_surprisal_stderr_iid"] = spread["mean_loss_stderr_iid"] * scale
        return out
