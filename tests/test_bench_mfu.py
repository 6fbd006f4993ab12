"""scripts/bench/mfu.py: the FLOPs accounting and card peaks behind the benchmark's GPU utilisation figure."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from bench.mfu import flops_per_token, peak_tflops, utilisation  # noqa: E402


def test_flops_per_token_by_hand():
    # 2 * 1000 weights + 4 * 2 layers * 8 hidden * 16 context = 2000 + 1024
    assert flops_per_token(matmul_parameters=1000, layers=2, hidden=8, context=16) == 3024.0


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_of_known_cards_only(name, peak):
    assert peak_tflops(name) == peak


def test_utilisation():
    # 1e4 tokens/s * 1e9 FLOPs per token = 1e13 FLOP/s = 10 TFLOP/s of a 100 TFLOP/s card
    assert utilisation(1e4, 1e9, 100.0) == pytest.approx(0.1)
    assert utilisation(1e4, 1e9, None) is None
