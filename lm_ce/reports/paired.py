"""Two finished runs on the same data, compared without loading a model: B minus A, paired by document.

With per-document differences d_c = nll_B,c - nll_A,c over C documents of n_c units (tokens, or bytes
for bits per byte) and N units in all, D = sum_c d_c / N and its standard error is the project's
clustered one applied to differences: SE^2 = C/(C-1) * sum_c (d_c - D n_c)^2 / N^2. Pairing removes
what both runs share (hard documents stay hard), so it is far smaller than either run's own error.
Same tokens (equal token counts in every document): mean loss, ln(PPL_B/PPL_A) and bits per byte;
different tokenizers: bits per byte alone. Stream-mode runs keep no documents.jsonl: they are paired
token by token in blocks of `stride` targets when both saved tokens, else only their totals differ.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lm_ce.errors import UsageError
from lm_ce.files import atomic_write
from lm_ce.reports.tables import md
from lm_ce.reports.agreement import agreement_lines, choice_agreement, task_identity
from lm_ce.rundir import claims as outdir
from lm_ce.rundir import state as saved
from lm_ce.sums.stats import NULL_GROUP, exp_capped, paired

DATA_KEYS = ("source", "dataset", "dataset_config", "split", "text_field", "prompt_field", "join_by", "streaming", "limit")
WINDOW_KEYS = ("max_length", "stride")
MOST_CHANGED = 10


@dataclass
class RunFiles:
    """What a finished run left in its output directory."""

    directory: Path
    summary: dict  # results.json
    documents: list | None  # rows of documents.jsonl (document mode)
    tokens: Path | None  # tokens.parquet, with --save-tokens


def read_run(directory: str) -> RunFiles:
    """The files of one run directory (one clear error when they are missing or unfinished)."""
    path = Path(directory)
    results = path / "results.json"
    if not results.is_file():
        raise UsageError(f"{results} not found: give the --output-dir of a finished lm_ce run")
    try:
        summary = json.loads(results.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{results} is not valid JSON ({e}); rerun that evaluation") from None
    if not summary.get("complete", True):
        raise UsageError(f"{path} holds an interrupted run; finish it with --resume before comparing")
    docs = path / "documents.jsonl"
    documents = None
    if summary.get("settings", {}).get("mode") == "document":
        if not docs.is_file():
            raise UsageError(f"{docs} not found: a document-mode run writes it; rerun that evaluation with --output-dir")
        documents = read_documents(docs)
        saved.check_documents(path, docs)
    tokens = path / "tokens.parquet"
    return RunFiles(path, summary, documents, tokens if tokens.is_file() else None)


DOCUMENT_KEYS = ("index", "tokens", "nll_sum", "bytes")  # what pairing reads from each row of documents.jsonl


def read_documents(path: Path) -> list[dict]:
    """The rows of a run's documents.jsonl, or one line naming the first damaged row."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} cannot be read ({e}); rerun that evaluation") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{number}: not valid JSON ({e.msg}); the file is damaged: rerun that "
                             "evaluation") from None
        missing = [k for k in DOCUMENT_KEYS if not isinstance(row, dict) or k not in row]
        if missing:
            raise UsageError(f"{path}:{number}: not a document row of lm_ce (no {', '.join(missing)}); the file is "
                             "damaged: rerun that evaluation")
        rows.append(row)
    return rows


