"""A datatrove pipeline step: lm_ce's exact document-mode figures for every document that streams through it.

datatrove (Hugging Face's engine for web-scale text) runs a pipeline as independent tasks, locally, on Slurm
or on Ray. `PerplexityStats` loads the model once per task and scores the documents in buffers with
`lm_ce.evaluate`, the command line's own code path, so a document gets the figures documents.jsonl gives it.
"""
from __future__ import annotations

import math

import torch

try:
    from datatrove.data import DocumentsPipeline
    from datatrove.pipeline.base import PipelineStep
    from datatrove.utils.batching import batched
except ImportError as e:  # the optional extra is not installed
    raise ImportError(f"lm_ce.PerplexityStats needs datatrove ({e}): pip install 'lm_ce[datatrove]'") from None

from lm_ce.config.sources import from_settings
from lm_ce.data.documents import lone_surrogate
from lm_ce.errors import UsageError
from lm_ce.integrations.api import evaluate
from lm_ce.model import load as model_lib

SOURCE = "lm_ce.PerplexityStats"
NOTHING_SCORED = "nothing to score"  # how lm_ce.evaluate refuses texts that all tokenize to nothing (summary.py)

# Config fields that have no meaning here, and where the pipeline says the same thing instead.
NOT_HERE = {
    **dict.fromkeys(("dataset", "dataset_config", "split", "data_files", "streaming", "data_cache", "limit",
                     "text_field", "join_by"), "the documents come from the pipeline's reader (its text_key, limit)"),
    **dict.fromkeys(("prompt_field", "group_field", "id_field"), "each document is scored whole and keeps its own "
                    "metadata and id"),
    **dict.fromkeys(("output_dir", "resume", "overwrite", "checkpoint_seconds", "plot", "progress"),
                    "the figures go to each document's metadata; the pipeline's writer and executor save and resume"),
    **dict.fromkeys(("compare_to", "save_tokens", "suite"), "a document's metadata holds one model's figures; use "
                    "the lm-ce command line for this"),
    "shard": "the pipeline's executor shares the documents out to its tasks (each task scores those it reads)",
    **dict.fromkeys(("min_k", "longppl_evaluator", "context_curve"), "a document's metadata holds the five figures of "
                    "documents.jsonl, not these analyses; use the lm-ce command line for them"),
}


