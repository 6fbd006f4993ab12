"""`lm-ce explain`: the chain from one protocol to another scored with one model load, each run state in its own
output directory (OUTPUT_DIR/steps/NN-factor, resumable as a suite entry is), then the steps' figures written to
OUTPUT_DIR (results.json's `explain`, results.md, results.html, explain.png)."""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from lm_ce.config.checks import check
from lm_ce.config.fields import Config
from lm_ce.config.protocols import PROTOCOLS, protocol_values
from lm_ce.data.documents import iter_documents
from lm_ce.errors import UsageError
from lm_ce.explain.chain import Endpoint, State, plan
from lm_ce.explain.figures import RunSums, Texts, explain_block, run_sums
from lm_ce.explain.report import write_outputs
from lm_ce.reports import files as report_files
from lm_ce.rundir import claims
from lm_ce.runner import with_model
from lm_ce.scoring.windows import adds_bos

log = logging.getLogger("lm_ce")

STEPS = "steps"
INTERACTIONS = {
    ("window_length", "join"): "context that crosses documents makes long windows worth more",
    ("prefix_token", "join"): "a per-document prefix exists only in document mode",
    ("window_length", "stride"): "the stride is kept in proportion to the window length",
    ("window_length", "chunk_selection"): "llama-cpp keeps the targets with max_length/2 or more tokens of context",
    ("window_length", "bos_sink"): "the sink is one token per window: fewer windows, fewer sinks",
    ("detokenizer", "unit"): "detokenizing changes the tokens but not the words or bytes (counted on the stored text)",
}


@dataclass(frozen=True)
class Spec:
    """What `lm-ce explain` was asked: the ends, the order, the metrics, and the run's other fields as given."""

    start: Endpoint
    end: Endpoint
    explicit: dict  # the fields given (model, data, placement, output ...), no window field
    order: list[str] | None = None
    metric: str | None = None
    to_metric: str | None = None


def shared_data(spec: Spec) -> dict:
    """The data fields a protocol names (lm-eval-wikitext's), used by every state unless the data is given."""
    return {k: v for p in (spec.start.protocol, spec.end.protocol) for k, v in PROTOCOLS[p].data.items()}


def state_config(spec: Spec, state: State, directory: Path) -> Config:
    """The Config of a run state: an end is its protocol by name (with its overrides); a step between them takes
    the start's protocol (or its chunk protocol) with the state's window fields. A joined run saves its tokens:
    each one's owner document gives the steps' clusters."""
    if state.endpoint is not None:
        protocol, window = state.endpoint.protocol, state.endpoint.fields()
    else:
        protocol, window = state.point.chunk or spec.start.protocol, state.point.fields()
    return config_of(spec, protocol, window, directory, save_tokens=state.point.joined)


def config_of(spec: Spec, protocol: str, window: dict, directory: Path, save_tokens: bool = False) -> Config:
    """A run's Config: the protocol's fields, the data an end protocol names, the fields given, the window fields."""
    values = {**protocol_values(protocol), **shared_data(spec), **spec.explicit, **window, "protocol": protocol,
              "output_dir": str(directory)}
    values["save_tokens"] = values.get("save_tokens", False) or save_tokens
    cfg = Config(**values)
    check(cfg)
    return cfg


def directory_of(root: Path, k: int, state: State) -> Path:
    return root / STEPS / f"{k:02d}-{state.factor or 'start'}"


def explain(spec: Spec) -> dict | None:
    """Run the chain and write its reports; results.json's summary ({} on processes other than the main one), or
    None when a step was stopped (resumable)."""
    if not spec.explicit.get("output_dir"):
        raise UsageError("explain needs --output-dir: each step is a run with its own directory inside it")
    root = Path(spec.explicit["output_dir"]).absolute()
    first = config_of(spec, spec.start.protocol, spec.start.fields(), root)
    states, _ = _plan(dataclasses.replace(spec, order=None), 2048, False)  # before the model loads: the fields
    for k, state in enumerate(states):  # of the states (the order is checked once the tokenizer is known)
        state_config(spec, state, directory_of(root, k, state))
    _check_steps(root, first)
    with claims.claim(first):
        started = time.perf_counter()
        load = dataclasses.replace(first, output_dir=None, resume=False, overwrite=False)
        return with_model(load, lambda score, loaded: _chain(spec, root, score, loaded, started),
                          owns_process=True)  # a command: Ctrl-C stops a step, resumable


