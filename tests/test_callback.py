"""PerplexityCallback in a real transformers Trainer: a tiny model trained for 2 steps logs, at its
evaluation, the figures lm_ce.evaluate gives on the trained weights; in log_history, to every on_log
(what the report_to integrations listen to), and in the metrics trainer.evaluate() returns."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lm_ce
from lm_ce.integrations.callback import PREFIX

from .conftest import SENTENCES

ROOT = Path(__file__).resolve().parent.parent
NAMES = [PREFIX + name for name in ("perplexity", "bits_per_byte", "mean_loss", "tokens")]
SETTINGS = {"max_length": 24, "stride": 12}


class Seen:
    """A stand-in for a report_to integration: records what every on_log receives."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class Recorder(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                outer.logs.append(dict(logs))

        self.logs: list[dict] = []
        self.callback = Recorder()


def train_two_steps(model_dir: str, tokenizer, tmp_path: Path, callback_of, **arguments):
    """(trainer, texts): a fresh copy of the model trained 2 steps, evaluating at step 2, with callback_of(trainer)."""
    import datasets
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = [tokenizer(s, add_special_tokens=False)["input_ids"][:16] for s in SENTENCES]
    ids = [x + [tokenizer.pad_token_id] * (16 - len(x)) for x in ids]
    labels = [[t if t != tokenizer.pad_token_id else -100 for t in x] for x in ids]
    train = datasets.Dataset.from_dict({"input_ids": ids, "labels": labels})
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=2, eval_strategy="steps", eval_steps=2, logging_steps=1,
        per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=3e-2, report_to="none",
        use_cpu=True, save_strategy="no", disable_tqdm=True, **arguments,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=train.select(range(4)),
                      processing_class=tokenizer)
    trainer.add_callback(callback_of(trainer))
    return trainer


def held_out_texts(texts) -> list[str]:
    return texts[3:9]


def test_callback_logs_what_evaluate_gives_on_the_trained_model(tiny_llama_dir, tiny_llama, llama_tokenizer, texts,
                                                                tmp_path):
    seen = Seen()
    data = held_out_texts(texts)
    trainer = train_two_steps(
        tiny_llama_dir, llama_tokenizer, tmp_path,
        lambda t: lm_ce.PerplexityCallback(data, trainer=t, **SETTINGS),
    )
    trainer.add_callback(seen.callback)
    trainer.train()
    ours = [entry for entry in trainer.state.log_history if NAMES[0] in entry]
    assert len(ours) == 1 and ours[0]["step"] == 2
    assert [{k: v for k, v in logs.items() if k in NAMES} for logs in seen.logs if NAMES[0] in logs] == \
        [{k: ours[0][k] for k in NAMES}]
    model = trainer.model
    expected = lm_ce.evaluate(model, llama_tokenizer, data, progress=False, **SETTINGS).summary
    assert ours[0][PREFIX + "tokens"] == expected["counts"]["tokens"] > 100
    assert ours[0][PREFIX + "perplexity"] == pytest.approx(expected["metrics"]["perplexity"], rel=1e-9)
    assert ours[0][PREFIX + "bits_per_byte"] == pytest.approx(expected["metrics"]["bits_per_byte"], rel=1e-9)
    assert ours[0][PREFIX + "mean_loss"] == pytest.approx(expected["metrics"]["mean_loss"], rel=1e-9)
    before = lm_ce.evaluate(tiny_llama, llama_tokenizer, data, progress=False, **SETTINGS).summary["metrics"]
    assert abs(before["mean_loss"] - expected["metrics"]["mean_loss"]) > 1e-3  # the figure is of the trained weights


def test_without_the_trainer_the_figures_join_the_evaluation_record(tiny_llama_dir, llama_tokenizer, texts, tmp_path):
    data = held_out_texts(texts)
    trainer = train_two_steps(tiny_llama_dir, llama_tokenizer, tmp_path,
                              lambda t: lm_ce.PerplexityCallback(data, **SETTINGS))
    trainer.train()
    records = [entry for entry in trainer.state.log_history if NAMES[0] in entry]
    assert len(records) == 1 and "eval_loss" in records[0] and records[0]["step"] == 2
    expected = lm_ce.evaluate(trainer.model, llama_tokenizer, data, progress=False, **SETTINGS).summary["metrics"]
    assert records[0][NAMES[0]] == pytest.approx(expected["perplexity"], rel=1e-9)
    metrics = trainer.evaluate()  # again at step 2: the figures of step 2, in the metrics and the new record
    assert all(metrics[name] == records[0][name] for name in NAMES)
    assert NAMES[0] in trainer.state.log_history[-1] and "eval_loss" in trainer.state.log_history[-1]


