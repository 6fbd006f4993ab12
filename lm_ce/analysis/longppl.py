"""LongPPL (--longppl-evaluator): perplexity over the key tokens, the ones that need long context (Fang et al.,
"What is Wrong with Perplexity for Long-context Language Modeling?", ICLR 2025).

An evaluator model scores each target of a document twice: with its full context (the run's windows, --max-length
and --stride) and with a short one (windows advancing by --longppl-step whose targets see between --longppl-short
and short + step - 1 tokens before them, as the paper's code slides them; step 1: exactly `short`). Targets with
fewer than `short` tokens before them are not candidates. A candidate is key when
    loss_short - loss_full > alpha   and   loss_full < beta,
and LongPPL = exp(the evaluated model's mean NLL over the key tokens), its NLL being the run's own per-token loss.
The evaluator is the run's model (`self`) or another one. Another tokenizer is mapped through character offsets,
as the paper's code does: adjacent key tokens of the evaluator are merged into spans of text, and a token of the
evaluated model is key when its characters lie within one of them.

The passes run on each chunk before the chunk itself is scored: a stop inside them leaves the run at the chunk's
start, so a resume recomputes them (the same values) and the figures are exact under stops and processes.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from lm_ce.config.fields import Config
from lm_ce.config.protocols import detokenized
from lm_ce.errors import InternalError, UsageError
from lm_ce.model import load as model_lib
from lm_ce.rundir.identity import model_record
from lm_ce.scoring.head import head_of
from lm_ce.scoring.probe import probe_head
from lm_ce.scoring.parallel import Plan, score_windows
from lm_ce.scoring.progress import Progress
from lm_ce.scoring.scorer import Scorer
from lm_ce.scoring.setup import Setup, prefix_id, window_first_id
from lm_ce.scoring.windows import document_spans, windows_of, without_double_prefix
from lm_ce.sums.records import DocumentResult, KeyTokens, Run


@dataclass
class Evaluator:
    """The model that finds the key tokens: the run's own (`self`) or another, with its tokenizer and prefix."""

    name: str
    scorer: Scorer  # the evaluator's, giving per-token NLL
    tokenizer: object
    prefix: int | None
    window_first: int | None
    shared: bool  # the run's own tokens (self, or a tokenizer that maps text to the same ids): no offsets needed
    evaluated: Scorer  # the run's model, giving per-token NLL
    run_tokenizer: object
    models: dict = field(default_factory=dict)  # "--longppl-evaluator NAME" -> what it is, by content (not self)

    def key_tokens(self, sequences: dict, texts: dict[int, str], plan: Plan) -> dict[int, KeyTokens] | None:
        """Each document's KeyTokens for one chunk (`chunk_key_tokens`): what the document pass calls, before it
        scores the chunk, without importing this module."""
        return chunk_key_tokens(sequences, texts, plan, self)


def load_evaluator(cfg: Config, *, setup: Setup, scorer: Scorer, tokenizer, accelerator,
                   positions: int | None) -> Evaluator | None:
    """The --longppl-evaluator, loaded beside the run's model (None without LongPPL); its settings checked, also
    against the evaluator's positions (`positions`: the run's model's, which self is)."""
    name = cfg.longppl_evaluator
    if name is None:
        return None
    if cfg.longppl_short >= setup.max_length:
        raise UsageError(f"--longppl-short {cfg.longppl_short} is not shorter than --max-length {setup.max_length}: the "
                         "short context must be shorter than the full one; use a smaller --longppl-short or a larger "
                         "--max-length")
    tokens_scorer = dataclasses.replace(scorer, others=[], want_top1=True, want_signals=False)  # per-token NLL back
    if name == "self":
        check_positions(cfg, setup.max_length, positions)
        return Evaluator("self", tokens_scorer, tokenizer, setup.prefix, setup.window_first, shared=True,
                         evaluated=tokens_scorer, run_tokenizer=tokenizer)
    with accelerator.main_process_first():
        model, other, info = model_lib.load(dataclasses.replace(cfg, model=name), setup.device, accelerator.is_main_process)
    model_lib.check_vocabulary(model, other, name)
    check_positions(cfg, setup.max_length, info.max_positions)
    prefix = prefix_id(cfg, other)
    shared = model_lib.same_tokenizer(other, tokenizer) and prefix == setup.prefix
    if not shared and not (getattr(tokenizer, "is_fast", False) and getattr(other, "is_fast", False)):
        raise UsageError(f"--longppl-evaluator {name}: its tokenizer differs from the model's, and tokens are mapped "
                         "through character offsets, which only fast (Rust) tokenizers give; load both with fast "
                         "tokenizers, or use --longppl-evaluator self")
    evaluator_scorer = Scorer(model, probe_head(model, head_of(model), setup.device).head, setup.device,
                              scorer.pad_left, want_top1=True)
    return Evaluator(name, evaluator_scorer, other, prefix, window_first_id(cfg, other, prefix), shared=shared,
                     evaluated=tokens_scorer, run_tokenizer=tokenizer,
                     models={f"--longppl-evaluator {name}": model_record(info)})


