"""Token sequences to windows to batches to exact sums: the settings resolved against the model, the tiled head and its
probe, one batch scored, batches shared across processes, the passes over the data.

May import: errors, files, compat, config, data, model, sums, rundir.
"""
