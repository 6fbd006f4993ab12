"""lm_ce/compat.py: each internal of another library that lm_ce reads falls back to the public path when its library
is outside the releases lm_ce knows, or the internal is gone; the result is the same either way."""
from __future__ import annotations

import copy
import types

import pytest
import torch

import lm_ce
from lm_ce import compat
from lm_ce.config.sources import config_for
from lm_ce.data import arrow
from lm_ce.data.documents import iter_documents, opened
from lm_ce.data.reading import ArrowCopy
from lm_ce.errors import InternalError, UsageError
from lm_ce.model import placement

from .conftest import SENTENCES, make_jsonl


def outside(monkeypatch, library: str) -> None:
    """Make the installed `library` a release whose internals lm_ce does not know."""
    monkeypatch.setitem(compat.RANGES, library, ((0, 0), (0, 1)))
    assert not compat.within(library)


def test_the_installed_releases_are_known():
    assert all(compat.within(library) for library in compat.RANGES)


def test_datasets_arrow_files_or_the_dataset_itself(tmp_path, monkeypatch):
    data = make_jsonl(tmp_path / "a.jsonl", [{"text": s} for s in SENTENCES])
    cfg = config_for(data_files=[data], data_cache="output", output_dir=str(tmp_path / "out"))
    assert isinstance(opened(cfg)[0], ArrowCopy)  # the Arrow files, read a record batch at a time
    read = [(d.index, d.text) for d in iter_documents(cfg)]
    outside(monkeypatch, "datasets")
    assert compat.file_instructions(None) is None
    rows = opened(cfg)[0]
    assert not isinstance(rows, ArrowCopy) and arrow.arrow_files(rows, ["text"]) == []  # the public Dataset
    assert [(d.index, d.text) for d in iter_documents(cfg)] == read == list(enumerate(SENTENCES))


def test_a_dataset_read_from_its_files_unless_its_selection_cannot_be_known(tmp_path, monkeypatch):
    import datasets

    data = make_jsonl(tmp_path / "a.jsonl", [{"text": s} for s in SENTENCES])
    dataset = datasets.load_dataset("json", data_files=[data], split="train", cache_dir=str(tmp_path / "cache"))
    assert arrow.arrow_files(dataset, ["text"])  # its own Arrow files
    assert arrow.arrow_files(dataset.select([2, 0]), ["text"]) == []  # a selection on top: iterated
    texts = [d.text for d in iter_documents(config_for(), dataset)]
    monkeypatch.setattr(compat, "DATASET_INDICES", "_renamed")  # a datasets release without the private attribute
    assert arrow.arrow_files(dataset, ["text"]) == []
    assert [d.text for d in iter_documents(config_for(), dataset)] == texts == SENTENCES
    outside(monkeypatch, "datasets")
    assert not compat.plain_files(dataset) and not compat.arrow_streams()


def test_a_fast_tokenizers_build_tables_are_kept_outside_the_known_releases(llama_tokenizer, monkeypatch):
    text = "the cat. the hat, a chat"
    kept = copy.deepcopy(llama_tokenizer)
    before = dict(vars(kept))
    outside(monkeypatch, "transformers")
    assert compat.drop_build_tables(kept) == [] and vars(kept).keys() == before.keys()
    assert kept(text)["input_ids"] == llama_tokenizer(text)["input_ids"]


def test_where_a_module_computes_without_accelerates_hook(tiny_llama, monkeypatch):
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    model = copy.deepcopy(tiny_llama)
    embedding = model.get_input_embeddings()
    add_hook_to_module(embedding, AlignDevicesHook(execution_device="cpu"))
    try:
        assert compat.hook_of(embedding) is not None
        hooked = placement.input_device(model)
        outside(monkeypatch, "accelerate")
        assert compat.hook_of(embedding) is None
        assert placement.input_device(model) == hooked == torch.device("cpu")  # from the weights instead
    finally:
        remove_hook_from_module(embedding)


def autocast_wrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model with the bfloat16 autocast wrapper accelerate puts on a mixed-precision Trainer's model."""
    from accelerate.utils import convert_outputs_to_fp32

    wrapped = copy.deepcopy(model)
    wrapped._original_forward = wrapped.forward
    autocast = torch.autocast(device_type="cpu", dtype=torch.bfloat16)(wrapped.forward.__func__)
    wrapped.forward = types.MethodType(convert_outputs_to_fp32(autocast), wrapped)
    return wrapped


@pytest.mark.parametrize("how", ["known", "outside", "no _original_forward"])
def test_the_mixed_precision_wrapper_is_set_aside_either_way(tiny_llama, llama_tokenizer, monkeypatch, how):
    settings = {"max_length": 32, "progress": False}
    plain = lm_ce.evaluate(tiny_llama, llama_tokenizer, SENTENCES, **settings).summary["nll_sum"]
    wrapped = autocast_wrapped(tiny_llama)
    forward = wrapped.forward
    with torch.no_grad():
        ids = llama_tokenizer(SENTENCES[0], return_tensors="pt").input_ids
        assert not torch.equal(wrapped(ids).logits, tiny_llama(ids).logits)  # the wrapper changes the figures
    if how == "outside":
        outside(monkeypatch, "accelerate")
    elif how == "no _original_forward":
        del wrapped._original_forward
    assert compat.original_forward(wrapped) is not None
    assert lm_ce.evaluate(wrapped, llama_tokenizer, SENTENCES, **settings).summary["nll_sum"] == plain
    assert wrapped.forward == forward  # given back


def test_a_model_without_a_wrapper_has_no_original_forward(tiny_llama):
    assert compat.original_forward(tiny_llama) is None


def test_cpu_half_kernels_unsaid_outside_the_known_releases(monkeypatch):
    known = compat.cpu_half_kernels(torch.bfloat16)
    assert known in (True, False, None) and compat.cpu_half_kernels(torch.float32) is True
    outside(monkeypatch, "torch")
    assert compat.cpu_half_kernels(torch.bfloat16) is None  # nothing said; the figures do not depend on it


def test_a_bug_inside_the_reading_loop_is_not_blamed_on_the_file(tmp_path, monkeypatch):
    """A file datasets cannot read is named in one line; an lm_ce bug while the rows are read is raised as it is."""
    data = make_jsonl(tmp_path / "a.jsonl", [{"text": s} for s in SENTENCES])
    cfg = config_for(data_files=[data])

    def broken(*args, **kwargs):
        raise InternalError("a broken invariant")
        yield  # a generator, as the real one

    monkeypatch.setattr("lm_ce.data.documents.arrow_rows", broken)
    with pytest.raises(InternalError, match="a broken invariant"):
        list(iter_documents(cfg))

    def unreadable(*args, **kwargs):
        raise ValueError("JSON parse error: Invalid value. in row 0")
        yield

    monkeypatch.setattr("lm_ce.data.documents.arrow_rows", unreadable)
    with pytest.raises(UsageError, match=r"cannot read .*a\.jsonl as json: JSON parse error"):
        list(iter_documents(cfg))
