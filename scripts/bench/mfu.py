"""Model FLOPs utilisation of a GPU run: the forward pass's FLOPs per scored token against the card's peak.

FLOPs per token follow PaLM's accounting (appendix B) for a forward pass: 2·N for the weight matrices (N
parameters, the head included, embedding lookups excluded) plus 4·layers·hidden·context for attention.
Peaks are dense bfloat16 tensor-core figures from the vendors' data sheets; another card needs --peak-tflops.
"""
from __future__ import annotations

PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200": 989.4, "A100": 312.0}


def flops_per_token(*, matmul_parameters: int, layers: int, hidden: int, context: int) -> float:
    """Forward FLOPs per token: 2·N + 4·layers·hidden·context."""
    return 2.0 * matmul_parameters + 4.0 * layers * hidden * context


def peak_tflops(device_name: str) -> float | None:
    """The card's dense bfloat16 peak, when `device_name` (torch.cuda.get_device_name) names a known card."""
    name = device_name.upper()
    if "H100" in name:
        return PEAK_BF16_TFLOPS["H100 PCIe" if "PCIE" in name else "H100 NVL" if "NVL" in name else "H100 SXM"]
    for card in ("H200", "A100"):
        if card in name:
            return PEAK_BF16_TFLOPS[card]
    return None


def utilisation(tokens_per_second: float, flops: float, peak: float | None) -> float | None:
    """Achieved FLOP/s over the peak (TFLOP/s), or None without a peak."""
    return tokens_per_second * flops / (peak * 1e12) if peak else None
