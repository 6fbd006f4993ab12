"""What lm_ce does with a model beyond the plain ones: the attention implementation (transformers' choice unless
--attn-implementation), a load failure in transformers' own words, the head probe against post-processing it does
not know (in any dtype), and the refusals (a model that is not causal). The zoo (tests/test_zoo.py) checks every
architecture's figures; these check the mechanisms, each one against the float64 reference where a figure is
involved."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import lm_ce
from lm_ce.config.fields import Config
from lm_ce.errors import UsageError
from lm_ce.runner import evaluate
from lm_ce.scoring.head import head_of, logit_scale
from lm_ce.scoring.probe import probe_head

from . import zoo
from .conftest import SENTENCES, make_jsonl
from .reference import reference_document

TEXTS = [" ".join(SENTENCES[:7]), " ".join(SENTENCES[9:12])]
WINDOWS = dict(max_length=24, stride=16, batch_size=4)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return make_jsonl(tmp_path_factory.mktemp("architectures") / "docs.jsonl", [{"text": t} for t in TEXTS])


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory, llama_tokenizer) -> zoo.Built:
    """A tiny Gemma-2 whose attention softcap (2.0) and final logit softcap (3.0) bite."""
    return zoo.build("gemma2", llama_tokenizer, tmp_path_factory.mktemp("gemma2") / "gemma2")


def reference_sum(path: str, tokenizer, prefix: int) -> float:
    """The float64, eager-attention reference NLL sum of TEXTS in document mode."""
    model = zoo.reference_model(path)
    return sum(reference_document(model, tokenizer, t, prefix, WINDOWS["max_length"], WINDOWS["stride"])[0]
               for t in TEXTS)


def score(path: str, data: str, **fields):
    return evaluate(Config(model=path, data_files=[data], progress=False, **{**WINDOWS, **fields}))


def test_gemma2_runs_eager_by_default_and_sdpa_is_refused(gemma2, data):
    """transformers runs Gemma-2 with eager attention (SDPA cannot apply its attention softcapping); lm_ce no
    longer forces SDPA, so the run loads and its figure is the eager reference's. Asked for SDPA, the load is
    refused in transformers' words (the files are not blamed); forced past that check, transformers' SDPA refuses
    the softcap at the first forward. The softcap matters here: without it the figure is another."""
    result = score(gemma2.path, data)
    assert result.summary["model"]["attn_implementation"] == "eager"
    expected = reference_sum(gemma2.path, gemma2.tokenizer, result.summary["settings"]["prefix_token_id"])
    assert result.summary["nll_sum"] == pytest.approx(expected, rel=1e-5)

    with pytest.raises(UsageError) as refused:
        score(gemma2.path, data, attn_implementation="sdpa")
    message = str(refused.value)
    assert "cannot load the model of model directory" in message and "scaled_dot_product_attention" in message
    assert "--attn-implementation" in message and "save_pretrained" not in message

    from transformers import AutoModelForCausalLM

    forced = AutoModelForCausalLM.from_pretrained(gemma2.path)
    forced.config._attn_implementation = "sdpa"  # past transformers' load-time check
    with pytest.raises(ValueError, match="does not support `softcap`"):
        lm_ce.evaluate(forced, gemma2.tokenizer, TEXTS, progress=False, **WINDOWS)
    uncapped = AutoModelForCausalLM.from_pretrained(gemma2.path, attn_logit_softcapping=None)  # attention uncapped
    without = lm_ce.evaluate(uncapped, gemma2.tokenizer, TEXTS, progress=False, **WINDOWS).summary
    assert without["counts"]["tokens"] == result.summary["counts"]["tokens"]
    assert abs(without["nll_sum"] - expected) > 1e-3 * abs(expected)


def test_gemma2_final_softcap_bites(gemma2):
    """The zoo's Gemma-2 has raw logits well past its final cap: a head without the cap gives other losses."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gemma2.path).eval()
    head = head_of(model)
    assert head.softcap == 3.0
    ids = torch.tensor([gemma2.tokenizer(TEXTS[0]).input_ids[:20]])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0]
        own = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    raw = copy.copy(head)
    raw.softcap = None
    assert raw.logits(hidden).abs().max() > 1.5 * head.softcap  # past the cap, where tanh bends
    torch.testing.assert_close(torch.log_softmax(head.logits(hidden).double(), -1), own, rtol=1e-5, atol=1e-5)
    assert (torch.log_softmax(raw.logits(hidden).double(), -1) - own).abs().max() > 0.1


def test_attn_implementation_is_asked_for_and_recorded(tiny_llama_dir, data):
    """--attn-implementation eager loads the model with eager attention (results.json says so) and gives the
    default's figure (SDPA for Llama) within float32 rounding; a name transformers does not know is refused
    before anything loads, with the closest one."""
    default = score(tiny_llama_dir, data).summary
    eager = score(tiny_llama_dir, data, attn_implementation="eager").summary
    assert default["model"]["attn_implementation"] == "sdpa" and eager["model"]["attn_implementation"] == "eager"
    assert eager["config"]["attn_implementation"] == "eager"
    assert eager["nll_sum"] == pytest.approx(default["nll_sum"], rel=1e-5)
    with pytest.raises(UsageError, match=r"--attn-implementation sdpaa is not an attention implementation .* "
                                         r"\(did you mean sdpa\?\)"):
        score(tiny_llama_dir, data, attn_implementation="sdpaa")


