"""`lm-ce explain`: why two protocols give two numbers. The chain of configurations from one protocol to the other,
one factor at a time, each a run (scored with one model load) or an exact transformation of one, and each step's
log Δ with its paired standard error.

May import: every package but integrations and cli.
"""
