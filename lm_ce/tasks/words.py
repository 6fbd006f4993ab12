"""A chunk of documents to their words' surprisals: each document's sequence (prefix token and text) cut into
windows as a perplexity run cuts it, windows batched by length and shared by the processes, the distributions
every word needs read in float64, then each word's surprisal, entropy and rank."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lm_ce.config.fields import Config
from lm_ce.scoring.parallel import Plan
from lm_ce.scoring.scorer import Scorer
from lm_ce.scoring.windows import Window, assign_batches, document_spans, plan_batches, windows_of
from lm_ce.sums.records import DocSums, DocumentResult, WindowSums
from lm_ce.sums.tasks import LN2, SurprisalRow
from lm_ce.tasks.forward import Body
from lm_ce.tasks.items import text_of
from lm_ce.tasks.steps import ChunkOut, in_lockstep
from lm_ce.tasks.surprisal import RowValues, Words, bow_mask, owners, row_values, sentence_of, word_nats, words_of

WORD_COLUMNS = ("document", "document_index", "word_index", "word", "surprisal", "entropy", "rank", "tokens", "sentence")
SENTENCE_COLUMNS = ("document", "document_index", "sentence", "first_word", "words", "surprisal_sum", "surprisal_mean",
                    "text")


@dataclass
class WordScorer:
    """Scores chunks of documents' words on the run's model and processes."""

    body: Body
    scorer: Scorer  # its batch inputs: padding on either side
    tokenizer: object
    cfg: Config
    prefix: int
    max_length: int
    stride: int
    budget: int

    def __post_init__(self):
        vocab = self.body.head.vocab_size if self.body.head is not None else len(self.tokenizer)
        self.bow = bow_mask(self.tokenizer, vocab) if self.cfg.bow_correction else torch.zeros(vocab, dtype=torch.bool)
        self.style = self.cfg.bow_style if self.cfg.bow_correction else None

    def document(self, index: int, row: dict, source: str) -> Words:
        cfg = self.cfg
        ident = text_of(row.get(cfg.id_field)) if cfg.id_field else None
        group = text_of(row.get(cfg.group_field)) if cfg.group_field else None
        value = row.get(cfg.words_field or cfg.text_field)
        if not isinstance(value, (str, list, tuple)):  # missing or null: counted as skipped, as perplexity runs count it
            return Words(index, ident, group, None, skipped="not_text")
        words, text, ends = words_of(cfg, value, f"{source}, row {index}")
        if words is None:
            return Words(index, ident, group, None, skipped="empty")
        ids, owner = owners(self.tokenizer, text, ends, f"{source}, row {index}")
        return Words(index, ident, group, words, text, ids, owner)

    def score_chunk(self, rows: list[tuple[int, dict, str]], plan: Plan) -> ChunkOut | None:
        """The chunk's rows scored (None: stopped inside it)."""
        docs = [self.document(*r) for r in rows]
        windows = []
        for d in docs:
            if d.words is not None:
                seq = [self.prefix, *d.ids]
                spans = document_spans(len(seq) + 1, 1, self.max_length, self.stride)  # + 1: the row after the last
                windows += windows_of(d.index, seq, spans)
        batches = plan_batches(windows, plan.cfg.batch_size, self.budget)
        world = plan.accelerator.num_processes
        mine = assign_batches(batches, world)[plan.accelerator.process_index] if batches else []
        plan.progress.add_total(sum(len(d.ids) for d in docs if d.words is not None))
        done = in_lockstep(plan, mine, self.score_batch)
        if done is None:
            return None
        out = self.finish(docs, windows, {key: v for part in done[0] for key, v in part.items()})
        out.tokens_per_process = done[1]
        return out

    @torch.inference_mode()
    def score_batch(self, batch: list[Window]) -> tuple[dict, int, float]:
        """{(document, row): RowValues} of a batch, its targets and their NLL (for the progress bar)."""
        inputs, flat, _ = self.scorer.batch_inputs(batch)
        states = self.body.rows(inputs, flat)
        keys, targets = [], []
        for w in batch:
            for r in range(w.a, w.b):
                keys.append((w.doc, r))
                targets.append(int(w.seq[r + 1]) if r + 1 < len(w.seq) else None)
        out = {}
        eos = self.tokenizer.eos_token_id
        for start, logp in self.body.log_probs(states):
            block = row_values(logp, targets[start : start + logp.shape[0]], self.bow, eos)
            out.update(zip(keys[start : start + len(block)], block))
        scored = [v.logp for v in out.values() if not math.isnan(v.logp)]
        return out, len(scored), -math.fsum(scored)

    def finish(self, docs: list[Words], windows: list[Window], values: dict) -> ChunkOut:
        """Rows, sums and the words and sentences tables of the chunk's documents, in order."""
        unit = 1 / LN2 if self.cfg.surprisal_unit == "bits" else 1.0
        out = ChunkOut([], {}, [], {"words": {c: [] for c in WORD_COLUMNS}, "sentences": {c: [] for c in SENTENCE_COLUMNS}})
        for w in windows:
            nll = -math.fsum(values[(w.doc, r)].logp for r in range(w.a, min(w.b, len(w.seq) - 1)))
            out.windows.append(WindowSums(w.doc, w.target_offset, nll, min(w.b, len(w.seq) - 1) - w.a))
        for d in docs:
            result = DocumentResult(index=d.index, id=d.id, group=d.group, skipped=d.skipped)
            out.results.append(result)
            if d.words is None:
                continue
            rows: list[RowValues] = [values[(d.index, r)] for r in range(len(d.ids) + 1)]
            nats = word_nats(rows, d.owner, [bool(self.bow[t]) for t in d.ids], self.style)
            sentences = sentence_of(d.words)
            self._tables(out.tables, d, rows, nats, sentences, unit)
            logps = [v.logp for v in rows[:-1]]
            total = math.fsum(nats) * unit
            result.tokens, result.nll_sum, result.bytes = len(d.ids), -math.fsum(logps), len(d.text.encode("utf-8"))
            result.words, result.windows = len(d.words), sum(1 for w in windows if w.doc == d.index)
            result.task = SurprisalRow(total, total / len(d.words), sentences[-1] + 1)
            out.sums[d.index] = DocSums(result.nll_sum, result.tokens, math.fsum(x * x for x in logps))
            out.surprisals[d.index] = nats
        return out

    def _tables(self, tables: dict, d: Words, rows: list[RowValues], nats: list[float], sentences: list[int],
                unit: float) -> None:
        """The document's rows of words.parquet and sentences.parquet."""
        name = d.id if d.id is not None else str(d.index)
        first, count = {}, [0] * len(d.words)
        for t, k in enumerate(d.owner):
            first.setdefault(k, t)
            count[k] += 1
        words, lines = tables["words"], tables["sentences"]
        for k, word in enumerate(d.words):
            at = rows[first[k]]
            for column, value in zip(WORD_COLUMNS, (name, d.index, k, word, nats[k] * unit, at.entropy * unit, at.rank,
                                                    count[k], sentences[k])):
                words[column].append(value)
        members: dict[int, list[int]] = {}
        for k, s in enumerate(sentences):
            members.setdefault(s, []).append(k)
        for s, ks in members.items():
            total = math.fsum(nats[k] for k in ks) * unit
            for column, value in zip(SENTENCE_COLUMNS, (name, d.index, s, ks[0], len(ks), total, total / len(ks),
                                                        " ".join(d.words[k] for k in ks))):
                lines[column].append(value)