def test_a_hub_kernel_name_reaches_transformers_and_its_reason_is_given(tiny_llama_dir, data):
    """A kernel from the Hub (org/repo) passes lm_ce's check; offline, transformers cannot fetch it and says why."""
    with pytest.raises(UsageError) as refused:
        score(tiny_llama_dir, data, attn_implementation="kernels-community/flash-attn2")
    message = str(refused.value)
    assert message.startswith("transformers ") and "flash-attn2" in message and "\n" not in message
    assert "save_pretrained" not in message


def test_attn_implementation_flag_and_yaml_key(tmp_path):
    from lm_ce.config.sources import build_config

    assert build_config(["--attn-implementation", "eager"]).attn_implementation == "eager"
    assert build_config(["--attn_implementation", "sdpa"]).attn_implementation == "sdpa"
    (tmp_path / "run.yaml").write_text("attn_implementation: flex_attention\n")
    assert build_config(["--config", str(tmp_path / "run.yaml")]).attn_implementation == "flex_attention"
    assert build_config([]).attn_implementation is None


class ScaledLogits(torch.nn.Module):
    """A causal LM wrapper whose forward applies to the logits what no Head knows (x + 0.3 sin x, or x * 1.001)."""

    def __init__(self, model, transform):
        super().__init__()
        self.inner, self.transform = model, transform
        self.config = model.config

    def forward(self, input_ids=None, **kwargs):
        out = self.inner(input_ids=input_ids, **kwargs)
        out.logits = self.transform(out.logits)
        return out

    @property
    def base_model(self):
        return self.inner.base_model

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transform", [lambda x: x + 0.3 * torch.sin(x), lambda x: x * 1.001],
                         ids=["sin", "scale-1.001"])
def test_probe_falls_back_for_post_processing_it_does_not_know(tiny_llama, transform, dtype):
    """A transform after the output layer that the Head does not apply is caught in any dtype (the output layer
    is computed in float32 for the probe, so that a 0.1% scale shows even in bfloat16, where the model's own
    logits carry 0.4% rounding), and the run takes the model's own logits."""
    model = ScaledLogits(copy.deepcopy(tiny_llama).to(dtype), transform).eval()
    choice = probe_head(model, head_of(model), torch.device("cpu"))
    assert choice.head is None and choice.note.startswith("full logits (the chunked head differs")
    assert choice.transform_error > 1e-4
    plain = probe_head(model.inner, head_of(model.inner), torch.device("cpu"))
    assert plain.note == "chunked" and plain.transform_error < 1e-6


def test_run_with_unknown_post_processing_gives_the_models_figure(tiny_llama, llama_tokenizer):
    """End to end: the figure of a model with a transform the Head does not know is the reference's (the model's
    own logits), through the fallback."""
    model = ScaledLogits(copy.deepcopy(tiny_llama), lambda x: x + 0.3 * torch.sin(x)).eval()
    result = lm_ce.evaluate(model, llama_tokenizer, TEXTS, progress=False, **WINDOWS).summary
    assert result["model"]["head"].startswith("full logits")
    prefix = result["settings"]["prefix_token_id"]
    expected = sum(reference_document(model, llama_tokenizer, t, prefix, 24, 16)[0] for t in TEXTS)
    assert result["nll_sum"] == pytest.approx(expected, rel=1e-5)


def test_an_encoder_is_refused(tmp_path, llama_tokenizer, data):
    """BERT without is_decoder attends both ways: its 'next-token' loss sees the token; refused in one line."""
    built = zoo.build("bert", llama_tokenizer, tmp_path / "bert")
    config = json.loads((tmp_path / "bert" / "config.json").read_text())
    (tmp_path / "bert" / "config.json").write_text(json.dumps({**config, "is_decoder": False}))
    with pytest.raises(UsageError, match="is not causal: its output at a position changes with a later token"):
        score(built.path, data)


def test_logit_scales_by_family():
    """Cohere multiplies by logit_scale, Granite divides by logits_scaling and HyperCLOVA X multiplies by it,
    Falcon-H1 multiplies by lm_head_multiplier; MPT's logit_scale (which transformers does not apply, and which
    may be a string) is left to the probe."""
    from transformers import CohereConfig, FalconH1Config, GraniteConfig, MptConfig

    assert logit_scale(CohereConfig(logit_scale=0.25)) == 0.25
    assert logit_scale(GraniteConfig(logits_scaling=8.0)) == 1 / 8
    assert logit_scale(FalconH1Config(lm_head_multiplier=0.5)) == 0.5
    config = MptConfig()
    config.logit_scale = "inv_sqrt_d_model"
    assert logit_scale(config) == 1.0
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    assert logit_scale(CONFIG_MAPPING["hyperclovax"](logits_scaling=4.0)) == 4.0
    minicpm3 = CONFIG_MAPPING["minicpm3"]()  # logits_scaling: hidden_size / dim_model_base
    assert math.isclose(logit_scale(minicpm3), 1 / minicpm3.logits_scaling) and minicpm3.logits_scaling != 1


def test_a_model_object_records_its_attention_and_refuses_the_setting(tiny_llama, llama_tokenizer):
    """lm_ce.evaluate on a model in memory: results.json records the attention implementation it was loaded with;
    attn_implementation is for models lm_ce loads (it would change the caller's model)."""
    summary = lm_ce.evaluate(tiny_llama, llama_tokenizer, TEXTS, progress=False, **WINDOWS).summary
    assert summary["model"]["attn_implementation"] == tiny_llama.config._attn_implementation
    with pytest.raises(UsageError, match="attn_implementation applies to a model lm_ce loads"):
        lm_ce.evaluate(tiny_llama, llama_tokenizer, TEXTS, progress=False, attn_implementation="eager", **WINDOWS)