def check_comparable(a: RunFiles, b: RunFiles) -> bool:
    """Refuse runs on different data, windows or documents (naming what differs); True when they scored the same tokens."""
    x, y = _data_identity(a.summary["data"]), _data_identity(b.summary["data"])
    differ = [f"data.{k}: {x.get(k)!r} vs {y.get(k)!r}" for k in x if x.get(k) != y.get(k)]
    differ += [f"settings.{k}: {a.summary['settings'].get(k)!r} vs {b.summary['settings'].get(k)!r}"
               for k in ("mode", "prefix_token", "separator") if a.summary["settings"].get(k) != b.summary["settings"].get(k)]
    commits = [r.summary["data"].get("resolved_revision") for r in (a, b)]
    if all(commits) and commits[0] != commits[1]:  # a Hub dataset read at two commits (recorded by both runs)
        differ.append(f"data.resolved_revision: {commits[0][:12]} vs {commits[1][:12]}")
    differ += [f"{k}: {x!r} vs {y!r}" for k, x, y in task_identity(a.summary, b.summary) if x != y]
    if differ:
        raise UsageError(f"the runs are on different data or settings ({'; '.join(differ)}): compare runs of the same data")
    if a.documents is None:  # stream mode: the same joined text has the same bytes
        if a.summary["counts"]["bytes"] != b.summary["counts"]["bytes"]:
            raise UsageError(f"the runs scored different text ({a.summary['counts']['bytes']} vs "
                             f"{b.summary['counts']['bytes']} bytes): compare runs of the same data")
        same = a.summary["counts"]["tokens"] == b.summary["counts"]["tokens"]
    else:
        if len(a.documents) != len(b.documents):
            raise UsageError(f"the runs have different documents ({len(a.documents)} vs {len(b.documents)}): "
                             "compare runs of the same data")
        for x, y in zip(a.documents, b.documents):
            for key in ("index", "id", "bytes", "skipped"):
                if x.get(key) != y.get(key):
                    raise UsageError(f"document {x.get('index')} differs ({key}: {x.get(key)!r} vs {y.get(key)!r}): "
                                     "compare runs of the same data")
        same = all(x["tokens"] == y["tokens"] for x, y in zip(a.documents, b.documents))
    tokenizers = [tokenizer_of(r) for r in (a, b)]
    if all(tokenizers):  # recorded by both: the same tokens need the same tokenizer, whatever the counts say
        same = same and tokenizers[0] == tokenizers[1]
    if same:
        windows = [f"{k}: {a.summary['settings'][k]} vs {b.summary['settings'][k]}" for k in WINDOW_KEYS
                   if a.summary["settings"][k] != b.summary["settings"][k]]
        if windows:
            raise UsageError(f"the runs scored the same tokens in different windows ({'; '.join(windows)}): "
                             "compare runs with the same --max-length and --stride")
    return same


def tokenizer_of(run: RunFiles) -> str | None:
    """The sha256 fingerprint of the tokenizer a run scored with (model.tokenizer; None in older runs)."""
    return ((run.summary.get("model") or {}).get("tokenizer") or {}).get("sha256")


def tokens_note(a: RunFiles, b: RunFiles) -> str:
    """Why two runs are compared by bits per byte alone: their tokenizers differ by fingerprint, or (older runs, or
    one tokenizer under other settings) their token counts differ."""
    x, y = tokenizer_of(a), tokenizer_of(b)
    if x and y and x != y:
        why = f"tokenizers differ (fingerprint {x[:12]} vs {y[:12]})"
    elif x and y:
        why = f"the same tokenizer ({x[:12]}) gave different token counts (settings differ)"
    else:
        why = "tokenizers differ (token counts differ; a run has no tokenizer fingerprint)"
    return f"{why}: compared by bits per byte alone, paired by document"


def _data_identity(data: dict) -> dict:
    """What must agree for two runs to have read the same data: local files by content (size and sha256, not
    path), else their names as given; the Hub dataset; how rows were read."""
    out = {k: data.get(k) for k in DATA_KEYS}
    if data.get("files") is not None:
        out["files"] = [f"{f['bytes']} bytes, sha256 {f['sha256'][:12]}" for f in data["files"]]
    else:
        out["data_files"] = data.get("data_files")
    return out


def deltas(a_nll, b_nll, tokens, n_bytes, same: bool) -> dict:
    """delta.mean_loss (same tokens only) and delta.bits_per_byte, paired over the given clusters."""
    out = {"bits_per_byte": paired(a_nll, b_nll, n_bytes, 1 / math.log(2)) if np.sum(n_bytes) else None}
    out["mean_loss"] = paired(a_nll, b_nll, tokens) if same else None
    return out


