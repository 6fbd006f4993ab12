"""GPU check of architectures whose particulars the CPU zoo (tests/test_zoo.py) only sees tiny: Gemma-2 (eager
attention for its attention softcapping, final logit softcap) and gpt-oss (attention sinks, MoE, MXFP4 weights
dequantized to bfloat16) scored in bfloat16 against float32 on a few real documents.

For each model: lm_ce in float32 against a plain float32 reference (the model's own full logits, one window at a
time, batch size 1, no padding: equal token counts, NLL sums within 1e-4 relative), and lm_ce in bfloat16 against
lm_ce in float32 (equal token counts, mean loss within --bf16-tolerance relative). Prints one line per check and
exits 1 when one fails.

    python scripts/gpu_architectures.py --data-files docs.jsonl \\
        --model google/gemma-2-2b --model openai/gpt-oss-20b     # Hub ids (cached) or local directories

gpt-oss-20b in float32 needs about 84 GB of GPU memory (an H200); --device-map auto spreads it otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm_ce.config.fields import Config  # noqa: E402
from lm_ce.runner import evaluate  # noqa: E402


def run(model: str, data: list[str], dtype: str, args) -> dict:
    cfg = Config(model=model, data_files=data, dtype=dtype, max_length=args.max_length, limit=args.limit,
                 progress=False, device_map=args.device_map)
    return evaluate(cfg).summary


def plain_float32(model_name: str, texts: list[str], prefix: int | None, max_length: int) -> tuple[float, int]:
    """tests/reference.py's reference on the model as loaded in float32 (its own full logits, one window at a time,
    lm-eval's rolling windows), not a float64 copy: gpt-oss-20b in float64 would need 168 GB."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.reference import reference_document

    tokenizer = AutoTokenizer.from_pretrained(model_name)
    model = AutoModelForCausalLM.from_pretrained(model_name, dtype=torch.float32, device_map="auto").eval()
    model.reference_as_loaded = True
    sums = [reference_document(model, tokenizer, text, prefix, max_length, max_length) for text in texts]
    return sum(n for n, _ in sums), sum(c for _, c in sums)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--data-files", nargs="+", required=True, help="JSON Lines with a 'text' field")
    parser.add_argument("--limit", type=int, default=8, help="documents scored")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--device-map", default=None)
    parser.add_argument("--bf16-tolerance", type=float, default=0.02)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: this check runs where CUDA is available")
        return 1
    texts = [json.loads(line)["text"] for f in args.data_files for line in open(f, encoding="utf-8")][: args.limit]
    failed = False
    for model in args.model:
        full = run(model, args.data_files, "float32", args)
        half = run(model, args.data_files, "bfloat16", args)
        nll, count = plain_float32(model, [t for t in texts if t.strip()], full["settings"]["prefix_token_id"],
                                   args.max_length)
        checks = {
            "float32 = plain float32 reference": full["counts"]["tokens"] == count
            and math.isclose(full["nll_sum"], nll, rel_tol=1e-4),
            "bfloat16 ~ float32": half["counts"]["tokens"] == full["counts"]["tokens"]
            and math.isclose(half["metrics"]["mean_loss"], full["metrics"]["mean_loss"], rel_tol=args.bf16_tolerance),
        }
        for name, ok in checks.items():
            failed |= not ok
            print(f"{'ok  ' if ok else 'FAIL'} {model}: {name} (float32 {full['nll_sum']:.6f} / {full['counts']['tokens']} "
                  f"tokens, reference {nll:.6f} / {count}, bfloat16 mean loss {half['metrics']['mean_loss']:.6f} against "
                  f"{full['metrics']['mean_loss']:.6f}; attention {half['model']['attn_implementation']}, head "
                  f"{half['model']['head']})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
