"""The command line: `lm-ce` (also scripts/evaluate.py) and its subcommands; bad input is one line and exit 2.

May import: every package but integrations.
"""
