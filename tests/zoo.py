"""The zoo: a tiny random model of every causal-LM architecture of the installed transformers.

Every model type of transformers' causal-LM auto mapping is built from its own config class with small sizes
(SIZES, filtered to the fields the class takes, sub-configs shrunk the same way), the few settings a type needs
on top (NEEDS), and settings that make its particulars matter in a short test window: logit and attention caps
that bite, sliding windows shorter than the window, several experts per token. The types that cannot be built
small, or are not text models lm_ce can score, are in NOT_BUILT with the reason. Nothing here imports lm_ce.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch

# Sizes every type gets where its config class has the field (GPT-2-style names included).
SIZES = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
    head_dim=8, max_position_embeddings=256, n_embd=32, n_layer=2, n_head=4, n_positions=256, n_inner=64, n_ctx=256,
    d_model=32, ffn_dim=64, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64, num_layers=2,
    num_heads=4, d_ff=64, d_kv=8,
    # mixtures of experts: 4 experts, 2 per token
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    n_shared_experts=1, shared_expert_intermediate_size=32, first_k_dense_replace=1,
    # multi-head latent attention
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    # state-space and linear-attention layers: chunks shorter than the window
    state_size=8, ssm_state_size=8, chunk_size=8, linear_key_head_dim=8, linear_value_head_dim=8,
    # sparse attention that picks fewer keys than the window holds
    index_topk=8, index_head_dim=8, o_lora_rank=16, swa_head_dim=8,
    # what makes the particulars matter in windows of 24 tokens
    sliding_window=8, final_logit_softcapping=3.0, attn_logit_softcapping=2.0, initializer_range=0.2,
    query_pre_attn_scalar=1,  # Gemma's attention scores scaled by 1 (not 1/16): past the attention cap
    logit_scale=0.5, logits_scaling=4.0, lm_head_multiplier=0.5,  # logit scales that are not 1
    output_router_logits=True,
)

# What a type needs beyond SIZES to build small and score as a causal LM (config keyword -> value).
MLA = dict(num_key_value_heads=4, n_group=1, topk_group=1)  # latent attention: key/value heads = query heads; one expert group
MAMBA = dict(mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=8)
NEEDS: dict[str, dict] = {
    **{t: MLA for t in ("axk1", "axk2", "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa",
                        "longcat_flash", "minicpm3", "sarvam_mla", "youtu", "dots3_note_text")},
    # encoders used as decoders: causal only with is_decoder (XLM: causal)
    **{t: dict(is_decoder=True) for t in ("bert", "bert-generation", "big_bird", "camembert", "data2vec-text",
                                          "electra", "ernie", "megatron-bert", "rembert", "roberta",
                                          "roberta-prelayernorm", "roformer", "xlm-roberta", "xlm-roberta-xl",
                                          "roc_bert", "xmod")},
    "xlm": dict(causal=True),
    "xlnet": dict(attn_type="uni"),
    "xmod": dict(is_decoder=True, default_language="en_XX"),
    "roc_bert": dict(is_decoder=True, shape_vocab_size=16, pronunciation_vocab_size=16),
    "reformer": dict(is_decoder=True, attn_layers=["local", "local"], axial_pos_shape=[16, 16],
                     axial_pos_embds_dim=[16, 16], local_attn_chunk_length=8),
    "bailing_hybrid": dict(n_group=1, topk_group=1),
    "codegen": dict(rotary_dim=4),
    "gptj": dict(rotary_dim=4),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=8),
    "bamba": MAMBA,
    "falcon_h1": dict(MAMBA, mamba_d_ssm=64),
    "nemotron_h": dict(mamba_num_heads=8, mamba_head_dim=8, n_groups=1, moe_shared_expert_intermediate_size=32),
    "granitemoehybrid": MAMBA,
    "mamba2": dict(num_heads=8, head_dim=8, n_groups=1, chunk_size=8),
    "zaya": dict(num_experts_per_tok=1),
    "deepseek_v4": dict(output_router_logits=False),  # its auxiliary loss fails on router logits it does not collect
    "flint": dict(output_router_logits=False),
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "dbrx": dict(attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(hidden_size=32, ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2)),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "zamba": dict(num_hidden_layers=3, layers_block_type=["mamba", "hybrid", "hybrid"], attn_layer_period=2, attn_layer_offset=1, n_mamba_heads=2, attention_head_dim=16, mamba_dt_rank=8,
                  use_mamba_kernels=False),
    "zamba2": dict(layers_block_type=["mamba", "hybrid"], hybrid_layer_ids=[1], mamba_headdim=16, n_mamba_heads=4,
                   attention_head_dim=16, use_mamba_kernels=False, mamba_d_state=8),
    "kolibri1_1": dict(head_dim=16, layer_types=["sliding_attention", "indexed_attention"], index_num_heads=1,
                       mlp_only_layers=[0]),
    "gemma3n_text": dict(layer_types=["sliding_attention", "full_attention"], num_kv_shared_layers=0,
                         vocab_size_per_layer_input=512, hidden_size_per_layer_input=8, laurel_rank=8),
    "gemma4_text": dict(vocab_size_per_layer_input=512, hidden_size_per_layer_input=8, per_layer_config={},
                        num_kv_shared_layers=0),
    "gemma4.text_config": dict(vocab_size_per_layer_input=512, hidden_size_per_layer_input=8, per_layer_config={},
                               num_kv_shared_layers=0),
    "kimi_linear": dict(MLA, linear_head_dim=8, linear_num_heads=4, layer_types=["linear_attention", "full_attention"],
                        mlp_layer_types=["dense", "sparse"]),
    "ergo": dict(shared_intermediate_size=64, first_dense_intermediate_size=64,
                 layer_types=["sliding_attention", "full_attention"], mlp_layer_types=["dense", "sparse"]),
    **{f"dots3_note.{name}": dict(adapter_out_dim=32) for name in ("vision_config", "audio_config")},
    "cpmant": dict(dim_head=8, dim_ff=64),
    "blt": dict(encoder_hash_byte_group_vocab=64),
    **{f"blt.{name}": dict(hidden_size_global=32) for name in ("encoder_config", "decoder_config")},
}

# Types built with a vocabulary padded past the tokenizer's (unpadded_vocab_size: the tokenizer's; Inkling's
# forward drops the padded rows' logits, Inkling 2's keeps them).
PADDED_VOCABULARY = ("inkling_text", "inkling2_text", "inkling2_loop_text")

# Types left out, with the reason (each one checked against the installed transformers).
NOT_BUILT: dict[str, str] = {
    "emu3": "Emu3ForCausalLM saves its text config (model_type emu3_text_model), which AutoModelForCausalLM does not load",
    "mllama": "MllamaForCausalLM saves its text config (model_type mllama_text_model), which AutoModelForCausalLM "
              "does not load",
    "musicgen": "an audio-codebook decoder (no text vocabulary); AutoModelForCausalLM's class fails on its own config",
    "musicgen_melody": "an audio-codebook decoder (no text vocabulary); AutoModelForCausalLM's class fails on its own "
                       "config",
    "gemma3n": "its vision tower needs timm, not installed here (gemma3n_text is its language model)",
    "gemma4_assistant": "a draft model for speculative decoding: its forward needs the main model's key/value states",
    "gemma4_unified_assistant": "a draft model for speculative decoding: its forward needs the main model's "
                                "key/value states",
    "dots3_note": "its config sets layers 25-41 of the full model whatever the layer count (dots3_note_text, its "
                  "language model, is built)",
}

# Types lm_ce refuses, with what the refusal says.
REFUSED: dict[str, str] = {
    "cpmant": "is not causal",  # its forward attends over the whole input as context (no causal mask by default)
}

# Types whose reference cannot be transformers' float64 model, with the reason: loaded in float32 and converted
# with .double() (as the other tests' reference is), or used in float32 where no float64 forward works.
DOUBLED_REFERENCE: dict[str, str] = {
    "xlnet": "loaded in float64, its relative position encoding stays float32 (.float() in XLNetModel)",
}
FLOAT32_REFERENCE: dict[str, str] = {
    "blt": "its float64 forward gives NaN logits (a cross-attention mask made for float32 overflows)",
}

# Types scored through the model's own logits (the head probe's fallback), with what its note says: an output
# layer that reads other states than the body's output (an encoder-style prediction head, MiniCPM3's scaled
# hidden states, a projection to another width, ProphetNet's n-gram streams), an output layer that is not a plain
# linear layer, or logits the model leaves uncapped (Gemma-3's multimodal class does not apply the final softcap
# its text config names, which the text-only class applies). Every other exact type uses the chunked head.
READS_OTHER_STATES = "the output layer's input differs from the body's output"
FULL_LOGITS: dict[str, str] = {
    **{t: READS_OTHER_STATES for t in (
        "bert", "big_bird", "camembert", "data2vec-text", "ernie", "inkling_text", "megatron-bert", "minicpm3",
        "modernbert-decoder", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm-roberta",
        "xlm-roberta-xl", "xmod")},
    **{t: "not the body's hidden states" for t in ("electra", "rembert", "prophetnet")},
    **{t: "the output layer is not a plain linear layer" for t in ("dory", "ergo")},
    "gemma3": "the chunked head differs from the model's logits",
}

# Types for which --padding-side left is refused (right padding, the default, is exact for all): recurrent layers
# that read the pad tokens (RecurrentGemma, RWKV, xLSTM, BLT's byte patches), positions counted from the input
# rather than the mask (BART-style and RoBERTa-style decoders, XLM, ProphetNet), a forward that fails on the
# mask (XLNet). The state-space models that mask their pad tokens (Mamba, Mamba-2, Jamba, ...) are exact.
LEFT_PADDING_REFUSED = (
    "bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "blt", "camembert", "data2vec-text", "marian",
    "mbart", "mvp", "pegasus", "plbart", "prophetnet", "recurrent_gemma", "roberta", "roberta-prelayernorm", "rwkv",
    "trocr", "xlm", "xlm-roberta", "xlm-roberta-xl", "xlnet", "xlstm", "xmod",
)

# How --task multiple-choice reads each type's choices (lm_ce/tasks/forward.py probe_cache); the other types read
# several items at once over their shared prefixes. One item at a time: prefixes left-padded across items change
# the figures (positions counted from the input rather than the mask) or fail. Each choice whole: the cache cannot
# be copied per choice, or a copy gives other figures (recurrent and hybrid state caches, models with no cache).
CHOICES_ONE_BY_ONE = (
    "bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "camembert", "data2vec-text", "git", "marian", "mbart",
    "minimax", "mvp", "pegasus", "plbart", "roberta", "roberta-prelayernorm", "trocr", "xlm-roberta", "xlm-roberta-xl",
    "xmod",
)
CHOICES_WHOLE = (
    "bailing_hybrid", "bamba", "blt", "dory", "falcon_mamba", "granitemoehybrid", "jamba", "mamba", "moshi",
    "openai-gpt", "prophetnet", "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_5_text", "qwen3_next",
    "qwen4_exp", "qwen4_exp_text", "recurrent_gemma", "reformer", "rwkv", "xlm", "xlnet", "xlstm", "zamba",
)


def choices_reading(model_type: str) -> str:
    """How results.json's multiple_choice.scoring begins for the type."""
    if model_type in CHOICES_WHOLE:
        return "whole sequences: "
    return "shared prefix, one item at a time: " if model_type in CHOICES_ONE_BY_ONE else "shared prefix"


