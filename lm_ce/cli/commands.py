"""The commands that need no model: `lm-ce compare RUN_A RUN_B` and `lm-ce merge SHARD_DIR...` (finished runs), and
`lm-ce cache list|clear` (lm_ce's cache folder)."""
from __future__ import annotations

import sys

from lm_ce.cli.help import CACHE_USAGE, COMPARE_USAGE, MERGE_USAGE


def compare_main(argv: list[str] | None = None) -> int:
    """`lm-ce compare RUN_A RUN_B [--output-dir DIR]` (also scripts/compare.py)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(COMPARE_USAGE)
        return 0
    from lm_ce.errors import UsageError
    from lm_ce.reports import bytecompare, paired

    try:
        runs, output_dir, classes = _compare_args(argv)
        comparison, by_bytes = bytecompare.compare(*runs, classes)
        where = output_dir or runs[1]
        written = bytecompare.write(comparison, by_bytes, where)
    except UsageError as e:
        print(f"lm_ce: error: {e}", file=sys.stderr)
        return 2
    print(paired.markdown(comparison) + (bytecompare.markdown(comparison["bytes"]) if by_bytes else ""))
    print(f"wrote {where}/ ({', '.join(written)})")
    return 0


def _compare_args(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
    """(the two run directories, --output-dir, the --byte-class NAME=REGEX items, each one whole)."""
    from lm_ce.errors import UsageError

    usage = "lm-ce compare RUN_A RUN_B [--output-dir DIR] [--byte-class NAME=REGEX ...]"
    rest, classes = [], []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--byte-class" or arg.startswith("--byte-class="):
            value = arg.split("=", 1)[1] if arg.startswith("--byte-class=") else (args.pop(0) if args else "")
            if not value:
                raise UsageError(f"--byte-class needs NAME=REGEX; usage: {usage}")
            classes.append(value)
        else:
            rest.append(arg)
    runs, output_dir = _run_dirs_args("compare", rest, usage)
    if len(runs) != 2:
        raise UsageError(f"compare needs two run directories: {usage}")
    return runs, output_dir, classes


def _run_dirs_args(command: str, argv: list[str], usage: str) -> tuple[list[str], str | None]:
    """(run directories, --output-dir or None) of a subcommand's arguments."""
    from lm_ce.errors import UsageError

    runs, output_dir, rest = [], None, list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--output-dir" or arg.startswith("--output-dir="):
            value = arg.split("=", 1)[1] if "=" in arg else (rest.pop(0) if rest else None)
            if not value:
                raise UsageError("--output-dir needs a directory")
            output_dir = value
        elif arg.startswith("-"):
            raise UsageError(f"{command}: unknown option {arg}; usage: {usage}")
        else:
            runs.append(arg)
    return runs, output_dir


def merge_main(argv: list[str]) -> int:
    """`lm-ce merge SHARD_DIR... --output-dir OUT`."""
    if any(a in ("-h", "--help") for a in argv):
        print(MERGE_USAGE)
        return 0
    from lm_ce.errors import UsageError
    from lm_ce.reports import merge
    from lm_ce.reports import tables as report

    try:
        directories, output_dir = _run_dirs_args("merge", argv, "lm-ce merge SHARD_DIR... --output-dir OUT")
        if not directories or not output_dir:
            raise UsageError("merge needs the shards' directories and --output-dir: lm-ce merge SHARD_DIR... --output-dir OUT")
        results = merge.merge(directories, output_dir)
    except UsageError as e:
        print(f"lm_ce: error: {e}", file=sys.stderr)
        return 2
    print(report.table(results.summary))
    print(f"wrote {output_dir}/ (merged from {len(directories)} shards)")
    return 0


def cache_main(argv: list[str]) -> int:
    """`lm-ce cache list` (each entry: size, source file, date) and `lm-ce cache clear [NAME...]`."""
    if any(a in ("-h", "--help") for a in argv):
        print(CACHE_USAGE)
        return 0
    if not argv or argv[0] not in ("list", "clear") or (argv[0] == "list" and len(argv) > 1):
        print(f"lm_ce: error: cache: give list or clear: lm-ce cache list | lm-ce cache clear [NAME...] (got "
              f"{' '.join(argv) or 'nothing'})", file=sys.stderr)
        return 2
    import shutil

    from lm_ce.files import cache_root, memo_files
    from lm_ce.model.gguf import cache_entries

    root = cache_root()
    if root is None:
        print("LM_CE_CACHE is set empty: lm_ce keeps no cache on disk")
        return 0
    entries, memos = cache_entries(), memo_files()
    if argv[0] == "list":
        print(f"{root}:")
        for e in entries:
            state = "" if e["finished"] else "  (unfinished: left by a stopped run)"
            print(f"  {e['name']}  {_size(e['bytes'])}  {e['created']}  from {e['source'] or '(unknown)'}{state}")
        print(f"  sha256  {_size(sum(p.stat().st_size for p in memos))}  {len(memos)} memo{'s' * (len(memos) != 1)}")
        print(f"  total  {_size(sum(e['bytes'] for e in entries))} of GGUF weights in {len(entries)} entries")
        return 0
    names = argv[1:]
    known = {e["name"]: e for e in entries}
    unknown = [n for n in names if n not in known and n != "sha256"]
    if unknown:
        print(f"lm_ce: error: cache clear: no entry {', '.join(unknown)} in {root / 'gguf'}; `lm-ce cache list` "
              "names them", file=sys.stderr)
        return 2
    freed = 0
    for e in entries:
        if not names or e["name"] in names:
            shutil.rmtree(e["path"], ignore_errors=True)
            freed += e["bytes"]
            print(f"removed {e['name']} ({_size(e['bytes'])})")
    if not names or "sha256" in names:
        for p in memos:
            p.unlink(missing_ok=True)
        print(f"removed {len(memos)} sha256 memo{'s' * (len(memos) != 1)}")
    print(f"freed {_size(freed)} in {root}")
    return 0


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MB" if n < 2**30 else f"{n / 2**30:,.2f} GB"
