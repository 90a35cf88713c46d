"""Teacher inputs and alignment when the student and the teacher tokenize differently.

A micro-step's samples are the student's (prompt ids, completion ids, example). For each sample:
- the completion *text* is the student's completion ids decoded (special tokens skipped, no
  clean-up, an incomplete UTF-8 character at the end dropped): the dataset completion off-policy
  (as truncated for the student), the sampled text on-policy;
- the teacher's input is the example's prompt and that text rendered with the teacher's own chat
  template and tokenized by the teacher (``encode_example`` with the teacher's tokenizer): never the
  student's rendering re-tokenized;
- both completions get byte spans relative to the text (``gold_ds.align.byte_spans`` with the text
  and the rendered ids, so template bytes around the text and special tokens are zero-width), and
  ``gold_ds.align.group_spans`` pairs the token ranges that cover the same bytes.

End of turn: the student's EOS and the teacher's end-of-turn token stand for no bytes, so no byte
span aligns them. They are aligned to each other explicitly, as a one-token group of their own,
when the student's completion ends with its EOS (it finished its turn); the teacher's rendering then
ends with its own end-of-turn token (``encode_example`` cuts it there). A student completion that
was cut by the length limit has no EOS: the teacher's trailing end-of-turn token is then removed,
and nothing about the end of the turn is trained.

A sample whose text cannot be located in one side's rendering (a template that rewrites the
content, e.g. strips it; or sampled bytes that are not valid UTF-8 in the middle of the text) gets no
groups, and is counted in ``unaligned``; its tokens still count in the window's normalization.

Row layout: a side's *completion rows* are, in sample order, the logits rows that predict each
completion token (row ``len(prompt) - 1 + i`` of a sample predicts its completion token ``i``);
groups index into that flat list.
"""
from dataclasses import dataclass

import torch

from ..align import UnsupportedTokenizerError, byte_spans, group_spans, tokenizer_family
from .batch import training_batch
from .dataset import EncodedExample, Example, encode_example, encode_prompt


@dataclass
class CrossTokenizerBatch:
    student: dict
    """``training_batch`` tensors of the student's sequences."""
    teacher: dict
    """``training_batch`` tensors of the teacher's renderings of the same samples."""
    student_rows: torch.Tensor
    """[N_s, 2] (sample, logits row) of each student completion token, in flat order."""
    student_tokens: torch.Tensor
    """[N_s] the student completion tokens (the token each row predicts)."""
    teacher_rows: torch.Tensor
    teacher_tokens: torch.Tensor
    student_start: torch.Tensor
    """[G] group ranges into the flat completion rows (end exclusive), byte groups then end-of-turn."""
    student_end: torch.Tensor
    teacher_start: torch.Tensor
    teacher_end: torch.Tensor
    covered_bytes: int
    total_bytes: int
    unaligned: int
    """Samples whose text could not be located in a rendering (no groups)."""


def _completion_rows(sequences):
    rows = [(b, len(p) - 1 + i) for b, (p, c) in enumerate(sequences) for i in range(len(c))]
    tokens = [t for _, c in sequences for t in c]
    return torch.tensor(rows, dtype=torch.long).view(-1, 2), torch.tensor(tokens, dtype=torch.long)


