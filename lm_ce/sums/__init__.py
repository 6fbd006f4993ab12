"""What a run accumulates, exactly: float64 sums per document and window, clustered statistics, per-token accumulators
of the analyses (divergence, quantiles, membership signals, the documents shown), and the records that hold them.

Beyond torch and numpy, only UsageError.

May import: errors.
"""
