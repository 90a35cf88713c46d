"""Evaluation on the held-out split: distillation loss per completion token, greedy exact-match
accuracy (rows with an ``answer``) of student and teacher, and a table of sampled completions.

Teacher-forced, on the reference completion in the student's own tokens (whatever the tokenizer):
``answer_nll``, the student's negative log-likelihood of the whole completion (end of turn
included), nats per row; ``char_accuracy``, the share of the completion's bytes that the student's
argmax token gets right at each position (the argmax token's bytes against the reference token's,
position by position: per digit with a digit-by-digit tokenizer, per character with a letter one).

Every rank calls ``run()``; rows are split evenly over ranks (the last ranks repeat a row, not
counted, so that every rank runs the same number of collective forward passes).
"""
import math

import torch
import torch.distributed as dist

from ..align import token_bytes
from ..data.tasks import exact_match


class Evaluator:
    """``assembler`` and ``objective``: the training ones (micro batches and their summed loss);
    ``student_generator``, ``teacher_generator``: transformers generation on the two engines."""

    def __init__(self, data, eval_cfg, assembler, objective, student, student_generator, teacher_generator,
                 forward_batch: int, generate_batch: int):
        self.data = data.head(eval_cfg.num_examples) if eval_cfg.num_examples else data
        self.cfg, self.assembler, self.objective, self.student = eval_cfg, assembler, objective, student
        self.tokenizer, self.teacher_tokenizer = assembler.student.tokenizer, assembler.teacher.tokenizer
        self.student_generator, self.teacher_generator = student_generator, teacher_generator
        self.forward_batch, self.generate_batch = forward_batch, generate_batch  # as in training: micro, window
        self.has_answers = self.data.has_answers()
        self._teacher = None  # (correct count, table completions): the teacher is frozen
        self._bytes = {}  # token id -> its bytes

    def _piece(self, token: int) -> bytes:
        if token not in self._bytes:
            self._bytes[token] = token_bytes(self.tokenizer, [token])
        return self._bytes[token]

    def _teacher_forced(self, batch, rows: int) -> tuple:
        """(summed NLL of the first ``rows`` rows' completions, their right bytes, their bytes)."""
        inputs = {k: v.to(self.student.device) for k, v in batch.items() if k != "loss_mask"}
        logits = self.student(**inputs, use_cache=False).logits[:rows, :-1, :len(self.tokenizer)].float()
        mask = batch["loss_mask"][:rows].to(logits.device)
        tokens = inputs["input_ids"][:rows, 1:]
        nll = -torch.log_softmax(logits[mask], -1).gather(1, tokens[mask][:, None]).sum().item()
        right = total = 0
        for ref, guess in zip(tokens[mask].tolist(), logits[mask].argmax(-1).tolist()):
            want, got = self._piece(ref), self._piece(guess)
            right += sum(a == b for a, b in zip(want, got))
            total += len(want)
        return nll, right, total

    def _my_rows(self):
        rank, world = dist.get_rank(), dist.get_world_size()
        per = math.ceil(len(self.data) / world)
        idx = list(range(rank * per, min((rank + 1) * per, len(self.data))))
        counted = len(idx)
        idx += [0] * (per - counted)
        return self.data.samples(idx), counted

    def _greedy(self, gen, prompts, tokenizer):
        out = []
        for i in range(0, len(prompts), self.generate_batch):
            out += gen.generate(prompts[i:i + self.generate_batch], 1, greedy=True, max_new_tokens=self.cfg.max_new_tokens)
        return [tokenizer.decode(c, skip_special_tokens=True) for c in out]

    def _correct(self, rows, texts, counted):
        return sum(exact_match(t, r.example.answer) for r, t in zip(rows[:counted], texts[:counted]))

    @torch.no_grad()
    def run(self):
        self.student.eval()
        try:
            return self._run()
        finally:
            self.student.train()

    def _run(self):
        rows, counted = self._my_rows()
        loss_sum = tokens = 0.0
        forced = [0.0, 0, 0]  # answer NLL, right bytes, bytes
        for i in range(0, len(rows), self.forward_batch):
            chunk = rows[i:i + self.forward_batch]
            n = max(0, min(len(chunk), counted - i))  # padding rows run but do not count
            micro_batch = self.assembler.assemble(chunk, counted=n)
            loss_sum += self.objective.loss(micro_batch, self.objective.teacher_targets([micro_batch])[0])[1]
            tokens += sum(len(r.completion_ids) for r in chunk[:n])
            forced = [a + b for a, b in zip(forced, self._teacher_forced(micro_batch.student, n))]
        stats = [loss_sum, tokens, *forced]
        greedy_rows = rows if self.has_answers else rows[:self.cfg.num_samples]
        student_texts = self._greedy(self.student_generator, [r.prompt_ids for r in greedy_rows], self.tokenizer)
        if self._teacher is None:
            teacher_texts = self._greedy(self.teacher_generator,
                                         [self.assembler.teacher_prompt_ids(r) for r in greedy_rows],
                                         self.teacher_tokenizer)
            correct = self._correct(rows, teacher_texts, counted) if self.has_answers else 0
            self._teacher = (correct, teacher_texts[:self.cfg.num_samples])
        if self.has_answers:
            stats += [self._correct(rows, student_texts, counted), self._teacher[0]]
        t = torch.tensor(stats, dtype=torch.float64, device=self.student.device)
        dist.all_reduce(t)
        metrics = {"loss": t[0].item() / t[1].item(), "answer_nll": t[2].item() / len(self.data),
                   "char_accuracy": t[3].item() / max(t[4].item(), 1)}
        if self.has_answers:
            metrics["accuracy"] = t[5].item() / len(self.data)
            metrics["teacher_accuracy"] = t[6].item() / len(self.data)
        n = min(self.cfg.num_samples, counted)
        mine = [[self.tokenizer.decode(r.prompt_ids, skip_special_tokens=False), r.example.answer, s, te]
                for r, s, te in zip(rows[:n], student_texts[:n], self._teacher[1][:n])]
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        table = [row for rank_rows in everyone for row in rank_rows][:self.cfg.num_samples]
        return metrics, table
