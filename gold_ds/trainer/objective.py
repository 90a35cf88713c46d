"""The loss of one micro-step, in two calls the loop times apart: ``teacher_targets(micro_batch)``
(teacher forward, no grad) and ``loss(micro_batch, targets)`` (student forward, summed loss).

Both objectives return the micro-step's loss as a SUM; the loop scales the sum by world / N, N the
student's completion tokens in the window on all ranks (see loop.py), so the optimizer follows the
mean loss per student completion token whatever the loss:

    loss = divergence_weight * sum(divergence rows) + ce_weight * sum(student NLL of completion tokens)

- ``jsd`` (shared tokenizer): one divergence row per completion token.
- ``uld`` / ``hybrid_uld`` (any two tokenizers): one divergence row per aligned group (a byte span
  both sides cover, and the end-of-turn pair; the micro batch's ``alignment``, see
  ``gold_ds.data.cross_tokenizer``). A group's row
  is the distribution at its first token, times the chain-rule probability of its other actual
  tokens, passed to the loss as a per-row log scale (``gold_ds.align.merge_log_scales``), on both
  sides, at each side's temperature. Tokens outside any group add no divergence (the alignment
  coverage metric says how many bytes are covered) but still count in N.
"""
import torch
import torch.nn.functional as F

from ..losses import generalized_jsd, hybrid_uld, uld
from ..align import merge_log_scales


def _forward(engine, inputs):
    """Logits [B, T, V'] of a micro batch's inputs (moved to the engine's device): ids and attention
    mask, plus a vision-language batch's pixel inputs (``pixel_values``, ``image_grid_thw``, ...)."""
    return engine(**{k: v.to(engine.device) for k, v in inputs.items() if k != "loss_mask"}).logits


def _check_vocab(logits, vocab, who):
    if logits.shape[-1] < vocab:
        raise ValueError(f"the {who} model has {logits.shape[-1]} logits per position but its tokenizer has {vocab} tokens")


class SharedVocabularyObjective:
    """Generalized JSD token by token (student and teacher share one vocabulary)."""

    def __init__(self, distill, student, teacher, vocab_size: int):
        self.student, self.teacher, self.vocab = student, teacher, vocab_size
        self.w_div, self.w_ce = distill.divergence_weight, distill.ce_weight
        self.beta, self.temperature = distill.beta, distill.temperature

    @torch.no_grad()
    def teacher_targets(self, mb):
        logits = _forward(self.teacher, mb.teacher)[:, :-1]
        _check_vocab(logits, self.vocab, "teacher")
        return logits[..., :self.vocab]

    def loss(self, mb, t_logits):
        mask = mb.student["loss_mask"].to(self.student.device)
        s_logits = _forward(self.student, mb.student)[:, :-1]
        _check_vocab(s_logits, self.vocab, "student")
        s_logits = s_logits[..., :self.vocab]
        loss = 0.0
        if self.w_div:
            loss = self.w_div * generalized_jsd(s_logits, t_logits.to(s_logits.device), beta=self.beta,
                                                temperature=self.temperature, mask=mask, reduction="sum")
        if self.w_ce:
            targets = mb.student["input_ids"][:, 1:].to(mask.device)[mask]
            loss = loss + self.w_ce * F.cross_entropy(s_logits[mask].float(), targets, reduction="sum")
        return loss


class CrossTokenizerObjective:
    """ULD or hybrid ULD over aligned, merged groups (the two tokenizers may differ)."""

    def __init__(self, distill, student, teacher, assembler, log):
        self.student, self.teacher = student, teacher
        self.vs, self.vt = len(assembler.student.tokenizer), len(assembler.teacher.tokenizer)
        self.w_div, self.w_ce = distill.divergence_weight, distill.ce_weight
        self.ts = distill.temperature
        self.tt = distill.teacher_temperature if distill.teacher_temperature is not None else distill.temperature
        options = dict(student_temperature=self.ts, teacher_temperature=self.tt, reduction="sum")
        if distill.loss == "hybrid_uld":
            s_ids, t_ids, match_rate = assembler.matched_vocabulary()
            log(f"[gold_ds] hybrid_uld vocabulary map: {s_ids.numel()} token pairs ({match_rate:.1%} of the "
                f"teacher's {self.vt} tokens match by bytes; the end-of-turn pair included)")
            self.matched_ids = (s_ids.to(student.device), t_ids.to(student.device))
            self.divergence = lambda s, t, **kw: hybrid_uld(
                s, t, *self.matched_ids, beta=distill.beta, matched_weight=distill.matched_weight,
                unmatched_weight=distill.unmatched_weight, **options, **kw)
        else:
            self.divergence = lambda s, t, **kw: uld(s, t, **options, **kw)

    @torch.no_grad()
    def teacher_targets(self, mb):
        """The teacher's first row of each group and its merged log scale."""
        a, dev = mb.alignment, self.student.device
        t_start, t_end = a.teacher_start.to(dev), a.teacher_end.to(dev)
        t_logits = _forward(self.teacher, mb.teacher)
        _check_vocab(t_logits, self.vt, "teacher")
        rows = a.teacher_rows.to(t_logits.device)
        t_rows = t_logits[rows[:, 0], rows[:, 1], :self.vt].to(dev)
        del t_logits
        t_scale = merge_log_scales(t_rows, a.teacher_tokens.to(dev), t_start, t_end, self.tt)
        return t_rows[t_start], t_scale

    def loss(self, mb, targets):
        a, dev = mb.alignment, self.student.device
        s_logits = _forward(self.student, mb.student)
        _check_vocab(s_logits, self.vs, "student")
        rows = a.student_rows.to(dev)
        s_rows = s_logits[rows[:, 0], rows[:, 1], :self.vs]
        tokens = a.student_tokens.to(dev)
        loss = 0.0
        if self.w_div:
            s_start, s_end = a.student_start.to(dev), a.student_end.to(dev)
            s_scale = merge_log_scales(s_rows, tokens, s_start, s_end, self.ts)
            t_first, t_scale = targets
            loss = self.w_div * self.divergence(s_rows[s_start], t_first, student_log_scale=s_scale,
                                                teacher_log_scale=t_scale)
        if self.w_ce:  # the completion rows that count (the loss mask in flat row order)
            counted = mb.student["loss_mask"].to(dev)[rows[:, 0], rows[:, 1]]
            loss = loss + self.w_ce * F.cross_entropy(s_rows[counted].float(), tokens[counted], reduction="sum")
        return loss


def build_objective(distill, student, teacher, assembler, log):
    """The objective of ``distill.loss`` (``student``, ``teacher``: the engines)."""
    if distill.cross_tokenizer:
        return CrossTokenizerObjective(distill, student, teacher, assembler, log)
    return SharedVocabularyObjective(distill, student, teacher, len(assembler.student.tokenizer))