# The types of the default test run: one of each mechanism (the rest run with the slow tests).
FAST = (
    "llama", "gpt2", "bloom", "mistral", "gemma2", "gemma3_text", "cohere", "granite", "hyperclovax", "falcon_h1",
    "recurrent_gemma", "xlstm", "mamba", "mamba2", "falcon_mamba", "jamba", "mixtral", "gpt_oss", "inkling_text",
    "dory", "minicpm3", "bart", "cpmant", "llama4_text", "rwkv",
)


def config_kwargs(config_class, values: dict) -> dict:
    """The entries of `values` that config_class takes, by their own name or through its attribute_map."""
    params = set(inspect.signature(config_class.__init__).parameters)
    aliases = getattr(config_class, "attribute_map", None) or {}
    kwargs = {}
    for key, value in values.items():
        if key in params:
            kwargs[key] = value
        elif aliases.get(key) in params:
            kwargs.setdefault(aliases[key], value)
    return kwargs


def small_config(model_type: str, vocab_size: int, specials: dict):
    """The config of a tiny `model_type`: SIZES, the tokenizer's vocabulary and special tokens, sub-configs
    (text, vision, ...) shrunk alike, then NEEDS[model_type]."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    values = {**SIZES, "vocab_size": vocab_size, **specials}
    kwargs = config_kwargs(config_class, values)
    subs = getattr(config_class, "sub_configs", None) or {}
    if subs:
        default = config_class()
        for name in subs:
            sub = getattr(default, name, None)
            if sub is not None:
                needs = NEEDS.get(f"{model_type}.{name}", NEEDS.get(getattr(sub, "model_type", ""), {}))
                kwargs[name] = type(sub)(**config_kwargs(type(sub), {**values, **needs})).to_dict()
    kwargs.update(config_kwargs(config_class, NEEDS.get(model_type, {})))
    if model_type in PADDED_VOCABULARY:  # an output layer with rows past the tokenizer's ids
        kwargs.update(vocab_size=vocab_size + 64, unpadded_vocab_size=vocab_size)
    return config_class(**kwargs)


@dataclass
class Built:
    """A tiny model saved with its tokenizer, and that tokenizer as AutoTokenizer loads it from there."""

    model_type: str
    path: str
    class_name: str
    parameters: int
    tokenizer: object


def build(model_type: str, tokenizer, path, seed: int = 0, max_parameters: int = 8_000_000) -> Built:
    """Build, check the size of, and save a tiny random `model_type` with `tokenizer` to `path`. The vocabulary is
    that of the tokenizer AutoTokenizer loads from the directory: for some model types transformers picks the
    family's tokenizer class, which adds its own special tokens to the fixture's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    specials = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    specials = {k: v for k, v in specials.items() if v is not None}
    small_config(model_type, len(tokenizer), specials).save_pretrained(path)
    tokenizer.save_pretrained(path)
    loaded = AutoTokenizer.from_pretrained(path)
    config = small_config(model_type, len(loaded), specials)
    with torch.device("meta"):
        count = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if count > max_parameters:
        raise ValueError(f"{count:,} parameters at the small sizes")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)  # its config can name another model type (a multimodal one's text model)
    loaded = AutoTokenizer.from_pretrained(path)
    return Built(model_type, str(path), type(model).__name__, count, loaded)