def compare_runs(dir_a: str, dir_b: str) -> dict:
    """comparison.json: B minus A, paired by document (by block of tokens for streams)."""
    a, b = read_run(dir_a), read_run(dir_b)
    same = check_comparable(a, b)
    if same and a.tokens is not None and b.tokens is not None:
        x, y = read_tokens(a.tokens), read_tokens(b.tokens)
        same = len(x) == len(y) and all(np.array_equal(x[k], y[k]) for k in ("doc", "position", "token_id"))
    out: dict = {"a": _describe(a), "b": _describe(b), "same_tokens": same}
    notes = [] if same else [tokens_note(a, b)]
    if a.documents is not None:
        rows = [(x, y) for x, y in zip(a.documents, b.documents) if not x.get("skipped")]
        a_nll, b_nll = np.array([x["nll_sum"] for x, _ in rows]), np.array([y["nll_sum"] for _, y in rows])
        tokens, n_bytes = np.array([x["tokens"] for x, _ in rows]), np.array([x["bytes"] for x, _ in rows])
        out["paired_by"] = "documents"
        out["delta"] = deltas(a_nll, b_nll, tokens, n_bytes, same)
        out["groups"] = _groups(rows, same, grouped=bool(a.summary["data"].get("group_field")))
        out["most_changed"] = _most_changed(rows)
        if a.summary.get("multiple_choice") and b.summary.get("multiple_choice"):
            out["multiple_choice"] = choice_agreement(rows)
    else:
        out["paired_by"] = "totals"
        out["delta"] = _stream_deltas(a, b, same)
        blocks = out["delta"]["bits_per_byte"]["stderr"] is not None
        notes.append("stream mode keeps no per-document rows: " + (
            "paired token by token, in blocks of `stride` targets (bits per byte: bytes shared out by tokens)" if blocks
            else "only the totals are compared (no standard error); save tokens (--save-tokens) in both runs to pair them"))
    if same:
        ratio = out["delta"]["mean_loss"]
        out["ln_ppl_ratio"] = {"mean": ratio["value"], "stderr": ratio["stderr"]}
        out["perplexity_ratio"] = exp_capped(ratio["value"])
        out["perplexity_ratio_ci95"] = [exp_capped(x) for x in ratio["ci95"]] if ratio["ci95"] else None
    if same and a.tokens is not None and b.tokens is not None:
        out["token_by_token"] = token_by_token(read_tokens(a.tokens), read_tokens(b.tokens), a.summary["settings"]["stride"])
    out["notes"] = notes
    return out


def _describe(run: RunFiles) -> dict:
    s = run.summary
    return {"directory": str(run.directory), "model": s["model"]["name"], "tokens": s["counts"]["tokens"],
            "bytes": s["counts"]["bytes"], "mean_loss": s["metrics"]["mean_loss"], "perplexity": s["metrics"]["perplexity"],
            "bits_per_byte": s["metrics"]["bits_per_byte"], "mean_loss_stderr": s.get("uncertainty", {}).get("mean_loss_stderr")}


def _stream_deltas(a: RunFiles, b: RunFiles, same: bool) -> dict:
    """Totals of two stream runs; paired in blocks of `stride` targets when both saved their tokens."""
    if same and a.tokens is not None and b.tokens is not None:
        stride = a.summary["settings"]["stride"]
        a_nll, tokens = block_sums(read_tokens(a.tokens), stride)
        b_nll, _ = block_sums(read_tokens(b.tokens), stride)
        n_bytes = tokens * (a.summary["counts"]["bytes"] / tokens.sum())  # bytes spread over the blocks by tokens
        return deltas(a_nll, b_nll, tokens, n_bytes, same)
    a_nll, b_nll = np.array([a.summary["nll_sum"]]), np.array([b.summary["nll_sum"]])
    return deltas(a_nll, b_nll, np.array([a.summary["counts"]["tokens"]]), np.array([a.summary["counts"]["bytes"]]), same)