class CrossTokenizerAssembler:
    """Builds a micro-step's teacher inputs and alignment groups (see the module docstring)."""

    def __init__(self, student_tokenizer, teacher_tokenizer):
        for tok in (student_tokenizer, teacher_tokenizer):
            tokenizer_family(tok)  # an unsupported tokenizer fails here, at start-up, naming itself
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.student_eos = student_tokenizer.eos_token_id
        self.teacher_eos = teacher_tokenizer.eos_token_id

    def text(self, tokenizer, completion_ids) -> str:
        """The text a completion's ids stand for (special tokens skipped, no clean-up, an incomplete
        UTF-8 character at the end dropped)."""
        text = tokenizer.decode(completion_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text.rstrip("\ufffd")

    def teacher_prompt_ids(self, example: Example) -> list:
        return encode_prompt(self.teacher_tokenizer, example.prompt)

    def render(self, tokenizer, example: Example, text: str, finished: bool) -> tuple:
        """(prompt ids, completion ids) of ``example``'s prompt and ``text`` as the assistant turn,
        in ``tokenizer``'s own template; without the trailing end-of-turn token unless ``finished``."""
        prompt_ids, completion_ids = encode_example(tokenizer, Example(example.prompt, text, example.answer))
        if not finished and completion_ids and completion_ids[-1] == tokenizer.eos_token_id:
            completion_ids = completion_ids[:-1]
        return prompt_ids, completion_ids

    def student_sample(self, example: Example, teacher_completion_ids: list, max_completion_length: int) -> EncodedExample:
        """A teacher-sampled completion (seq_kd) as a student training sample."""
        finished = bool(teacher_completion_ids) and teacher_completion_ids[-1] == self.teacher_eos
        text = self.text(self.teacher_tokenizer, teacher_completion_ids)
        prompt_ids, completion_ids = self.render(self.student_tokenizer, example, text, finished)
        return EncodedExample(prompt_ids, completion_ids[:max_completion_length], example)

    def assemble(self, samples: list) -> CrossTokenizerBatch:
        """Teacher inputs and groups for one micro-step's samples (``EncodedExample``s of the student)."""
        s_seqs, t_seqs, s_spans, t_spans, eot, unaligned = [], [], [], [], [], 0
        for b, smp in enumerate(samples):
            finished = bool(smp.completion_ids) and smp.completion_ids[-1] == self.student_eos
            text = self.text(self.student_tokenizer, smp.completion_ids)
            t_prompt, t_completion = self.render(self.teacher_tokenizer, smp.example, text, finished)
            s_seqs.append((smp.prompt_ids, smp.completion_ids))
            t_seqs.append((t_prompt, t_completion))
            try:
                s_sp = byte_spans(self.student_tokenizer, text=text, ids=smp.completion_ids)
                t_sp = byte_spans(self.teacher_tokenizer, text=text, ids=t_completion)
            except UnsupportedTokenizerError:
                raise
            except ValueError:  # the text is not in a rendering: this sample gets no groups
                unaligned += 1
                s_sp = torch.zeros((len(smp.completion_ids), 2), dtype=torch.long)
                t_sp = torch.zeros((len(t_completion), 2), dtype=torch.long)
            s_spans.append(s_sp)
            t_spans.append(t_sp)
            if finished and t_completion and t_completion[-1] == self.teacher_eos:
                eot.append((b, len(smp.completion_ids) - 1, len(t_completion) - 1))
        groups = group_spans(s_spans, t_spans)
        s_off = torch.tensor([0] + [len(c) for _, c in s_seqs], dtype=torch.long).cumsum(0)
        t_off = torch.tensor([0] + [len(c) for _, c in t_seqs], dtype=torch.long).cumsum(0)
        eot = torch.tensor(eot, dtype=torch.long).view(-1, 3)
        s_first = torch.cat([s_off[groups.sequence] + groups.student_start, s_off[eot[:, 0]] + eot[:, 1]])
        s_end = torch.cat([s_off[groups.sequence] + groups.student_end, s_off[eot[:, 0]] + eot[:, 1] + 1])
        t_first = torch.cat([t_off[groups.sequence] + groups.teacher_start, t_off[eot[:, 0]] + eot[:, 2]])
        t_end = torch.cat([t_off[groups.sequence] + groups.teacher_end, t_off[eot[:, 0]] + eot[:, 2] + 1])
        s_rows, s_tokens = _completion_rows(s_seqs)
        t_rows, t_tokens = _completion_rows(t_seqs)
        return CrossTokenizerBatch(
            student=training_batch(s_seqs, self.student_tokenizer.pad_token_id),
            teacher=training_batch(t_seqs, self.teacher_tokenizer.pad_token_id),
            student_rows=s_rows, student_tokens=s_tokens, teacher_rows=t_rows, teacher_tokens=t_tokens,
            student_start=s_first, student_end=s_end, teacher_start=t_first, teacher_end=t_end,
            covered_bytes=int(groups.covered_bytes.sum()), total_bytes=int(groups.total_bytes.sum()),
            unaligned=unaligned)
