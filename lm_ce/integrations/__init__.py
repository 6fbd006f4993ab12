"""lm_ce inside other programs: lm_ce.evaluate on objects in memory, the Trainer callback, the datatrove pipeline step.

May import: every package but cli.
"""
