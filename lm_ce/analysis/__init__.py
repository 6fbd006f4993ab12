"""What is computed beside the loss with the scoring machinery: other models compared (--compare-to), LongPPL's key
tokens, the context-length curve.

May import: errors, files, compat, config, data, model, sums, rundir, scoring.
"""
