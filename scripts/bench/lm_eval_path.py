"""lm-evaluation-harness's rolling log-likelihood, as a script using its HFLM runs it (a whole-process peer).

HFLM gets lm_ce's directory of dequantized weights (a plain model directory), the case's max_length, batch
size and dtype, and add_bos_token=False, so that both score the same tokens.
"""
from __future__ import annotations

import time

from .measure import read_texts, status_mb


def run_lm_eval(spec: dict, mode: str) -> dict:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    texts = read_texts(spec["data"])
    t0 = time.perf_counter()
    lm = HFLM(pretrained=spec["model_dir"], backend="causal", max_length=spec["max_length"],
              batch_size=spec["batch_size"], device="cpu", dtype=spec["dtype"], add_bos_token=False)
    loaded = time.perf_counter()
    after_load = status_mb("VmRSS")
    requests = [Instance(request_type="loglikelihood_rolling", doc={"text": t}, arguments=(t,), idx=i)
                for i, t in enumerate(texts)]
    loglikelihoods = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    end = time.perf_counter()
    return {
        "path": mode, "tokens": sum(len(lm.tok_encode(t)) for t in texts), "nll_sum": -sum(loglikelihoods),
        "seconds": end - loaded, "load_seconds": loaded - t0, "prefix_token_id": lm.prefix_token_id,
        "memory": {"after_load_mb": after_load},
    }
