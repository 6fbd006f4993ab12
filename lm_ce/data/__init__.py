"""Documents from a Hub dataset, local files or rows in memory, in a fixed order, read a record batch at a time; shards
of them for job arrays.

May import: errors, files, compat, config.
"""
