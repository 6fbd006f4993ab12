"""The benchmark's parts: cases and targets (spec), processes, the children of each path, tables."""
