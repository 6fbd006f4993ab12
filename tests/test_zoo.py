"""Every causal-LM architecture of the installed transformers (tests/zoo.py builds each tiny and random), scored
by lm_ce from its saved directory as the CLI does, against the float64 reference with eager attention, one window
at a time: equal token counts and NLL sums within 1e-5 relative, in document mode with rolling windows, in stream
mode, and with left padding (exact, or refused for the model); and multiple-choice items (read together over their
shared prefixes, or as the model's cache allows: zoo.choices_reading) against each choice read whole. The types of
zoo.FAST run in the default run, the others with the slow tests; the table of results is printed at the end."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lm_ce.config.fields import Config
from lm_ce.errors import UsageError
from lm_ce.runner import evaluate

from . import tasks_reference, zoo
from .conftest import SENTENCES, make_jsonl
from .reference import reference_document, reference_stream

REL = 1e-5
TEXTS = [" ".join(SENTENCES[:7]), " ".join(SENTENCES[9:12]), "Hi."]  # several windows of 24, one, a single target
DOCUMENT = dict(max_length=24, stride=16, batch_size=4)
STREAM = dict(mode="stream", max_length=24, stride=12, batch_size=3)
# six items read in one group (their prefixes of 23 to 45 tokens padded together), the remainders in two passes
CHOICES = str(Path(__file__).parent / "data" / "tasks" / "mc_items.jsonl")
CHOICE_ROWS = [json.loads(x) for x in Path(CHOICES).read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.fixture(scope="module")
def zoo_data(tmp_path_factory) -> str:
    return make_jsonl(tmp_path_factory.mktemp("zoo") / "docs.jsonl", [{"text": t} for t in TEXTS])


def score(path: str, data: str, **fields):
    return evaluate(Config(model=path, data_files=[data], progress=False, **fields))


def relative(ours: float, reference: float) -> float:
    return abs(ours - reference) / max(abs(reference), 1e-12)


@pytest.mark.parametrize("model_type", [
    pytest.param(t, marks=() if t in zoo.FAST else pytest.mark.slow) for t in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
])
def test_architecture_matches_the_float64_reference(model_type, tmp_path, zoo_data, llama_tokenizer):
    started = time.perf_counter()
    if model_type in zoo.NOT_BUILT:
        with pytest.raises(Exception):  # the reason still holds: building, loading or a forward pass fails
            zoo.try_model(model_type, llama_tokenizer, tmp_path)
        zoo.RESULTS[model_type] = zoo.Result(model_type, "not built", zoo.NOT_BUILT[model_type])
        pytest.skip(f"{model_type}: {zoo.NOT_BUILT[model_type]}")
    built = zoo.build(model_type, llama_tokenizer, tmp_path / model_type)
    if model_type in zoo.REFUSED:
        with pytest.raises(UsageError, match=zoo.REFUSED[model_type]) as refusal:
            score(built.path, zoo_data, **DOCUMENT)
        zoo.RESULTS[model_type] = zoo.Result(model_type, "refused", str(refusal.value), built.class_name)
        return
    document = score(built.path, zoo_data, **DOCUMENT)
    stream = score(built.path, zoo_data, **STREAM)
    try:
        left = score(built.path, zoo_data, padding_side="left", **DOCUMENT)
    except UsageError as e:
        assert "--padding-side left changes the figures" in str(e) or "--padding-side left fails" in str(e)
        left = None
    reference = zoo.reference_model(built.path, model_type)
    dtype = torch.float32 if model_type in zoo.FLOAT32_REFERENCE else torch.float64
    prefix = document.summary["settings"]["prefix_token_id"]
    tokenizer = built.tokenizer  # as lm_ce loads it from the directory
    with zoo.default_dtype(dtype):
        per_document = [reference_document(reference, tokenizer, t, prefix, DOCUMENT["max_length"],
                                           DOCUMENT["stride"]) for t in TEXTS]
        stream_nll, stream_tokens = reference_stream(reference, tokenizer, TEXTS, STREAM["max_length"],
                                                     STREAM["stride"])
    document_nll, document_tokens = sum(n for n, _ in per_document), sum(c for _, c in per_document)
    assert document.summary["counts"]["tokens"] == document_tokens and stream.summary["counts"]["tokens"] == stream_tokens
    errors = {"document": relative(document.summary["nll_sum"], document_nll),
              "stream": relative(stream.summary["nll_sum"], stream_nll)}
    by_document = sorted(document.documents, key=lambda d: d.index)
    errors["worst document"] = max(relative(d.nll_sum, n) for d, (n, c) in zip(by_document, per_document) if c)
    if left is not None:
        errors["left padding"] = relative(left.summary["nll_sum"], document_nll)
    choices = score(built.path, CHOICES, task="multiple-choice", id_field="id", token_budget=1000)
    lm = tasks_reference.LM(reference, tokenizer)
    with zoo.default_dtype(dtype):
        expected = [tasks_reference.lmeval_item(lm, r["context"], r["choices"], [r["label"]]) for r in CHOICE_ROWS]
    errors["multiple choice"] = max(relative(a, b) for d, e in zip(choices.documents, expected)
                                    for a, b in zip(d.task.choice_loglikelihoods, e["loglikelihoods"]))
    zoo.RESULTS[model_type] = zoo.Result(
        model_type, "exact", "" if left is not None else "left padding refused", built.class_name,
        head=document.summary["model"]["head"], attention=document.summary["model"]["attn_implementation"],
        error=max(errors.values()), seconds=time.perf_counter() - started)
    assert max(errors.values()) <= REL, errors
    assert math.isfinite(document.summary["metrics"]["perplexity"])
    head = document.summary["model"]["head"]
    assert (head == "chunked") if model_type not in zoo.FULL_LOGITS else zoo.FULL_LOGITS[model_type] in head, head
    assert (left is None) == (model_type in zoo.LEFT_PADDING_REFUSED)
    assert choices.summary["multiple_choice"]["scoring"].startswith(zoo.choices_reading(model_type))


def test_the_model_page_lists_every_architecture_as_the_zoo_checks_it():
    """docs/data-and-models.md's table is the one tests/zoo.py writes (python tests/zoo.py) for the installed
    transformers: every model type of the causal-LM mapping, with what this test checks for it."""
    import transformers

    page = zoo.page_block(zoo.PAGE.read_text(encoding="utf-8"))
    if f"transformers {transformers.__version__}:" not in page:
        pytest.skip(f"the page's table was written with another transformers than {transformers.__version__}: "
                    "python tests/zoo.py writes it again")
    assert page == zoo.page_table(), "the model page's table is stale: python tests/zoo.py writes it again"
    assert set(zoo.NOT_BUILT) | set(zoo.REFUSED) | set(zoo.FULL_LOGITS) <= set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
