"""One process of tests/test_callback.py's torchrun case: train the tiny model 2 steps with PerplexityCallback
(DDP over gloo), write what this process logged to rank<N>.json, and (rank 0) save the trained weights."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(job_path: str) -> None:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    import lm_ce
    from tests.conftest import SENTENCES

    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(job["model"])
    ids = [tokenizer(s, add_special_tokens=False)["input_ids"][:16] for s in SENTENCES]
    ids = [x + [tokenizer.pad_token_id] * (16 - len(x)) for x in ids]
    train = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(output_dir=str(out / "trainer"), max_steps=2, eval_strategy="steps", eval_steps=2,
                             per_device_train_batch_size=2, per_device_eval_batch_size=2, learning_rate=3e-2,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=train.select(range(4)),
                      processing_class=tokenizer)
    callback = lm_ce.PerplexityCallback(job["texts"], trainer=trainer, **job["settings"])
    trainer.add_callback(callback)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "eval_lm_ce_perplexity" in e]
    rank = trainer.accelerator.process_index
    record = {"figures": {k: v for k, v in logged[0].items() if k.startswith("eval_lm_ce_")},
              "tokens_per_process": callback.results.summary["counts"]["tokens_per_process"]}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        trainer.model.save_pretrained(out / "trained")


if __name__ == "__main__":
    main(sys.argv[1])