def check_positions(cfg: Config, max_length: int, positions: int | None) -> None:
    """The evaluator's windows fit its positions: the full ones (--max-length) and the short ones, whose targets see
    up to --longppl-short + --longppl-step - 1 tokens (self included: its positions are the run's model's)."""
    longest = max(max_length, cfg.longppl_short + cfg.longppl_step - 1)
    if positions and positions < longest:
        which = "self (the model)" if cfg.longppl_evaluator == "self" else cfg.longppl_evaluator
        raise UsageError(f"--longppl-evaluator {which} has {positions:,} positions, fewer than the {longest:,} tokens "
                         "of its windows (--max-length, --longppl-short + --longppl-step - 1); use shorter settings or "
                         "an evaluator with more positions")


def chunk_key_tokens(sequences: dict, texts: dict[int, str], plan: Plan,
                     evaluator: Evaluator) -> dict[int, KeyTokens] | None:
    """Each document's KeyTokens for one chunk (`sequences`: index -> passes.TokenSequence, the run's tokens; `texts`:
    index -> text), the same on every process; None when stopped inside."""
    cfg, setup = plan.cfg, plan.setup
    full = [w for i in sorted(sequences) for w in windows_of(i, sequences[i].ids, _full_spans(sequences[i], setup),
                                                             setup.window_first)]
    mine = _per_token(full, _quiet(plan, evaluator.evaluated))
    if mine is None:
        return None
    if evaluator.shared:
        targets = sequences
        theirs = mine if evaluator.name == "self" else _per_token(full, _quiet(plan, evaluator.scorer))
    else:
        targets = {i: _evaluator_sequence(texts[i], evaluator, cfg.detokenizer) for i in sorted(sequences)}
        theirs = _per_token([w for i in sorted(targets) for w in windows_of(
            i, targets[i].ids, _full_spans(targets[i], setup), evaluator.window_first)], _quiet(plan, evaluator.scorer))
    if theirs is None:
        return None
    short = [w for i in sorted(targets) for w in windows_of(
        i, targets[i].ids, short_spans(len(targets[i].ids), targets[i].first_target, cfg.longppl_short,
                                       cfg.longppl_step), evaluator.window_first)]
    theirs_short = _per_token(short, _quiet(plan, evaluator.scorer, cfg.longppl_short + cfg.longppl_step - 1))
    if theirs_short is None:
        return None
    out = {}
    for i, s in sequences.items():
        if i not in mine:
            continue
        key = key_targets(theirs.get(i), theirs_short.get(i), first=first_of(targets[i]),
                          candidate=max(first_of(targets[i]), cfg.longppl_short),
                          alpha=cfg.longppl_alpha, beta=cfg.longppl_beta)
        if not evaluator.shared:
            key = mapped(key, targets[i], _run_offsets(texts[i], s, evaluator.run_tokenizer, plan))
        first = first_of(s)
        out[i] = KeyTokens(math.fsum(mine[i][[t - first for t in key]].double().tolist()), len(key))
    return out


@dataclass
class Tokens:
    """A sequence with the character span of each of its text's tokens (the prefix, if any, has none)."""

    ids: list[int]
    first_target: int
    offsets: list[tuple[int, int]] = field(default_factory=list)  # of ids[first_target:] ... ids[-1]: the text's


def first_of(s) -> int:
    """The first target of a sequence: S[0] has nothing before it."""
    return max(s.first_target, 1)


def short_spans(n_seq: int, first_target: int, short: int, step: int) -> list[tuple[int, int, int]]:
    """Windows of the short context: targets t >= max(first_target, 1, short), `step` of them a window, the window
    starting `short` tokens before its first target (so a target sees short .. short + step - 1 tokens)."""
    spans = []
    for t0 in range(max(first_target, 1, short), n_seq, step):
        spans.append((t0 - short, t0 - 1, min(n_seq - 1, t0 + step - 1)))
    return spans