def _plan(spec: Spec, default_length: int, bos: bool) -> tuple[list[State], list[str]]:
    metrics = (spec.metric or PROTOCOLS[spec.start.protocol].headline,
               spec.to_metric or PROTOCOLS[spec.end.protocol].headline)
    return plan(spec.start, spec.end, default_length=default_length, adds_bos=bos, metrics=metrics, order=spec.order)


def _check_steps(root: Path, cfg: Config) -> None:
    """Before the model loads: no step directory holds a run unless --resume or --overwrite says what to do."""
    if cfg.resume or cfg.overwrite or not (root / STEPS).is_dir():
        return
    for directory in sorted((root / STEPS).iterdir()):
        found = claims.previous_run(directory) if directory.is_dir() else None
        if found:
            raise UsageError(f"{directory} holds {found.words}: continue the explain with --resume, replace it with "
                             "--overwrite, or use another --output-dir")


def _chain(spec: Spec, root: Path, score, loaded, started: float) -> dict | None:
    bos = adds_bos(loaded.tokenizer)
    states, order = _plan(spec, min(loaded.info.max_positions or 2048, 2048), bos)
    if any(s.point.joined for s in states) and not getattr(loaded.tokenizer, "is_fast", False):
        raise UsageError("explain: a joined run's tokens are paired with their documents through the tokenizer's "
                         "offset mapping, which only a fast (Rust) tokenizer has; this tokenizer is not one")
    log.info("explain %s -> %s: %s", spec.start.label, spec.end.label, " -> ".join(["start", *order]) or "no step")
    main = loaded.accelerator.is_main_process  # every process scores; the main one writes and reads the files
    runs: list[RunSums] = []
    texts = None
    for k, state in enumerate(states):
        if state.kind == "transformation":
            runs.append(runs[-1])
            continue
        directory = directory_of(root, k, state)
        cfg = state_config(spec, state, directory)
        results = score(cfg)
        if main:
            report_files.write(results, str(directory), plot=cfg.plot, page=cfg.page)
        if not results.summary["complete"]:
            log.warning("explain stopped in %s: rerun the same command with --resume to continue", directory)
            return None
        if main:
            texts = texts or Texts([d.text for d in iter_documents(cfg)], states[-1].point.separator)
            runs.append(run_sums(results.summary, directory, texts))
    if not main:
        return {}
    block = explain_block(states, runs, (spec.start, spec.end), root, notes(spec, states, bos, loaded))
    first = runs[0].summary
    summary = {"explain": block, "complete": True, "model": first["model"], "data": first["data"],
               "environment": first["environment"], "config": {**spec.explicit, "from": spec.start.label,
                                                               "to": spec.end.label, "order": order},
               "timing": {"seconds": time.perf_counter() - started}}
    write_outputs(summary, root)
    return summary


def notes(spec: Spec, states: list[State], bos: bool, loaded) -> list[str]:
    """What a reader of the chain must know: the order's meaning, interactions, the tokenizer's BOS, the data."""
    factors = [s.factor for s in states[1:]]
    out = ["each step's Δ is measured after the steps before it: another --order gives other Δs with the same sum"]
    out += [f"{a} and {b} interact: {why}" for (a, b), why in INTERACTIONS.items() if a in factors and b in factors]
    name = loaded.info.name
    out.append(f"{name}'s tokenizer {'adds' if bos else 'adds no'} BOS: joined streams "
               f"{'begin with BOS (as gptq and llama-cpp put it)' if bos else 'have no prefix token'}")
    if shared_data(spec) and "data_files" in spec.explicit:
        out.append("the data is yours, not the protocol's own dataset: the ends are those protocols on your data")
    return out