def reference_model(path: str, model_type: str | None = None):
    """The model in `path` for the reference: transformers' float64 model (DOUBLED_REFERENCE: float32 then
    .double(); FLOAT32_REFERENCE: float32), eager attention and eager experts (the plain loops)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if model_type in DOUBLED_REFERENCE or model_type in FLOAT32_REFERENCE else torch.float64
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager",
                                                 experts_implementation="eager").eval()
    model.reference_as_loaded = model_type in FLOAT32_REFERENCE
    return model


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """torch's default dtype set while inside (XGLM fills a float64 mask with a float made in the default dtype)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def try_model(model_type: str, tokenizer, path) -> None:
    """Build, save, load back with AutoModelForCausalLM and run one forward pass (raises where one fails)."""
    from transformers import AutoModelForCausalLM

    built = build(model_type, tokenizer, path / model_type)
    model = AutoModelForCausalLM.from_pretrained(built.path).eval()
    with torch.no_grad():
        model(input_ids=torch.arange(3, 11)[None], use_cache=False)


@dataclass
class Result:
    """What the zoo test found for one model type."""

    model_type: str
    outcome: str  # exact | refused | not built
    note: str = ""  # the reason (refused, not built), or what was refused beside an exact result
    class_name: str = ""
    head: str = ""  # results.json's model.head
    attention: str | None = None  # results.json's model.attn_implementation
    error: float | None = None  # largest relative difference of an NLL sum from the reference's
    seconds: float | None = None


