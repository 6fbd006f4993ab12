"""Session fixtures: local byte-level BPE tokenizers and tiny random causal LMs saved to disk.

Nothing here touches the network: tokenizers are trained on inline text and models are built
from configs, then saved with save_pretrained so that the Auto* classes load them from a path.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read their constants
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# lm_ce's cache (GGUF weights, signed sha256 memos) in a folder of this session, never the user's home
_CACHE = __import__("tempfile").mkdtemp(prefix="lm_ce-test-cache-")
os.environ["LM_CE_CACHE"] = _CACHE
__import__("atexit").register(__import__("shutil").rmtree, _CACHE, True)

# Hermetic: what a test run writes for itself goes to one temporary folder for the whole session, never the user's
# home: datasets' Arrow copies, the Hub's cache, lm_ce's sha256 memo and GGUF cache (SmolLM2's dequantized weights
# are made once per session and shared by the real-model tests), matplotlib's font cache. Set before anything
# imports datasets, huggingface_hub or matplotlib, which read these once. tests/test_hermetic.py checks it.
SESSION_CACHE = Path(tempfile.mkdtemp(prefix="lm_ce-tests-"))
for _name, _folder in {"HF_HOME": "huggingface", "HF_HUB_CACHE": "huggingface/hub",
                       "HF_DATASETS_CACHE": "huggingface/datasets", "LM_CE_CACHE": "lm_ce",
                       "MPLCONFIGDIR": "matplotlib", "XDG_CACHE_HOME": "xdg"}.items():
    os.environ[_name] = str(SESSION_CACHE / _folder)
for _name in ("HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):  # older names that would win over HF_HOME
    os.environ.pop(_name, None)
os.environ["MPLBACKEND"] = "Agg"  # no display: what a plot a test draws needs (lm_ce itself never sets a backend)

import json
import random
import signal

import pytest
import torch

# Tiny models are fastest on one thread, and with 2 threads on a busy 2-core machine every forward
# pass waits ~0.25 s on the thread pool. OMP_NUM_THREADS, when set, wins.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"  # lm_ce keeps the thread count it finds when this is set
    torch.set_num_threads(1)

# Sentences the tokenizers are trained on, and the material documents are made of.
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "In 1999, prices rose by 3.5% (roughly) and fell again in 2001.",
    "She said: \"Don't forget the keys, the map, and the 42 apples!\"",
    "Is it raining? No -- it's snowing; bring a coat.",
    "We met at the café near the station; the croissants were naïve but good.",
    "Email me at someone@example.com or call +1-555-0100 before 9:30 a.m.",
    "def f(x):\n    return x * 2  # doubles the input\n",
    "Cross-entropy measures how far a predicted distribution is from the true one.",
    "A language model assigns a probability to every next token, given the previous ones.",
    "Perplexity is the exponential of the average negative log-likelihood per token.",
    "Over the hills and far away, the river ran cold and clear under the bridge.",
    "Numbers like 0, 7, 13, 256 and 65536 appear in many programs.",
    "Tabs\tand  double  spaces, trailing spaces   \nand blank lines\n\nare whitespace too.",
    "Good morning! How are you today? I'm fine, thanks :) 🙂",
    "The committee's report (pages 12-19) was approved unanimously on Tuesday.",
    "Üben macht den Meister, sagte die Lehrerin; la vie est belle; ¿qué tal?",
    "Lists: first, second, third; then [brackets], {braces} and <angles>.",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
]

LLAMA_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
GPT2_EOT = "<|endoftext|>"


def corpus_rows(count: int) -> list[dict]:
    """`count` documents of 1-5 sentences with ids and three groups (one of them null); document 5 is empty and
    document 9 is not text, so that a run counts both as skipped."""
    rows = [{"text": " ".join(SENTENCES[(i * 7 + k) % len(SENTENCES)] for k in range(1 + i % 5)), "id": f"d{i}",
             "group": ["a", "b", None][i % 3]} for i in range(count)]
    rows[5]["text"] = ""
    rows[9]["text"] = None
    return rows


def chunked_settings(model: str, data: str, out, **fields):
    """A Config of corpus_rows scored in chunks of 8 documents, 2 windows a batch, windows of 24 tokens."""
    from lm_ce.config.fields import Config

    return Config(**{"model": model, "data_files": [data], "id_field": "id", "group_field": "group", "max_length": 24,
                     "stride": 12, "batch_size": 2, "chunk_documents": 8, "output_dir": str(out) if out else None,
                     "progress": False, **fields})


def make_jsonl(path: str | os.PathLike, rows: list[dict]) -> str:
    """Write rows as JSON Lines (UTF-8, non-ASCII kept) and return the path as a string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


def _training_corpus() -> list[str]:
    """A few KB of varied text, deterministic."""
    rng = random.Random(1234)
    lines = list(SENTENCES)
    for _ in range(40):
        k = rng.randint(1, 4)
        lines.append(" ".join(rng.sample(SENTENCES, k)))
    return lines