def _groups(rows: list, same: bool, grouped: bool) -> dict:
    """One entry per group (with --group-field); documents whose group is null or missing form the group `(null)`,
    as in a run's own `groups`, so that the groups add up to the totals."""
    out: dict = {}
    names = sorted({x.get("group") for x, _ in rows if x.get("group") is not None}, key=str)
    if not names and not grouped:
        return out
    for name in [*names, None] if any(x.get("group") is None for x, _ in rows) else names:
        part = [(x, y) for x, y in rows if x.get("group") == name]
        out[NULL_GROUP if name is None else name] = {"documents": len(part), "tokens_a": sum(x["tokens"] for x, _ in part),
                     "tokens_b": sum(y["tokens"] for _, y in part), "bytes": sum(x["bytes"] for x, _ in part),
                     "delta": deltas(np.array([x["nll_sum"] for x, _ in part]), np.array([y["nll_sum"] for _, y in part]),
                                     np.array([x["tokens"] for x, _ in part]), np.array([x["bytes"] for x, _ in part]), same)}
    return out


def _most_changed(rows: list) -> list[dict]:
    """The documents whose NLL sum changed most (largest |B - A| in nats: their weight in the delta)."""
    ln2 = math.log(2)
    changed = sorted(rows, key=lambda r: -abs(r[1]["nll_sum"] - r[0]["nll_sum"]))[:MOST_CHANGED]
    return [{"index": x["index"], "id": x.get("id"), "group": x.get("group"), "tokens_a": x["tokens"], "tokens_b": y["tokens"],
             "bytes": x["bytes"], "delta_nll_sum": y["nll_sum"] - x["nll_sum"],
             "bits_per_byte_a": x["nll_sum"] / (x["bytes"] * ln2) if x["bytes"] else None,
             "bits_per_byte_b": y["nll_sum"] / (y["bytes"] * ln2) if y["bytes"] else None} for x, y in changed]


def read_tokens(path: Path) -> dict:
    """The columns of tokens.parquet that pairing needs, as numpy arrays in document and position order."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["doc", "position", "token_id", "nll", "top1_id"])
    columns = {k: table.column(k).to_numpy() for k in table.column_names}
    order = np.lexsort((columns["position"], columns["doc"]))
    return {k: v[order] for k, v in columns.items()}


def block_sums(tokens: dict, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(NLL sum, tokens) per block of `stride` consecutive targets of a document: the clusters of a stream."""
    key = tokens["doc"].astype(np.int64) * (1 << 40) + tokens["position"] // max(stride, 1)
    _, inverse = np.unique(key, return_inverse=True)
    return np.bincount(inverse, tokens["nll"].astype(np.float64)), np.bincount(inverse)


