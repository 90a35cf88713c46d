"""The loss of one micro-step: teacher forward (no grad), student forward, summed loss.

Both objectives return the micro-step's loss as a SUM, and per-micro-step counters; the loop scales
the sum by world / N, N the student's completion tokens in the window on all ranks (see loop.py), so
the optimizer follows the mean loss per student completion token whatever the loss:

    loss = divergence_weight * sum(divergence rows) + ce_weight * sum(student NLL of completion tokens)

- ``jsd`` (shared tokenizer): one divergence row per completion token.
- ``uld`` / ``hybrid_uld`` (any two tokenizers): one divergence row per aligned group (a byte span
  both sides cover, and the end-of-turn pair; see ``gold_ds.data.cross_tokenizer``). A group's row
  is the distribution at its first token, times the chain-rule probability of its other actual
  tokens, passed to the loss as a per-row log scale (``gold_ds.align.merge_log_scales``), on both
  sides, at each side's temperature. Tokens outside any group add no divergence (the alignment
  coverage metric says how many bytes are covered) but still count in N.
"""
import torch
import torch.nn.functional as F

from ..align import merge_log_scales, vocabulary_map
from ..data.batch import training_batch
from ..data.cross_tokenizer import CrossTokenizerAssembler
from ..losses import generalized_jsd, hybrid_uld, uld


def _forward(engine, batch):
    """Logits [B, T, V'] of ``batch`` (tensors moved to the engine's device): ids and attention mask,
    plus a vision-language batch's pixel inputs (``pixel_values``, ``image_grid_thw``, ...)."""
    return engine(**{k: v.to(engine.device) for k, v in batch.items() if k != "loss_mask"}).logits


def _check_vocab(logits, vocab, who):
    if logits.shape[-1] < vocab:
        raise ValueError(f"the {who} model has {logits.shape[-1]} logits per position but its tokenizer has {vocab} tokens")


class SharedVocabularyObjective:
    """Generalized JSD token by token (student and teacher share one tokenizer)."""

    def __init__(self, distill, student, teacher, tokenizer, now, batch_of=None):
        """``batch_of(samples)``: the micro-step's tensors (default ``training_batch`` of the ids; a
        vision-language pair passes ``VLMSide.batch``, which adds the pixel inputs both models share)."""
        self.student, self.teacher, self.now = student, teacher, now
        self.pad_id, self.vocab = tokenizer.pad_token_id, len(tokenizer)
        self.batch_of = batch_of or (lambda samples: training_batch(
            [(s.prompt_ids, s.completion_ids) for s in samples], self.pad_id))
        self.w_div, self.w_ce = distill.divergence_weight, distill.ce_weight
        self.beta, self.temperature = distill.beta, distill.temperature

    def __call__(self, samples, timer, keep=None) -> tuple:
        batch = self.batch_of(samples)
        mask = batch["loss_mask"]
        if keep is not None:
            mask &= torch.tensor(keep)[:, None]
        mask = mask.to(self.student.device)
        t0 = self.now()
        with torch.no_grad():
            t_logits = _forward(self.teacher, batch)[:, :-1]
            _check_vocab(t_logits, self.vocab, "teacher")
        t1 = self.now()
        s_logits = _forward(self.student, batch)[:, :-1]
        _check_vocab(s_logits, self.vocab, "student")
        s_logits, t_logits = s_logits[..., :self.vocab], t_logits[..., :self.vocab]
        loss = 0.0
        if self.w_div:
            loss = self.w_div * generalized_jsd(s_logits, t_logits, beta=self.beta, temperature=self.temperature,
                                                mask=mask, reduction="sum")
        if self.w_ce:
            targets = batch["input_ids"][:, 1:].to(mask.device)[mask]
            loss = loss + self.w_ce * F.cross_entropy(s_logits[mask].float(), targets, reduction="sum")
        timer["teacher"] += t1 - t0
        timer["student"] += self.now() - t1
        return loss, {}