class PerplexityStats(PipelineStep):
    """Adds lm_ce's exact figures (document mode) to each document's metadata, under the names of documents.jsonl:

    - lm_ce_nll: float64 sum of the NLL (nats) of the document's scored tokens (documents.jsonl `nll_sum`)
    - lm_ce_tokens: the number of scored tokens (`tokens`; with the default prefix token, every token of the text)
    - lm_ce_bytes: UTF-8 bytes of the text (`bytes`; 0 when nothing was scored)
    - lm_ce_perplexity: exp(lm_ce_nll / lm_ce_tokens) (`perplexity`)
    - lm_ce_bits_per_byte: lm_ce_nll / (lm_ce_bytes * ln 2) (`bits_per_byte`)

    A document with nothing to score (empty text) gets lm_ce_tokens 0, lm_ce_nll 0.0, and 0.0 for both ratios, as
    datatrove's stats do for a ratio with nothing to divide by (documents.jsonl writes null): every document has
    every key, so a filter or a parquet writer never meets a missing or None value; a scored document's perplexity
    is at least 1, so 0.0 marks these. Documents are yielded in the order they came, `documents_per_call` at a time.

documents_per_call: documents per lm_ce.evaluate call (held in memory meanwhile; memory does not grow with the
corpus). The default, 1024, is lm_ce's chunk_documents: a call plans its batches as the CLI plans a chunk, and
the fixed cost of a call (the head probe: about 1 s for SmolLM2-135M on one CPU thread) is spread thin.

    model: a Hub id, local directory, .gguf file or pkg:<module>/<file>, as the CLI's --model. settings: Config
    fields (max_length, stride, dtype, batch_size, token_budget, prefix_token, detokenizer, threads, ...), checked
    here, when the pipeline is built. Task `rank` uses GPU rank % (GPUs) when there are any, else the CPU; with
several local workers on a CPU give threads=cores/workers (each task would take every core otherwise).
    """

    type = "📊 - STATS"
    name = "🎯 lm_ce perplexity"

    def __init__(self, model: str, *, documents_per_call: int = 1024, **settings) -> None:
        super().__init__()
        if not isinstance(model, str):
            raise UsageError(f"{SOURCE}: model must be a model spec (Hub id, directory or .gguf path), so that each "
                             f"task loads its own copy; got a {type(model).__name__}")
        if isinstance(documents_per_call, bool) or not isinstance(documents_per_call, int) or documents_per_call < 1:
            raise UsageError(f"{SOURCE}: documents_per_call must be a whole number of at least 1, got "
                             f"{documents_per_call!r}")
        for key in settings:
            if key in NOT_HERE:
                raise UsageError(f"{SOURCE}: setting '{key}' does not apply to a pipeline step: {NOT_HERE[key]}")
        self.settings = {**settings, "progress": False}
        self.cfg = from_settings({"model": model, **self.settings}, SOURCE)  # bad settings fail before any task runs
        if self.cfg.mode != "document":
            raise UsageError(f"{SOURCE}: mode is '{self.cfg.mode}' (protocol '{self.cfg.protocol}'); only document "
                             "mode gives each document its own figures: use mode='document' or another protocol")
        self.documents_per_call = documents_per_call
        self._loaded: tuple[torch.nn.Module, object] | None = None  # (model, tokenizer), loaded in run()

    def __getstate__(self) -> dict:
        """Pickled without the loaded model: each task loads its own (executors send the step to other machines)."""
        return {**self.__dict__, "_loaded": None}

    def loaded(self, rank: int) -> tuple[torch.nn.Module, object]:
        """(model, tokenizer), loaded through lm_ce on this task's first call."""
        if self._loaded is None:
            model, tokenizer, _ = model_lib.load(self.cfg, device_of(rank))
            self._loaded = (model, tokenizer)
            self.stat_update("lm_ce_model_loads")
        return self._loaded

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data is None:
            return
        for docs in batched(data, self.documents_per_call):
            for doc in docs:  # as lm_ce.evaluate and the command line refuse it, naming the pipeline's document
                if found := lone_surrogate(doc.text if isinstance(doc.text, str) else None):
                    raise UsageError(f"{SOURCE}: document {doc.id!r}: its text holds {found}; fix or drop it in an "
                                     "earlier step (a LambdaFilter)")
            with self.track_time(unit="call"):  # the first call's time includes loading the model
                model, tokenizer = self.loaded(rank)
                figures = figures_of(model, tokenizer, [doc.text for doc in docs], self.settings)
            for doc, values in zip(docs, figures, strict=True):
                doc.metadata.update(values)
                kind = "lm_ce_scored" if values["lm_ce_tokens"] else "lm_ce_empty"
                self.stat_update(kind if isinstance(doc.text, str) else "lm_ce_skipped")
                for key in ("lm_ce_tokens", "lm_ce_bytes", "lm_ce_nll"):
                    self.stat_update(key, value=values[key])
                yield doc


def figures_of(model: torch.nn.Module, tokenizer, texts: list[str], settings: dict) -> list[dict[str, float | int]]:
    """Each text's metadata values, in order, from one lm_ce.evaluate call on the texts that are not empty; a text
    that is no string (None from a step before) is skipped, as the command line skips such a row, with the figures
    of nothing scored (counted as lm_ce_skipped)."""
    figures = [metadata_of(0.0, 0, 0) for _ in texts]
    kept = [i for i, text in enumerate(texts) if text and isinstance(text, str)]
    if not kept:
        return figures
    try:
        results = evaluate(model, tokenizer, [texts[i] for i in kept], **settings)
    except UsageError as e:
        if str(e).startswith(NOTHING_SCORED):  # every text tokenized to nothing: each has 0 tokens, as figures say
            return figures
        raise
    for i, result in zip(kept, results.documents, strict=True):
        figures[i] = metadata_of(result.nll_sum, result.tokens, result.bytes)
    return figures


def metadata_of(nll: float, tokens: int, n_bytes: int) -> dict[str, float | int]:
    """The five metadata values of one document, as documents.jsonl defines them (0.0 for an undefined ratio)."""
    return {
        "lm_ce_nll": nll,
        "lm_ce_tokens": tokens,
        "lm_ce_bytes": n_bytes,
        "lm_ce_perplexity": math.exp(nll / tokens) if tokens else 0.0,
        "lm_ce_bits_per_byte": nll / (n_bytes * math.log(2)) if tokens and n_bytes else 0.0,
    }


def device_of(rank: int) -> torch.device:
    """The device task `rank` scores on: a GPU, spread over the GPUs by rank, or the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device
