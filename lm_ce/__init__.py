"""lm_ce: exact token-level cross-entropy, perplexity and bits per byte for causal language models.

`lm_ce.evaluate(model, tokenizer, data, **settings)` scores objects in memory; `lm_ce.PerplexityCallback`
does it whenever a transformers Trainer evaluates. Both are imported on first use (the CLI starts fast).
"""

__version__ = "0.1.0"
__all__ = ["evaluate", "PerplexityCallback", "Results", "UsageError"]


def __getattr__(name: str):
    if name == "evaluate":
        from .api import evaluate

        return evaluate
    if name == "PerplexityCallback":
        from .callback import PerplexityCallback

        return PerplexityCallback
    if name == "Results":
        from .records import Results

        return Results
    if name == "UsageError":
        from .errors import UsageError

        return UsageError
    raise AttributeError(f"module 'lm_ce' has no attribute '{name}'")