def test_mixed_precision_trainer_logs_the_figure_of_the_weights(tiny_llama_dir, llama_tokenizer, texts, tmp_path):
    """bf16 autocast wraps the model's forward; the figure is still that of the float32 weights, as a fresh
    copy of them gives, through the chunked head (the probe would reject the wrapped forward's bf16 logits)."""
    from transformers import AutoModelForCausalLM

    data = held_out_texts(texts)
    trainer = train_two_steps(tiny_llama_dir, llama_tokenizer, tmp_path,
                              lambda t: lm_ce.PerplexityCallback(data, trainer=t, **SETTINGS), bf16=True)
    trainer.train()
    assert "_original_forward" in trainer.model.__dict__  # accelerate's autocast wrapper is on
    logged = next(entry for entry in trainer.state.log_history if NAMES[0] in entry)
    copy = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    copy.load_state_dict(trainer.model.state_dict())
    expected = lm_ce.evaluate(copy, llama_tokenizer, data, progress=False, **SETTINGS).summary
    assert expected["model"]["head"] == "chunked"
    assert logged[NAMES[0]] == pytest.approx(expected["metrics"]["perplexity"], rel=1e-9)
    again = lm_ce.evaluate(trainer.model, llama_tokenizer, data, progress=False, **SETTINGS).summary
    assert again["model"]["head"] == "chunked" and again["nll_sum"] == pytest.approx(expected["nll_sum"], rel=1e-9)
    assert "_original_forward" in trainer.model.__dict__ and trainer.model.forward is not trainer.model._original_forward


def without_processing_class(trainer):
    """The Trainer as if made without processing_class=tokenizer."""
    trainer.processing_class = trainer.callback_handler.processing_class = None
    return trainer


def test_the_tokenizer_is_found_from_the_models_name_or_path(tiny_llama_dir, llama_tokenizer, texts, tmp_path):
    """Neither the callback nor the Trainer has a tokenizer: the one saved with the model (its name_or_path)."""
    data = held_out_texts(texts)
    trainer = without_processing_class(train_two_steps(tiny_llama_dir, llama_tokenizer, tmp_path,
                                                       lambda t: lm_ce.PerplexityCallback(data, trainer=t, **SETTINGS)))
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if NAMES[0] in entry)
    expected = lm_ce.evaluate(trainer.model, llama_tokenizer, data, progress=False, **SETTINGS).summary["metrics"]
    assert logged[NAMES[0]] == pytest.approx(expected["perplexity"], rel=1e-9)


def test_no_tokenizer_is_refused_before_the_first_training_step(tiny_llama_dir, llama_tokenizer, texts, tmp_path):
    """Was found only at the first evaluation, after the training steps before it had run."""
    from transformers import TrainerCallback

    steps = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    trainer = without_processing_class(train_two_steps(tiny_llama_dir, llama_tokenizer, tmp_path,
                                                       lambda t: lm_ce.PerplexityCallback(held_out_texts(texts), trainer=t)))
    trainer.model.name_or_path = trainer.model.config._name_or_path = ""  # a model built from a config
    trainer.add_callback(Steps())
    with pytest.raises(lm_ce.UsageError, match="PerplexityCallback: no tokenizer to score with: give"):
        trainer.train()
    assert steps == [] and trainer.state.global_step == 0


def test_bad_settings_are_refused_when_the_callback_is_made():
    with pytest.raises(lm_ce.UsageError, match="did you mean 'max_length'"):
        lm_ce.PerplexityCallback(["some text"], max_lenght=128)


WORKER = ROOT / "tests" / "callback_worker.py"


@pytest.mark.slow
def test_callback_under_two_processes(tiny_llama_dir, llama_tokenizer, texts, tmp_path):
    """torchrun, 2 CPU processes (DDP, gloo): both processes log the same figures, share the scoring, and the
    figure equals lm_ce.evaluate in this one process on the trained weights (rank 0 saves them)."""
    from transformers import AutoModelForCausalLM

    job = tmp_path / "job.json"
    job.write_text(json.dumps({"model": tiny_llama_dir, "texts": held_out_texts(texts), "out": str(tmp_path),
                               "settings": SETTINGS}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), str(job)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # the processes agree
    assert all(n > 0 for n in ranks[0]["tokens_per_process"])  # and shared the work
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "trained")
    expected = lm_ce.evaluate(trained, llama_tokenizer, held_out_texts(texts), progress=False, **SETTINGS).summary
    assert ranks[0]["figures"][PREFIX + "tokens"] == expected["counts"]["tokens"]
    assert ranks[0]["figures"][PREFIX + "perplexity"] == pytest.approx(expected["metrics"]["perplexity"], rel=1e-6)