def token_by_token(a: dict, b: dict, stride: int) -> dict:
    """B against A token by token: compare.<name>'s statistics without KL (no distributions were saved)."""
    import torch

    from lm_ce.sums.divergence import Divergence, TokenPairs

    div = Divergence()
    div.add(TokenPairs(nll=torch.from_numpy(a["nll"]), other_nll=torch.from_numpy(b["nll"]), kl=None,
                       same_top1=torch.from_numpy(a["top1_id"] == b["top1_id"]), doc=torch.from_numpy(a["doc"].astype(np.int64)),
                       window=torch.from_numpy(a["position"].astype(np.int64) // max(stride, 1))))
    out = div.summary()
    out["b_better"] = float(np.mean(b["nll"] < a["nll"]))
    return out


def _delta_text(d: dict | None, digits: int = 5) -> str:
    if d is None:
        return "-"
    text = f"{d['value']:+.{digits}f}"
    if d["stderr"] is not None:
        lo, hi = d["ci95"]
        text += f" ± {d['stderr']:.{digits}f} (95%: {lo:+.{digits}f} .. {hi:+.{digits}f})"
    return text


def markdown(c: dict) -> str:
    """comparison.md (and the console text): the deltas, then groups, the most changed documents, token by token;
    model names, directories, notes, groups and ids as literal text (tables.md: no raw HTML from them)."""
    a, b = c["a"], c["b"]
    out = [f"# {md(b['model'])} (B) minus {md(a['model'])} (A)", "", f"A: {md(a['directory'])}  ",
           f"B: {md(b['directory'])}", ""]
    out += [f"- {md(note)}" for note in c["notes"]] + ([""] if c["notes"] else [])
    out += ["| | A | B | B − A (± paired stderr) |", "|---|---|---|---|",
            f"| mean loss (nats/token) | {a['mean_loss']:.6g} | {b['mean_loss']:.6g} | {_delta_text(c['delta']['mean_loss'])} |",
            f"| bits per byte | {_num(a['bits_per_byte'])} | {_num(b['bits_per_byte'])} | {_delta_text(c['delta']['bits_per_byte'])} |",
            f"| perplexity | {a['perplexity']:.6g} | {b['perplexity']:.6g} | ratio {_num(c.get('perplexity_ratio'))} |"]
    unit = "documents" if c["paired_by"] == "documents" else "blocks of tokens"
    delta = c["delta"]["bits_per_byte"] or c["delta"]["mean_loss"] or {}
    if delta.get("stderr") is not None:
        out += ["", f"Paired by {unit} ({delta['clusters']}): SE² = C/(C−1) · Σ_c (d_c − D·n_c)² / N², "
                    "d_c = B − A per cluster."]
    elif c["paired_by"] == "totals":
        out += ["", "Only the totals are compared: no paired standard error (--save-tokens in both runs pairs them)."]
    else:
        out += ["", f"No paired standard error: {delta.get('clusters')} {unit} scored, fewer than two."]
    if c.get("groups"):
        out += ["", "## By group", "", "| group | documents | Δ mean loss | Δ bits per byte |", "|---|---|---|---|"]
        out += [f"| {md(g)} | {v['documents']} | {_delta_text(v['delta']['mean_loss'])} | {_delta_text(v['delta']['bits_per_byte'])} |"
                for g, v in c["groups"].items()]
    if c.get("most_changed"):
        out += ["", "## Documents that changed most (|Δ NLL sum|)", "",
                "| document | id | group | tokens | Δ NLL sum (nats) | bits/byte A | bits/byte B |", "|---|---|---|---|---|---|---|"]
        out += [f"| {r['index']} | {md(r['id'] or '-')} | {md(r['group'] or '-')} | {r['tokens_a']} | {r['delta_nll_sum']:+.4g} | "
                f"{_num(r['bits_per_byte_a'])} | {_num(r['bits_per_byte_b'])} |" for r in c["most_changed"]]
    if c.get("multiple_choice"):
        out += agreement_lines(c["multiple_choice"], lambda d: _delta_text(d, 4))
    t = c.get("token_by_token")
    if t:
        dp, same, ratio = t["delta_p"], t["same_top1"], t["ln_ppl_ratio"]
        out += ["", "## Token by token (both runs saved tokens)", "", "| statistic | value |", "|---|---|",
                f"| tokens | {t['tokens']} |", f"| Cor(ln p_A, ln p_B) | {_num(t['corr_ln_p'])} |",
                f"| mean ln(PPL_B/PPL_A) | {ratio['mean']:.6g} ± {_num(ratio['stderr'])} |",
                f"| mean Δp (p_B − p_A of the target) | {dp['mean']:.6g} ± {_num(dp['stderr'])} |",
                f"| RMS Δp | {dp['rms']:.6g} ± {_num(dp['rms_stderr'])} |",
                f"| Δp percentiles 1 / 50 / 99 | {dp['p1']:.4g} / {dp['median']:.4g} / {dp['p99']:.4g} |",
                f"| same top-1 | {same['mean']:.6g} ± {_num(same['stderr'])} |", f"| tokens where B is better | {t['b_better']:.6g} |"]
    return "\n".join(out) + "\n"


def _num(x) -> str:
    return "-" if x is None else f"{x:.6g}"


def write(comparison: dict, output_dir: str) -> Path:
    """comparison.json and comparison.md in output_dir (created if missing), or a UsageError when it cannot be."""
    directory = Path(output_dir)
    outdir.make(directory)  # a file there, or a folder that cannot be created: one line, as evaluate says it
    try:
        atomic_write(directory / "comparison.json", json.dumps(comparison, indent=2) + "\n")
        atomic_write(directory / "comparison.md", markdown(comparison))
    except OSError as e:
        raise UsageError(f"--output-dir {directory} is not writable ({e.strerror}); give a writable directory") from None
    return directory
