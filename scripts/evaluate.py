"""Evaluate a causal LM's cross-entropy and perplexity: `python scripts/evaluate.py --model gpt2`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lm_ce.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
