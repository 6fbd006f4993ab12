"""`lm-ce explain --from PROTOCOL --to PROTOCOL --output-dir D [--order ...] [--metric M] [--to-metric M]` and the
model and data fields of a run: why two protocols give two numbers, one factor at a time."""
from __future__ import annotations

import sys

from lm_ce.cli.help import EXPLAIN_USAGE

OWN = {"--from": "from", "--to": "to", "--order": "order", "--metric": "metric", "--to-metric": "to_metric"}
REFUSED = ("protocol", "suite", "compare_to", "context_curve", "longppl_evaluator", "shard")


def explain_args(argv: list[str]) -> tuple[dict, list[str]]:
    """(explain's own options, the rest: config fields as a run takes them)."""
    from lm_ce.errors import UsageError

    own, rest, args = {}, [], list(argv)
    while args:
        arg = args.pop(0)
        flag, eq, value = arg.partition("=")
        if flag in OWN:
            if not eq:
                if not args:
                    raise UsageError(f"{flag} needs a value; usage: {EXPLAIN_USAGE.splitlines()[0][7:]}")
                value = args.pop(0)
            own[OWN[flag]] = value
        else:
            rest.append(arg)
    for name in ("from", "to"):
        if name not in own:
            raise UsageError(f"explain needs --{name} PROTOCOL (lm-eval, lm-eval-wikitext, hf-docs, llama-cpp, gptq)")
    return own, rest


def spec_of(argv: list[str]):
    """The explain.run.Spec the command line asks for, or a UsageError naming what is wrong."""
    from lm_ce.config.protocols import WINDOW_FIELDS
    from lm_ce.config.sources import given_values
    from lm_ce.errors import UsageError
    from lm_ce.explain.chain import FACTORS, METRICS, Endpoint
    from lm_ce.explain.run import Spec

    own, rest = explain_args(argv)
    values = given_values(rest)
    window = [k for k in values if k in WINDOW_FIELDS]
    if window:
        flag = window[0].replace("_", "-")
        raise UsageError(f"explain: --{flag} is a window field, which each end's protocol sets; give it with the end "
                         f"it belongs to, e.g. --from lm-eval,{window[0]}=VALUE")
    refused = [k for k in values if k in REFUSED]
    if refused:
        raise UsageError(f"explain: --{refused[0].replace('_', '-')} is not taken (--from and --to name the "
                         "protocols; each step is one plain run)")
    for name in ("metric", "to_metric"):
        if own.get(name) is not None and own[name] not in METRICS:
            raise UsageError(f"--{name.replace('_', '-')} {own[name]}: choose one of {', '.join(METRICS)}")
    order = [f.strip() for f in own["order"].split(",") if f.strip()] if "order" in own else None
    if order is not None and any(f not in FACTORS for f in order):
        raise UsageError(f"--order {own['order']}: factors are {', '.join(FACTORS)}")
    return Spec(Endpoint.parse(own["from"], "--from"), Endpoint.parse(own["to"], "--to"), values, order=order,
                metric=own.get("metric"), to_metric=own.get("to_metric"))


def explain_main(argv: list[str]) -> int:
    """`lm-ce explain ...`: one line and exit 2 for bad input, 130 when a step was stopped (resumable)."""
    if any(a in ("-h", "--help") for a in argv):
        print(EXPLAIN_USAGE)
        return 0
    from lm_ce.errors import UsageError

    try:
        spec = spec_of(argv)
        from lm_ce.explain.report import markdown
        from lm_ce.explain.run import explain

        summary = explain(spec)
    except UsageError as e:
        print(f"lm_ce: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # the model produced NaN/inf
        print(f"lm_ce: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("lm_ce: interrupted (Ctrl-C): rerun the same command with --resume to continue", file=sys.stderr)
        return 130
    if summary is None:
        return 130
    if not summary:  # another process than the main one: the main one reports
        return 0
    print(markdown(summary))
    print(f"wrote {spec.explicit['output_dir']}/: results.json, results.md, results.html, explain.png, steps/")
    return 0
