"""Other models against the first (--compare-to): loaded beside it when they share its tokenizer and are
scored on the same tokens; otherwise scored on their own and compared by bits per byte."""
from __future__ import annotations

import dataclasses

from . import model as model_lib
from .config import Config, UsageError
from .loss import Head, head_of
from .scoring import ComparedModel
from .setup import Setup


@dataclasses.dataclass
class Compared:
    """The --compare-to models: those scored beside the first, and the names of those scored on their own."""

    same_tokens: list[ComparedModel]
    by_bytes: list[str]


def load_compared(cfg: Config, *, tokenizer, setup: Setup, accelerator) -> Compared:
    """Load each --compare-to model and sort it by whether it can be scored on the first model's tokens."""
    out = Compared([], [])
    head: Head | None = setup.head
    for name in cfg.compare_to or []:
        with accelerator.main_process_first():
            m, t, _ = model_lib.load(dataclasses.replace(cfg, model=name), setup.device, accelerator.is_main_process)
        h = head_of(m)
        if same_tokenizer(tokenizer, t) and h is not None and head is not None and h.weight.shape[0] == head.weight.shape[0]:
            out.same_tokens.append(ComparedModel(m, h))
        else:
            out.by_bytes.append(name)
            del m
    if out.same_tokens and head is None:
        raise UsageError("--compare-to needs the first model's output layer to be a plain linear layer")
    return out


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map text to the same ids (then two models can be compared token by token)."""
    return a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids


def compare_by_bytes(cfg: Config, name: str, summary: dict) -> dict:
    """A model with another tokenizer: scored on its own, compared by bits per byte only."""
    from .runner import evaluate

    other = evaluate(dataclasses.replace(cfg, model=name, compare_to=None, save_tokens=False, output_dir=None, resume=False))
    bpb, first = other.summary["metrics"]["bits_per_byte"], summary["metrics"]["bits_per_byte"]
    return {
        "note": "tokenizers differ: compared by bits per byte only (no per-token KL or agreement)",
        "tokens": other.summary["counts"]["tokens"],
        "bits_per_byte": bpb,
        "delta_bits_per_byte": bpb - first if bpb is not None and first is not None else None,
        "perplexity": other.summary["metrics"]["perplexity"],
    }