def train_byte_level_bpe(special_tokens: list[str], vocab_size: int = 512):
    """A byte-level BPE `tokenizers.Tokenizer` trained on the inline corpus, no post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer)
    return tok


def _check_no_auto_specials(tok) -> None:
    """Calling the tokenizer must not add any special token, with or without add_special_tokens."""
    sample = "Hello café 🙂 123"
    plain = tok(sample, add_special_tokens=False).input_ids
    default = tok(sample).input_ids
    assert plain == default, (plain, default)
    specials = set(tok.all_special_ids)
    assert not specials & set(default), default
    assert tok.decode(default) == sample


def _save_tokenizer(path: Path, specials: dict[str, str]) -> Path:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    names = list(dict.fromkeys(specials.values()))
    fast = PreTrainedTokenizerFast(tokenizer_object=train_byte_level_bpe(names), **specials)
    _check_no_auto_specials(fast)
    fast.save_pretrained(path)
    reloaded = AutoTokenizer.from_pretrained(path)
    _check_no_auto_specials(reloaded)
    return path


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory) -> str:
    """Llama-style tokenizer: <s> bos, </s> eos, <pad> pad, never added automatically."""
    return str(_save_tokenizer(tmp_path_factory.mktemp("tok_llama"), LLAMA_SPECIALS))


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory) -> str:
    """GPT-2-style tokenizer: a single <|endoftext|> as bos and eos, no pad token."""
    return str(_save_tokenizer(tmp_path_factory.mktemp("tok_gpt2"), {"bos_token": GPT2_EOT, "eos_token": GPT2_EOT}))


@pytest.fixture(scope="session")
def llama_tokenizer(llama_tokenizer_dir):
    """The llama-style tokenizer loaded with AutoTokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_tokenizer_dir)


