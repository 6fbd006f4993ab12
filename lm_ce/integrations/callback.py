"""`lm_ce.PerplexityCallback`: the exact perplexity of the model being trained, whenever a Trainer evaluates.

The Trainer logs its evaluation metrics before it calls `on_evaluate`, so a callback cannot add to that
log record before the report_to integrations read it. With `trainer=` given, the figures are logged
through `trainer.log` (their own record in `state.log_history`, and every integration's `on_log`);
without it they are added to the evaluation's record in `state.log_history` and to its metrics.
Either way they are in the metrics `trainer.evaluate()` returns (metric_for_best_model can name them).
The figures are those of the weights as they are: a mixed-precision Trainer's autocast wrapper is set
aside while scoring (lm_ce.evaluate does that for any model).
"""
from __future__ import annotations

import logging

from transformers import TrainerCallback

from lm_ce.config.sources import from_settings
from lm_ce.errors import UsageError
from lm_ce.integrations import api
from lm_ce.rundir.claims import check_free
from lm_ce.sums.records import Results

log = logging.getLogger("lm_ce")

SOURCE = "lm_ce.PerplexityCallback"
PREFIX = "eval_lm_ce_"
FIGURES = {"perplexity": "metrics.perplexity", "bits_per_byte": "metrics.bits_per_byte",
           "mean_loss": "metrics.mean_loss", "tokens": "counts.tokens"}


class PerplexityCallback(TrainerCallback):
    """At each evaluation: eval_lm_ce_perplexity, _bits_per_byte, _mean_loss and _tokens of the model in
    training on `data` (as lm_ce.evaluate takes it), scored in memory on the Trainer's processes."""

    def __init__(self, data, *, trainer=None, tokenizer=None, **settings):
        self.settings = {"progress": False, **settings}  # the Trainer has its own progress bar
        if tokenizer is not None:
            api.check_tokenizer(tokenizer, SOURCE)
        _, checked = api.data_settings(data, self.settings)
        cfg = from_settings(checked, SOURCE)  # refuse bad settings now, not at the first evaluation
        check_free(cfg)  # and an output directory that holds an earlier run, before any training step
        self.data, self.trainer, self.tokenizer = data, trainer, tokenizer
        self.found_tokenizer = None  # the tokenizer on_train_begin found when none was given
        self.figures: dict[str, float] = {}
        self.results: Results | None = None  # the last evaluation's, as lm_ce.evaluate returns it
        self.step: int | None = None  # the global step the figures are from
        self.warned = False

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        """Find the tokenizer before the first training step: a missing one would otherwise end the run at its
        first evaluation, after hours of training perhaps."""
        self.found_tokenizer = self._tokenizer_of(model, processing_class)
        if self.found_tokenizer is None:
            name = api.name_of(model) if model is not None else None
            raise UsageError(
                "PerplexityCallback: no tokenizer to score with: give PerplexityCallback(..., tokenizer=tokenizer) or "
                f"Trainer(..., processing_class=tokenizer) (none loads from the model's name_or_path {name!r} either)"
            )

    def _tokenizer_of(self, model, processing_class):
        """The callback's own tokenizer, else the Trainer's processing_class (a processor's tokenizer), else the one
        saved with the model (from its name_or_path); None when none of these works."""
        given = self.tokenizer or getattr(processing_class, "tokenizer", processing_class)
        if given is not None:
            return given
        name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
        if not name:
            return None
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(name)
        except Exception:  # no tokenizer saved there, offline, or not a path or Hub id at all
            return None

    def on_evaluate(self, args, state, control, model=None, processing_class=None, metrics=None, **kwargs):
        fresh = self.step != state.global_step  # scored once per step, also when several datasets are evaluated
        if fresh:
            self.results = self._results(model, processing_class)
            self.figures = {PREFIX + name: _lookup(self.results.summary, path) for name, path in FIGURES.items()}
            self.step = state.global_step
        if self.trainer is None:
            self._add_to_record(state, metrics or {})
        elif fresh:
            self.trainer.log(dict(self.figures))  # its own record in log_history, and every callback's on_log
        if metrics is not None:
            metrics.update(self.figures)

    def _results(self, model, processing_class) -> Results:
        tokenizer = self.tokenizer or self.found_tokenizer or self._tokenizer_of(model, processing_class)
        accelerator = self.trainer.accelerator if self.trainer is not None else None
        settings = self.settings
        if self.results is not None and settings.get("output_dir") and not settings.get("resume"):
            settings = {**settings, "overwrite": True}  # the report of this training's previous evaluation
        return api.evaluate_with(model, tokenizer, self.data, settings, accelerator=accelerator)

    def _add_to_record(self, state, metrics: dict) -> None:
        """The figures into this evaluation's record in log_history (the Trainer logged it just before)."""
        for entry in reversed(state.log_history):
            if entry.get("step") == state.global_step and all(k in entry for k in metrics if k not in self.figures):
                entry.update(self.figures)
                break
        else:
            state.log_history.append({**self.figures, "step": state.global_step})
        if state.is_world_process_zero and not self.warned:
            log.warning("PerplexityCallback: give trainer=trainer so that the report_to integrations receive the "
                        "figures too (they are in trainer.state.log_history and the evaluation's metrics)")
            self.warned = True


def _lookup(summary: dict, path: str):
    value = summary
    for key in path.split("."):
        value = value[key]
    return value