RESULTS: dict[str, Result] = {}  # filled by tests/test_zoo.py, printed at the end of the run (conftest.py)


def table(results: dict[str, Result]) -> list[str]:
    """The results as text lines, one per model type, and a count of each outcome."""
    lines = [f"{'model type':26} {'outcome':9} {'max rel err':>11} {'attention':10} head / note"]
    for r in sorted(results.values(), key=lambda r: r.model_type):
        error = f"{r.error:.1e}" if r.error is not None else ""
        note = "; ".join(x for x in (r.head, r.note) if x)
        lines.append(f"{r.model_type:26} {r.outcome:9} {error:>11} {r.attention or '':10} {note}")
    counts = {}
    for r in results.values():
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    seconds = sum(r.seconds or 0 for r in results.values())
    lines.append(", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + f"; {seconds:.0f} s in the scored ones")
    return lines


PAGE = Path(__file__).resolve().parents[1] / "docs" / "data-and-models.md"
BEGIN, END = "<!-- zoo table: python tests/zoo.py writes it -->", "<!-- end of zoo table -->"


def outcome(model_type: str) -> str:
    """What tests/test_zoo.py checks for a model type, in words (the model page's result column)."""
    if model_type in NOT_BUILT:
        return f"not built: {NOT_BUILT[model_type]}"
    if model_type in REFUSED:
        return "refused: not causal (its forward attends over the whole input)"
    notes = ["exact"]
    if model_type in FULL_LOGITS:
        notes.append(f"the model's own logits ({FULL_LOGITS[model_type]})")
    if model_type in LEFT_PADDING_REFUSED:
        notes.append("left padding refused")
    if model_type in CHOICES_ONE_BY_ONE or model_type in CHOICES_WHOLE:
        notes.append("multiple choice " + ("one item at a time" if model_type in CHOICES_ONE_BY_ONE else
                                           "with each choice whole"))
    if model_type in DOUBLED_REFERENCE or model_type in FLOAT32_REFERENCE:
        kind = "float32, .double()" if model_type in DOUBLED_REFERENCE else "float32"
        notes.append(f"{kind} reference: {(DOUBLED_REFERENCE | FLOAT32_REFERENCE)[model_type]}")
    return "; ".join(notes)


def page_table() -> str:
    """The model page's table of architectures: every model type of the installed transformers' causal-LM auto
    mapping, its class and what the zoo test checks for it."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    rows = [f"| `{t}` | `{MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[t]}` | {outcome(t)} |"
            for t in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)]
    return "\n".join([BEGIN, f"Tried with transformers {transformers.__version__}:", "",
                      "| model type | class | result |", "|---|---|---|", *rows, END])


def page_block(text: str) -> str:
    """The table block of the model page's text."""
    return text[text.index(BEGIN) : text.index(END) + len(END)]


if __name__ == "__main__":  # write the table into the model page
    text = PAGE.read_text(encoding="utf-8")
    PAGE.write_text(text.replace(page_block(text), page_table()), encoding="utf-8")