@pytest.fixture(scope="session")
def gpt2_tokenizer(gpt2_tokenizer_dir):
    """The GPT-2-style tokenizer loaded with AutoTokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)


SMALL = dict(  # the shape every tiny model shares (GPT-2 names its sizes n_embd, n_layer, n_head)
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=256,
)


def tiny_model_dir(path: Path, architecture: str, tokenizer, *, seed: int, init, **config) -> str:
    """A tiny random transformers `architecture` with this tokenizer's vocabulary and special tokens, built with
    `seed`, then `init(model)` (under no_grad) to set its weights; saved with the tokenizer. Returns the path.

    All start from initializer_range 0.3: peaked attention, so that losses depend on the context a window gives."""
    import transformers

    model_class = getattr(transformers, architecture)
    specials = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        specials["pad_token_id"] = tokenizer.pad_token_id
    model_config = model_class.config_class(vocab_size=len(tokenizer), initializer_range=0.3, **specials, **config)
    torch.manual_seed(seed)
    model = model_class(model_config)
    with torch.no_grad():
        init(model)
    model.eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, llama_tokenizer) -> str:
    """LlamaForCausalLM (hidden 32, 2 layers, 4 heads / 2 kv heads, untied head) with tokenizer (a)."""

    def init(model):
        model.lm_head.weight.normal_(0.0, 0.5)  # far from uniform next-token distributions
        model.model.embed_tokens.weight.normal_(0.0, 1.0)

    return tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"), "LlamaForCausalLM", llama_tokenizer, seed=0,
                          init=init, num_key_value_heads=2, tie_word_embeddings=False, **SMALL)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, gpt2_tokenizer) -> str:
    """GPT2LMHeadModel (n_embd 32, 2 layers, 4 heads, n_positions 128, tied head) with tokenizer (b)."""

    def init(model):
        model.transformer.wte.weight.normal_(0.0, 0.5)  # tied: also the head
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()

    return tiny_model_dir(tmp_path_factory.mktemp("tiny_gpt2"), "GPT2LMHeadModel", gpt2_tokenizer, seed=1, init=init,
                          n_embd=32, n_layer=2, n_head=4, n_positions=128)


@pytest.fixture(scope="session")
def tiny_gemma_softcap_dir(tmp_path_factory, llama_tokenizer) -> str:
    """Gemma2ForCausalLM with final_logit_softcapping=5.0 (the cap matters), tokenizer (a)."""
    import transformers

    if not hasattr(transformers, "Gemma2ForCausalLM"):
        pytest.skip("transformers has no Gemma2ForCausalLM")

    def init(model):
        model.model.embed_tokens.weight.normal_(0.0, 1.0)  # tied head: raw logits reach well past the cap

    return tiny_model_dir(tmp_path_factory.mktemp("tiny_gemma_softcap"), "Gemma2ForCausalLM", llama_tokenizer, seed=2,
                          init=init, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                          final_logit_softcapping=5.0, **SMALL)


def _load(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    """The tiny llama loaded from its directory (float32, eval). Shared: do not modify it."""
    return _load(tiny_llama_dir)


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir):
    """The tiny GPT-2 loaded from its directory (float32, eval). Shared: do not modify it."""
    return _load(tiny_gpt2_dir)


@pytest.fixture(scope="session")
def tiny_gemma_softcap(tiny_gemma_softcap_dir):
    """The tiny soft-capped Gemma 2 loaded from its directory (float32, eval). Shared: do not modify it."""
    return _load(tiny_gemma_softcap_dir)


@pytest.fixture(scope="session")
def bos_adding_llama_dir(tiny_llama_dir, tmp_path_factory) -> str:
    """The tiny llama with a tokenizer whose post-processor prepends <s> (as Llama/Mistral/Gemma tokenizers do)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny_llama_addbos")
    shutil.copytree(tiny_llama_dir, path, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(path)
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tok.save_pretrained(path)
    reloaded = AutoTokenizer.from_pretrained(path)
    assert reloaded("Hello").input_ids[0] == bos, "the post-processor did not survive save_pretrained"
    assert bos not in reloaded("Hello", add_special_tokens=False).input_ids
    return str(path)


def _long_document(rng: random.Random, n_sentences: int) -> str:
    """Sentences drawn with replacement, joined by spaces with an occasional paragraph break."""
    parts = []
    for i in range(n_sentences):
        parts.append(rng.choice(SENTENCES))
        parts.append("\n\n" if rng.random() < 0.15 else " ")
    return "".join(parts).rstrip()


@pytest.fixture(scope="session")
def texts() -> list[str]:
    """Documents of very different lengths: empty, 1 char, whitespace, short, non-English, ~100-2000 tokens."""
    rng = random.Random(0)
    return [
        "",
        "a",
        "   \n",
        "Hello world.",
        "Is it 3.14 or 22/7? Both, roughly; see §2.",
        "Le café était fermé, alors nous avons marché jusqu'à la gare. Ça va? 😀🎉",
        "交叉熵损失函数衡量两个概率分布之间的差异。Ελληνικά και русский текст. 🐍🦀",
        " Leading space, trailing newline.\n",
        _long_document(rng, 3),  # ~100 tokens with the tiny tokenizers
        _long_document(rng, 10),  # ~300 tokens
        _long_document(rng, 25),  # ~800 tokens
        _long_document(rng, 60),  # ~2000 tokens
    ]


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(rows, name="data.jsonl") -> path of a JSONL file in this test's tmp_path."""

    def write(rows: list[dict], name: str = "data.jsonl") -> str:
        return make_jsonl(tmp_path / name, rows)

    return write


def perturbed_copy(source_dir: str, path, *, seed: int, scale: float):
    """A copy of the model in source_dir with Gaussian noise (scale, seed) added to every weight, saved to path
    with the same tokenizer: a second model that shares the first one's tokenizer. Returns (path, model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source_dir)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(source_dir).save_pretrained(path)
    return str(path), model


def saved_run(directory):
    """The records.Run saved in a run directory (state.json and its records' file)."""
    from lm_ce.rundir import state

    return state.load(Path(directory))["run"]


def stop_at_batch(monkeypatch, at: int | None) -> dict:
    """Make the `at`-th batch scored send SIGINT to this process (what Ctrl-C does: the run saves and stops).
    Returns the counter {"n": batches so far, "stop": at}, which a test may change; monkeypatch.undo() ends it."""
    from lm_ce.scoring.scorer import Scorer

    calls = {"n": 0, "stop": at}
    score = Scorer.score

    def score_then_signal(self, batch, tally):
        calls["n"] += 1
        if calls["n"] == calls["stop"]:
            os.kill(os.getpid(), signal.SIGINT)
        return score(self, batch, tally)

    monkeypatch.setattr(Scorer, "score", score_then_signal)
    return calls


def whole_and_resumed(score, monkeypatch, at: int, directory: Path, **fields) -> tuple:
    """(whole, resumed): `score(**fields)` run once to its end, and once stopped by Ctrl-C at the `at`-th batch as the
    command line stops (`score(..., owns_process=True)`: checked to be incomplete), then resumed to its end (checked
    complete); in directory/whole and directory/run."""
    whole = score(**fields, output_dir=str(directory / "whole"))
    stop_at_batch(monkeypatch, at)
    assert score(**fields, output_dir=str(directory / "run"), owns_process=True).summary["complete"] is False
    monkeypatch.undo()
    resumed = score(**fields, output_dir=str(directory / "run"), resume=True)
    assert resumed.summary["complete"] is True
    return whole, resumed


def pytest_sessionfinish(session, exitstatus):
    """The session's caches go with it."""
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    """The zoo test's table (tests/test_zoo.py), when it ran."""
    from . import zoo

    if zoo.RESULTS:
        terminalreporter.section("architectures (tests/test_zoo.py)")
        for line in zoo.table(zoo.RESULTS):
            terminalreporter.write_line(line)
