"""lm_ce: exact token-level cross-entropy, perplexity and bits per byte for causal language models.

`lm_ce.evaluate(model, tokenizer, data, **settings)` scores objects in memory; `lm_ce.PerplexityCallback`
does it whenever a transformers Trainer evaluates, and `lm_ce.PerplexityStats` in a datatrove pipeline. Each is
imported on first use (the CLI starts fast). The packages below, in data-flow order, are named in docs/design.md.
"""

__version__ = "0.1.0"
__all__ = ["evaluate", "PerplexityCallback", "PerplexityStats", "Results", "UsageError"]


def __getattr__(name: str):
    if name == "evaluate":
        from lm_ce.integrations.api import evaluate

        return evaluate
    if name == "PerplexityCallback":
        from lm_ce.integrations.callback import PerplexityCallback

        return PerplexityCallback
    if name == "PerplexityStats":  # needs datatrove (pip install 'lm_ce[datatrove]')
        from lm_ce.integrations.datatrove import PerplexityStats

        return PerplexityStats
    if name == "Results":
        from lm_ce.sums.records import Results

        return Results
    if name == "UsageError":
        from lm_ce.errors import UsageError

        return UsageError
    raise AttributeError(f"module 'lm_ce' has no attribute '{name}'")
