"""Compare two finished runs without loading a model: `python scripts/compare.py RUN_A RUN_B [--output-dir DIR]`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lm_ce.cli.commands import compare_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(compare_main())