def key_targets(full: torch.Tensor | None, short: torch.Tensor | None, *, first: int, candidate: int, alpha: float,
                beta: float) -> list[int]:
    """The key targets of one sequence: `full` holds the losses of targets first.., `short` those of candidate..;
    key when loss_short - loss_full > alpha and loss_full < beta (compared in float64)."""
    if full is None or short is None:
        return []
    f = full[candidate - first :].double()
    s = short.double()
    if f.numel() != s.numel():
        raise InternalError(f"LongPPL: {s.numel()} short-context losses for {f.numel()} targets")
    key = torch.nonzero((s - f > alpha) & (f < beta)).flatten()
    return (key + candidate).tolist()


def mapped(key: list[int], evaluator_seq: Tokens, run_seq: Tokens) -> list[int]:
    """The run's targets whose characters lie within the evaluator's key tokens, adjacent ones merged into one span."""
    spans: list[list[int]] = []
    for t in key:
        start, end = evaluator_seq.offsets[t - evaluator_seq.first_target]
        if spans and spans[-1][1] == start:
            spans[-1][1] = end
        else:
            spans.append([start, end])
    out, j = [], 0
    for k, (start, end) in enumerate(run_seq.offsets):
        while j < len(spans) and spans[j][1] < end:
            j += 1
        if j == len(spans):
            break
        t = run_seq.first_target + k
        if spans[j][0] <= start and t >= 1:
            out.append(t)
    return out


def _full_spans(s, setup: Setup) -> list[tuple[int, int, int]]:
    return document_spans(len(s.ids), s.first_target, setup.max_length, setup.stride)


def _quiet(plan: Plan, scorer: Scorer, longest: int = 0) -> Plan:
    """The run's plan for a pass of its own: another scorer, no bar, no periodic save (the run's state is the run's)."""
    setup = dataclasses.replace(plan.setup, max_length=max(plan.setup.max_length, longest))
    return dataclasses.replace(plan, cfg=dataclasses.replace(plan.cfg, output_dir=None), setup=setup, scorer=scorer,
                               progress=Progress(False, main=plan.progress.main), outputs=None)


def _per_token(windows: list, plan: Plan) -> dict[int, torch.Tensor] | None:
    """Each document's per-token NLL (float32, in target order) over the windows; None when stopped."""
    run = Run(tally=plan.new_tally())
    if score_windows(windows, plan, run, {w.doc: DocumentResult(index=w.doc) for w in windows}):
        return None
    blocks = run.tally.token_blocks
    if not blocks:
        return {}
    doc, position, nll = (torch.cat([b[c] for b in blocks]) for c in ("doc", "position", "nll"))
    order = torch.argsort(doc * (int(position.max()) + 1) + position)
    doc, position, nll = doc[order], position[order], nll[order]
    docs, counts = torch.unique_consecutive(doc, return_counts=True)
    out = {}
    for d, pos, values in zip(docs.tolist(), position.split(counts.tolist()), nll.split(counts.tolist())):
        if not torch.equal(pos, torch.arange(len(pos))):
            raise InternalError(f"LongPPL: document {d}'s targets are not each scored once")
        out[d] = values
    return out


def _evaluator_sequence(text: str, evaluator: Evaluator, detokenizer: str) -> Tokens:
    """The evaluator's own sequence of a text (its prefix, then the text's tokens) with their character spans."""
    return _with_offsets(evaluator.tokenizer, detokenized(detokenizer, text), evaluator.prefix)


def _run_offsets(text: str, s, tokenizer, plan: Plan) -> Tokens:
    """The run's sequence of a text with character spans; checked to be the tokens the run scored."""
    tokens = _with_offsets(tokenizer, detokenized(plan.cfg.detokenizer, text), plan.setup.prefix)
    if tokens.ids != torch.as_tensor(s.ids).tolist():
        raise RuntimeError("LongPPL: the text's tokens with offsets differ from those scored")
    return tokens


def _with_offsets(tokenizer, text: str, prefix: int | None) -> Tokens:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True) if text else None
    ids = list(encoded["input_ids"]) if encoded else []
    offsets = [tuple(o) for o in encoded["offset_mapping"]] if encoded else []
    ids, doubled = without_double_prefix(ids, prefix)
    head = [prefix] if prefix is not None else []
    return Tokens(head + ids, len(head), offsets[1:] if doubled else offsets)
