"""Other models against the first (--compare-to): loaded beside it when they share its tokenizer and are
scored on the same tokens; otherwise scored on their own and compared by bits per byte."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from lm_ce.config.fields import Config
from lm_ce.config.protocols import detokenized
from lm_ce.data.documents import iter_documents
from lm_ce.errors import UsageError
from lm_ce.model import load as model_lib
from lm_ce.rundir.identity import data_differences, model_record
from lm_ce.scoring.head import Head, head_of
from lm_ce.scoring.probe import probe_head
from lm_ce.scoring.scorer import ComparedModel
from lm_ce.scoring.setup import Setup
from lm_ce.sums.bytegap import by_document, compare_documents, user_classes
from lm_ce.sums.records import Results
from lm_ce.sums.stats import paired


@dataclasses.dataclass
class Compared:
    """The --compare-to models: those scored beside the first, and the names of those scored on their own."""

    same_tokens: list[ComparedModel]
    by_bytes: list[str]
    models: dict[str, dict] = dataclasses.field(default_factory=dict)  # "--compare-to NAME" -> what it is, by content


def load_compared(cfg: Config, *, tokenizer, setup: Setup, accelerator) -> Compared:
    """Load each --compare-to model and sort it by whether it can be scored on the first model's tokens."""
    out = Compared([], [])
    head: Head | None = setup.head
    for name in cfg.compare_to or []:
        with accelerator.main_process_first():
            m, t, info = model_lib.load(dataclasses.replace(cfg, model=name), setup.device, accelerator.is_main_process)
        model_lib.check_vocabulary(m, t, name)
        out.models[f"--compare-to {name}"] = model_record(info)
        h = probe_head(m, head_of(m), setup.device).head  # the chunked head only where it reproduces the model
        if model_lib.same_tokenizer(tokenizer, t) and h is not None and head is not None and h.vocab_size == head.vocab_size:
            check_positions(name, info.max_positions, setup.max_length)  # scored in the first model's windows
            out.same_tokens.append(ComparedModel(m, h))
        else:
            check_positions(name, info.max_positions, cfg.max_length)  # scored on its own, with this max_length
            out.by_bytes.append(name)
            del m
    if out.same_tokens and head is None:
        raise UsageError("--compare-to needs the first model's output layer to be a plain linear layer")
    return out


def check_positions(name: str, positions: int | None, max_length: int | None) -> None:
    """Refuse a compared model with fewer positions than the windows it would be scored in (a learned position
    table ends in an IndexError; rotary positions would be scored silently beyond the trained context)."""
    if positions and max_length and max_length > positions:
        raise UsageError(f"--compare-to {name} has {positions} positions, fewer than --max-length {max_length}; use "
                         f"--max-length {positions} or less, or compare models with at least {max_length} positions")


def compare_by_bytes(cfg: Config, name: str, results: Results, *, score: Callable[..., Results], rows=None) -> dict:
    """A model with another tokenizer: scored on its own by `score` (the runner's evaluate), compared by bits per
    byte over the documents both models scored (paired by document). With --save-tokens in document mode, also byte
    by byte (`bytes`: the gap by byte class, group, document and span; the heatmap goes to `results`). A stopped run
    is not compared: stopping means stop."""
    summary = results.summary
    if not summary["complete"]:
        return {"note": "not compared: the run stopped before the compared model was scored (its tokenizer differs); "
                        "resume the run to compare"}
    commit = summary["data"].get("resolved_revision")  # a Hub dataset: read at the commit the first model read
    by_bytes = cfg.save_tokens and cfg.mode == "document"
    other = score(dataclasses.replace(cfg, model=name, compare_to=None, save_tokens=by_bytes, output_dir=None,
                                      resume=False, dataset_revision=commit or cfg.dataset_revision), rows=rows)
    changed = data_differences(summary["data"], other.summary["data"])
    if changed:  # read again for the other model: the pairs must be of the same content
        raise UsageError(f"--compare-to {name}: the data changed between the two models' passes ({'; '.join(changed)}); "
                         "rerun once the data stays unchanged")
    out = {
        "note": "tokenizers differ: compared by bits per byte only (no per-token KL or agreement)",
        "complete": other.summary["complete"],
        "tokens": other.summary["counts"]["tokens"],
        "perplexity": other.summary["metrics"]["perplexity"],
    }
    if cfg.mode == "stream":
        if not other.summary["complete"]:
            return {**out, "note": "not compared: scoring the compared model was stopped (its tokenizer differs)"}
        bpb, first = other.summary["metrics"]["bits_per_byte"], summary["metrics"]["bits_per_byte"]
        delta = bpb - first if bpb is not None and first is not None else None
        return {**out, "bits_per_byte": bpb, "delta_bits_per_byte": delta}
    # document mode: pair the documents both scored (a stopped compared run finished only the first ones)
    theirs = {d.index: d for d in other.documents if not d.skipped and d.tokens}
    pairs = [(d, theirs[d.index]) for d in results.documents if not d.skipped and d.tokens and d.index in theirs]
    if not pairs:
        return {**out, "note": "not compared: no document was scored by both models"}
    mine_nll, their_nll = np.array([a.nll_sum for a, _ in pairs]), np.array([b.nll_sum for _, b in pairs])
    n_bytes = np.array([a.bytes for a, _ in pairs])
    delta = paired(mine_nll, their_nll, n_bytes, 1 / math.log(2))
    ln2_bytes = n_bytes.sum() * math.log(2)
    if not other.summary["complete"]:
        out["note"] += f"; scoring it was stopped: compared on the {len(pairs)} documents both models scored"
    out = {**out, "documents": len(pairs), "tokens": int(sum(b.tokens for _, b in pairs)),
           "bits_per_byte": their_nll.sum() / ln2_bytes, "base_bits_per_byte": mine_nll.sum() / ln2_bytes,
           "delta_bits_per_byte": delta["value"], "delta_bits_per_byte_stderr": delta["stderr"],
           "delta_bits_per_byte_ci95": delta["ci95"]}
    if not by_bytes:
        return {**out, "bytes": {"note": "byte by byte: add --save-tokens (each token's byte span), in document mode"}}
    block, _, shown = compare_documents([(vars(a), vars(b)) for a, b in pairs], (tokens_of(results), tokens_of(other)),
                                        scored_texts(cfg, rows, {a.index for a, _ in pairs}),
                                        user_classes(cfg.byte_classes, "--byte-classes"))
    block["gap_bits_per_byte"] = (math.fsum(their_nll) - math.fsum(mine_nll)) / ln2_bytes
    results.byte_heatmaps[name] = shown
    return {**out, "bytes": block}


def tokens_of(results: Results) -> dict:
    """A run's scored tokens by document (bytegap.by_document), from its token table in memory or its files."""
    if results.token_table is not None:
        return by_document(results.token_table)
    import pyarrow.parquet as pq

    files = [results.joined_tokens] if results.joined_tokens else results.token_files
    columns = ["doc", "position", "nll", "byte_start", "byte_end"]
    parts = [pq.read_table(f, columns=columns) for f in files]
    return by_document({k: np.concatenate([p.column(k).to_numpy() for p in parts]) for k in columns})


def scored_texts(cfg: Config, rows, wanted: set[int]) -> dict[int, str]:
    """The texts the run scored (its detokenizer applied), by document index."""
    return {d.index: detokenized(cfg.detokenizer, d.text) for d in iter_documents(cfg, rows) if d.index in wanted}