class CrossTokenizerObjective:
    """ULD or hybrid ULD over aligned, merged groups (the two tokenizers may differ)."""

    def __init__(self, distill, student, teacher, student_tokenizer, teacher_tokenizer, now, log, assembler=None):
        """``assembler``: default a text ``CrossTokenizerAssembler``; vision-language pairs pass a
        ``VLMCrossTokenizerAssembler`` (each side's batch carries its own pixel inputs)."""
        self.student, self.teacher, self.now = student, teacher, now
        self.assembler = assembler or CrossTokenizerAssembler(student_tokenizer, teacher_tokenizer)
        self.vs, self.vt = len(student_tokenizer), len(teacher_tokenizer)
        self.w_div, self.w_ce = distill.divergence_weight, distill.ce_weight
        self.ts = distill.temperature
        self.tt = distill.teacher_temperature if distill.teacher_temperature is not None else distill.temperature
        options = dict(student_temperature=self.ts, teacher_temperature=self.tt, reduction="sum")
        if distill.loss == "hybrid_uld":
            vmap = vocabulary_map(student_tokenizer, teacher_tokenizer)
            s_ids, t_ids = vmap.student_ids, vmap.teacher_ids
            s_eos, t_eos = student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id
            if not (s_ids == s_eos).any() and not (t_ids == t_eos).any():  # end of turn means the same
                s_ids = torch.cat([s_ids, torch.tensor([s_eos])])
                t_ids = torch.cat([t_ids, torch.tensor([t_eos])])
            log(f"[gold_ds] hybrid_uld vocabulary map: {vmap.student_ids.numel()} tokens match by bytes "
                f"({vmap.match_rate:.1%} of the teacher's {self.vt}), plus the end-of-turn pair")
            self.matched_ids = (s_ids.to(student.device), t_ids.to(student.device))
            self.divergence = lambda s, t, **kw: hybrid_uld(
                s, t, *self.matched_ids, beta=distill.beta, matched_weight=distill.matched_weight,
                unmatched_weight=distill.unmatched_weight, **options, **kw)
        else:
            self.divergence = lambda s, t, **kw: uld(s, t, **options, **kw)

    def __call__(self, samples, timer, keep=None) -> tuple:
        cb = self.assembler.assemble(samples)
        dev = self.student.device
        groups, rows_kept = slice(None), slice(None)
        if keep is not None:  # count only the kept samples' groups and tokens
            keep = torch.tensor(keep)
            groups = keep[cb.student_rows[cb.student_start, 0]].to(dev)
            rows_kept = keep[cb.student_rows[:, 0]].to(dev)
        s_start, s_end = cb.student_start.to(dev)[groups], cb.student_end.to(dev)[groups]
        t_start, t_end = cb.teacher_start.to(dev)[groups], cb.teacher_end.to(dev)[groups]
        t0 = self.now()
        with torch.no_grad():
            t_logits = _forward(self.teacher, cb.teacher)
            _check_vocab(t_logits, self.vt, "teacher")
            rows = cb.teacher_rows.to(t_logits.device)
            t_rows = t_logits[rows[:, 0], rows[:, 1], :self.vt].to(dev)
            del t_logits
            t_scale = merge_log_scales(t_rows, cb.teacher_tokens.to(dev), t_start, t_end, self.tt)
            t_first = t_rows[t_start]
        t1 = self.now()
        s_logits = _forward(self.student, cb.student)
        _check_vocab(s_logits, self.vs, "student")
        rows = cb.student_rows.to(dev)
        s_rows = s_logits[rows[:, 0], rows[:, 1], :self.vs]
        tokens = cb.student_tokens.to(dev)
        loss = 0.0
        if self.w_div:
            s_scale = merge_log_scales(s_rows, tokens, s_start, s_end, self.ts)
            loss = self.w_div * self.divergence(s_rows[s_start], t_first, student_log_scale=s_scale,
                                                teacher_log_scale=t_scale)
        if self.w_ce:
            loss = loss + self.w_ce * F.cross_entropy(s_rows[rows_kept].float(), tokens[rows_kept], reduction="sum")
        timer["teacher"] += t1 - t0
        timer["student"] += self.now() - t1
        return loss, {"align/covered_bytes": cb.covered_bytes, "align/total_bytes": cb.total_bytes,
                      "align/groups": len(cb.student_start), "align/unaligned_samples": cb.unaligned}
