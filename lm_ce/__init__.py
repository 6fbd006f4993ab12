"""lm_ce: exact token-level cross-entropy, perplexity and bits per byte for causal language models."""

__version__ = "0.1.0"
