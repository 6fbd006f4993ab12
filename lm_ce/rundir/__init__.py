"""One output directory, one run: the claim on it, the saved state that a resume reads, and the rows and token tables
written as chunks finish.

May import: errors, files, compat, config, sums.
"""
