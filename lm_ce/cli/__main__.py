"""`python -m lm_ce.cli ...`: the command line (as `lm-ce ...`), for launchers that run a module."""
import sys

from lm_ce.cli.main import main

sys.exit(main())
