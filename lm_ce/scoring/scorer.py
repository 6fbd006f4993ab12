"""Scoring one batch of windows into a tally: inputs, the model's body, the head on scored positions only.

Out of memory on a batch, the batch is scored in halves instead (said once).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import torch

from lm_ce.scoring.head import Head, TokenLosses, logits_losses, pair_losses, token_losses
from lm_ce.scoring.windows import Window
from lm_ce.sums.divergence import TokenPairs
from lm_ce.sums.records import Tally, WindowSums
from lm_ce.sums.signals import TokenSignals

log = logging.getLogger("lm_ce")


@dataclass
class BatchSums:
    """What one batch added: scored tokens and their NLL sum (for the progress bar)."""

    tokens: int = 0
    nll: float = 0.0

    def __add__(self, other: BatchSums) -> BatchSums:
        return BatchSums(self.tokens + other.tokens, self.nll + other.nll)


@dataclass
class ComparedModel:
    """A --compare-to model that shares the first model's tokenizer: scored on the same tokens."""

    model: torch.nn.Module
    head: Head


@dataclass
class Scorer:
    """What scoring a batch needs: the model's body and head (or full logits as a fallback), and the models compared."""

    model: torch.nn.Module
    head: Head | None  # None: the head cannot be split, use full logits
    device: torch.device
    pad_left: bool
    others: list[ComparedModel] = field(default_factory=list)
    want_top1: bool = False
    want_signals: bool = False  # --min-k: each token's log p and z (the head's mean and spread of log p too)
    _warned: bool = False

    @torch.inference_mode()
    def score(self, batch: list[Window], tally: Tally) -> BatchSums:
        """Score a batch into the tally. Out of memory: score each half instead."""
        try:
            return self.score_batch(batch, tally)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if len(batch) == 1 or not out_of_memory(e):
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if not self._warned:
                log.warning("out of memory on a batch of %d windows: splitting batches in halves and retrying", len(batch))
                self._warned = True
            half = len(batch) // 2
            return self.score(batch[:half], tally) + self.score(batch[half:], tally)

    def score_batch(self, batch: list[Window], tally: Tally) -> BatchSums:
        """Score a whole batch at once into the tally."""
        inputs, rows, in_window = self.batch_inputs(batch)
        targets = torch.cat([w.seq[w.a + 1 : w.b + 1] for w in batch]).to(self.device)
        rows = rows.to(self.device)
        compared = []
        if self.others:
            hidden = final_hidden(self.model, inputs, rows)
            # The first model's own figures by the tiled head, as without compared models: the same float32 values
            # bit for bit (the pairs' log_softmax over whole rows rounds differently, ~1e-9 of the NLL sum)
            out = token_losses(hidden, targets, self.head, want_top1=self.want_top1, want_moments=self.want_signals)
            for other in self.others:
                pair = pair_losses(hidden, self.head, final_hidden(other.model, inputs, rows), other.head, targets)
                compared.append(dataclasses.replace(pair, nll=out.nll.to(pair.nll.device)))
        else:
            out = self._losses(inputs, rows, targets)
        nll = out.nll.cpu()
        sums = _add_windows(batch, nll, tally)
        if self.want_signals:
            tally.signals = tally.signals or TokenSignals()
            tally.signals.add_batch(batch, nll, out.mean, out.std)
        tally.positions.add(in_window, nll)
        if compared:
            _add_divergences(batch, compared, tally)
        if self.want_top1:
            tally.token_blocks.append(_token_columns(batch, targets, nll, out.top1, in_window, compared))
        width = inputs["input_ids"].shape[1]
        real = sum(w.length for w in batch)
        tally.inputs += real
        tally.padding += width * len(batch) - real
        return sums

    @torch.inference_mode()
    def nll(self, batch: list[Window]) -> torch.Tensor:
        """Each scored token's NLL, window after window, as score_batch computes them (for the start-up checks)."""
        inputs, rows, _ = self.batch_inputs(batch)
        targets = torch.cat([w.seq[w.a + 1 : w.b + 1] for w in batch]).to(self.device)
        return self._losses(inputs, rows.to(self.device), targets).nll.cpu()

    def _losses(self, inputs: dict, rows: torch.Tensor, targets: torch.Tensor) -> TokenLosses:
        """The scored positions' losses: the body and the tiled head, or the model's own full logits."""
        if self.head is not None:
            return token_losses(final_hidden(self.model, inputs, rows), targets, self.head, want_top1=self.want_top1,
                                want_moments=self.want_signals)
        logits = self.model(**inputs, use_cache=False).logits
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, rows.to(logits.device))
        return logits_losses(logits, targets.to(logits.device), self.want_top1, self.want_signals)

    def batch_inputs(self, batch: list[Window]) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """(model inputs, flat indices of the scored positions, each one's position in its window)."""
        width = max(w.length for w in batch)
        # Right padding needs no mask and no position ids: causal attention never lets a real token see a
        # later pad, and the default positions 0..width-1 are right for every real token. (Explicit ids
        # with zeros on the pads read as packed sequences to transformers, which then builds a slower mask.)
        left = self.pad_left and any(w.length < width for w in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        positions = torch.zeros(len(batch), width, dtype=torch.long) if left else None
        mask = torch.zeros(len(batch), width, dtype=torch.long) if left else None
        rows, in_window = [], []
        for r, w in enumerate(batch):
            off = width - w.length if left else 0
            ids[r, off : off + w.length] = w.inputs()
            if left:
                positions[r, off : off + w.length] = torch.arange(w.length)
                mask[r, off : off + w.length] = 1
            first = r * width + off + w.n_context
            rows.append(torch.arange(first, first + w.n_scored))
            in_window.append(torch.arange(w.n_context, w.length))
        inputs = dict(input_ids=ids.to(self.device), position_ids=None, attention_mask=None)
        if left:
            inputs.update(position_ids=positions.to(self.device), attention_mask=mask.to(self.device))
        return inputs, torch.cat(rows), torch.cat(in_window)


def _add_windows(batch: list[Window], nll: torch.Tensor, tally: Tally) -> BatchSums:
    """Each window's float64 NLL into its document's sums and the window list; NaN/inf stops the run by name."""
    sums = BatchSums()
    for w, part in zip(batch, nll.split([w.n_scored for w in batch])):
        total = float(part.double().sum())
        if not math.isfinite(total):
            raise FloatingPointError(
                f"non-finite loss in document {w.doc}, window over tokens {w.start}..{w.b} (targets "
                f"{w.target_offset}..{w.target_offset + w.n_scored - 1}): the model produced NaN/inf; "
                "check the checkpoint, or use --dtype float32 (float16 overflows easily)"
            )
        doc = tally.doc(w.doc)
        doc.nll += total
        doc.tokens += w.n_scored
        doc.sum_sq += float(part.double().square().sum())
        tally.windows.append(WindowSums(w.doc, w.target_offset, total, w.n_scored))
        sums += BatchSums(w.n_scored, total)
    return sums


def _add_divergences(batch: list[Window], compared: list, tally: Tally) -> None:
    """Each compared model's per-token values into its accumulator, with the document and window of each token."""
    doc = torch.cat([torch.full((w.n_scored,), w.doc) for w in batch])
    window = torch.cat([torch.full((w.n_scored,), w.target_offset) for w in batch])
    for divergence, pair in zip(tally.compares, compared):
        divergence.add(TokenPairs(nll=pair.nll, other_nll=pair.other_nll, kl=pair.kl, same_top1=pair.top1 == pair.other_top1,
                                  doc=doc, window=window))


def _token_columns(batch: list[Window], targets, nll, top1, in_window, compared) -> dict[str, torch.Tensor]:
    """One batch's rows of tokens.parquet (--save-tokens)."""
    columns = {
        "doc": torch.cat([torch.full((w.n_scored,), w.doc) for w in batch]),
        "position": torch.cat([torch.arange(w.target_offset, w.target_offset + w.n_scored) for w in batch]),
        "token_id": targets.cpu(),
        "nll": nll,
        "top1_id": top1.cpu(),
        "window_position": in_window,
        "seq_index": torch.cat([torch.arange(w.a + 1, w.b + 1) for w in batch]),
    }
    if batch[0].bytes is not None:  # each target's byte span in its scored text, and the document owning it
        spans = torch.cat([w.bytes[w.a + 1 : w.b + 1] for w in batch])
        columns.update(byte_start=spans[:, 0], byte_end=spans[:, 1], owner=spans[:, 2])
    for k, pair in enumerate(compared):
        columns[f"nll_{k + 1}"] = pair.other_nll.cpu()
        columns[f"kl_{k + 1}"] = pair.kl.cpu()
        columns[f"top1_id_{k + 1}"] = pair.other_top1.cpu()
    return columns


def body(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module whose last hidden state the output layer reads: the base model, or where a model's
    base_model_prefix names no submodule (transformers then gives the model itself), the child module that holds
    the input embedding; None if none does. The head probe checks that its output is the output layer's input."""
    if model.base_model is not model:
        return model.base_model
    embedding = model.get_input_embeddings()
    return next((child for child in model.children() if any(m is embedding for m in child.modules())), None)


def final_hidden(model: torch.nn.Module, inputs: dict, rows: torch.Tensor) -> torch.Tensor:
    """Final hidden states of the scored positions only (the head is applied to these alone)."""
    hidden = body(model)(**inputs, use_cache=False).last_hidden_state  # on the last layer's device
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows.to(hidden.device))


def out_of_memory(e: BaseException) -> bool:
    """Whether an exception is the device (or host) running out of memory."""
    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "not enough memory" in text
