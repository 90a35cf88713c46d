"""Teacher inputs and alignment when the student and the teacher tokenize differently.

A micro-step's samples are the student's (prompt ids, completion ids, example). For each sample:
- the completion *text* is the student's completion ids decoded (special tokens skipped, no
  clean-up, an incomplete UTF-8 character at the end dropped): the dataset completion off-policy
  (as truncated for the student), the sampled text on-policy;
- the teacher's input is the example's prompt and that text rendered with the teacher's own chat
  template and tokenized by the teacher (the teacher side's ``encode``; for vision-language models
  its own processor, with pixel inputs from the same raw images): never the student's rendering
  re-tokenized;
- both completions get byte spans relative to the text (``gold_ds.align.byte_spans`` with the text
  and the rendered ids, so template bytes around the text and special tokens are zero-width), and
  ``gold_ds.align.group_spans`` pairs the token ranges that cover the same bytes.

End of turn: the student's EOS and the teacher's end-of-turn token stand for no bytes, so no byte
span aligns them. They are aligned to each other explicitly, as a one-token group of their own,
when the student's completion ends with its EOS (it finished its turn); the teacher's rendering then
ends with its own end-of-turn token (rendering cuts it there). A student completion that
was cut by the length limit has no EOS: the teacher's trailing end-of-turn token is then removed,
and nothing about the end of the turn is trained.

A sample whose text cannot be located in one side's rendering (a template that rewrites the
content, e.g. strips it; or sampled bytes that are not valid UTF-8 in the middle of the text) gets no
groups, and is counted in ``unaligned``; its tokens still count in the window's normalization.

Row layout: a side's *completion rows* are, in sample order, the logits rows that predict each
completion token (row ``len(prompt) - 1 + i`` of a sample predicts its completion token ``i``);
groups index into that flat list.

``hybrid_uld`` compares the tokens both vocabularies share by bytes (``gold_ds.align.vocabulary_map``)
plus the end-of-turn pair, which stands for no bytes: ``matched_vocabulary()``. ``byte_prefix_jsd``
compares the rows of the alignment's ``events`` (``gold_ds.align.prefix_events``) through the two
vocabularies' byte-prefix projections: ``prefix_projections()``.
"""
import dataclasses
from dataclasses import dataclass

import torch

from ..align import (UnsupportedTokenizerError, byte_spans, group_spans, prefix_events, prefix_projection,
                     tokenizer_family, vocabulary_map)
from .assembler import MicroBatch
from .dataset import Sample
from .render import TextSide


@dataclass
class Alignment:
    """Groups of a micro-step (index ranges into the flat completion rows, end exclusive: byte groups,
    then end-of-turn groups), and each side's completion rows."""
    student_rows: torch.Tensor
    """[N_s, 2] (sample, logits row) of each student completion token, in flat order."""
    student_tokens: torch.Tensor
    """[N_s] the student completion tokens (the token each row predicts)."""
    teacher_rows: torch.Tensor
    teacher_tokens: torch.Tensor
    student_start: torch.Tensor
    """[G] first flat row of each group."""
    student_end: torch.Tensor
    teacher_start: torch.Tensor
    teacher_end: torch.Tensor
    events: object = None
    """``gold_ds.align.PrefixEvents``: the rows ``byte_prefix_jsd`` compares (flat row indices)."""


def _completion_rows(sequences):
    rows = [(b, len(p) - 1 + i) for b, (p, c) in enumerate(sequences) for i in range(len(c))]
    tokens = [t for _, c in sequences for t in c]
    return torch.tensor(rows, dtype=torch.long).view(-1, 2), torch.tensor(tokens, dtype=torch.long)


class CrossTokenizerAssembler:
    """Builds a micro-step's teacher inputs and alignment groups (see the module docstring) from two
    sides (``TextSide`` or ``VLMSide``); the assembler interface is in ``gold_ds.data.assembler``."""

    def __init__(self, student, teacher, max_completion_length: int):
        for side in (student, teacher):
            tokenizer_family(side.tokenizer)  # an unsupported tokenizer fails here, at start-up, naming itself
        self.student, self.teacher = student, teacher
        self.max_completion_length = max_completion_length

    @staticmethod
    def text(side, completion_ids) -> str:
        """The text a completion's ids stand for (special tokens skipped, no clean-up, an incomplete
        UTF-8 character at the end dropped)."""
        text = side.tokenizer.decode(completion_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text.rstrip("\ufffd")

    @staticmethod
    def render(side, example, text: str, finished: bool) -> tuple:
        """(prompt ids, completion ids) of ``example``'s prompt and ``text`` as the assistant turn, in
        ``side``'s own template; without the trailing end-of-turn token unless ``finished``."""
        prompt_ids, completion_ids = side.encode(example, text)
        if not finished and completion_ids and completion_ids[-1] == side.eos:
            completion_ids = completion_ids[:-1]
        return prompt_ids, completion_ids

    def render_many(self, side, examples: list, texts: list, finished: list) -> list:
        """``render`` of many samples. A text side renders them with one batched template call and one
        batched tokenizer call (``TextSide.encode_rows``: the same ids as ``encode``, one sample at a
        time); a vision-language side one by one."""
        if not isinstance(side, TextSide):
            return [self.render(side, ex, text, done) for ex, text, done in zip(examples, texts, finished)]
        encoded = side.encode_rows([dataclasses.replace(ex, completion=text) for ex, text in zip(examples, texts)])
        return [(p, c[:-1] if not done and c and c[-1] == side.eos else c) for (p, c), done in zip(encoded, finished)]

    def matched_vocabulary(self) -> tuple:
        """(student ids, teacher ids, match rate): the tokens both vocabularies share by bytes, plus the
        end-of-turn pair (student EOS, teacher EOS) unless either already takes part."""
        vmap = vocabulary_map(self.student.tokenizer, self.teacher.tokenizer)
        s_ids, t_ids = vmap.student_ids, vmap.teacher_ids
        s_eos, t_eos = self.student.eos, self.teacher.eos
        if not (s_ids == s_eos).any() and not (t_ids == t_eos).any():
            s_ids, t_ids = torch.cat([s_ids, torch.tensor([s_eos])]), torch.cat([t_ids, torch.tensor([t_eos])])
        return s_ids, t_ids, vmap.match_rate

    def prefix_projections(self) -> tuple:
        """(student -> teacher, teacher -> student) ``gold_ds.align.PrefixProjection`` (for
        ``byte_prefix_jsd``; the end-of-turn tokens map to each other)."""
        s, t = self.student, self.teacher
        return (prefix_projection(s.tokenizer, t.tokenizer, s.eos, t.eos),
                prefix_projection(t.tokenizer, s.tokenizer, t.eos, s.eos))

    # ---------------------------------------------------------------------------------- interface
    def teacher_prompt_ids(self, row: Sample) -> list:
        return self.teacher.encode_prompt(row.example)

    def from_teacher_completion(self, row: Sample, completion_ids: list) -> Sample:
        """A teacher-sampled completion (seq_kd) as a student training sample."""
        finished = bool(completion_ids) and completion_ids[-1] == self.teacher.eos
        prompt_ids, ids = self.render(self.student, row.example, self.text(self.teacher, completion_ids), finished)
        return Sample(prompt_ids, ids[:self.max_completion_length], row.example)

    def teacher_sample(self, row: Sample) -> Sample:
        """A dataset row in the teacher's own template."""
        p, c = self.render(self.teacher, row.example, row.example.completion, True)
        return Sample(p, c[:self.max_completion_length], row.example)

    def assemble(self, samples: list, counted: int = None) -> MicroBatch:
        """Teacher inputs and groups for one micro-step's samples (the student's); groups of samples
        from ``counted`` on are dropped and their tokens leave the loss mask."""
        s_seqs, t_samples, s_spans, t_spans, eot, unaligned = [], [], [], [], [], 0
        done = [bool(smp.completion_ids) and smp.completion_ids[-1] == self.student.eos for smp in samples]
        texts = [self.text(self.student, smp.completion_ids) for smp in samples]
        rendered = self.render_many(self.teacher, [smp.example for smp in samples], texts, done)
        for b, (smp, text, finished, (t_prompt, t_completion)) in enumerate(zip(samples, texts, done, rendered)):
            s_seqs.append((smp.prompt_ids, smp.completion_ids))
            t_samples.append(Sample(t_prompt, t_completion, smp.example))
            try:
                s_sp = byte_spans(self.student.tokenizer, text=text, ids=smp.completion_ids)
                t_sp = byte_spans(self.teacher.tokenizer, text=text, ids=t_completion)
            except UnsupportedTokenizerError:
                raise
            except ValueError:  # the text is not in a rendering: this sample gets no groups
                unaligned += 1
                s_sp = torch.zeros((len(smp.completion_ids), 2), dtype=torch.long)
                t_sp = torch.zeros((len(t_completion), 2), dtype=torch.long)
            s_spans.append(s_sp)
            t_spans.append(t_sp)
            if finished and t_completion and t_completion[-1] == self.teacher.eos:
                eot.append((b, len(smp.completion_ids) - 1, len(t_completion) - 1))
        groups = group_spans(s_spans, t_spans)
        s_off = torch.tensor([0] + [len(c) for _, c in s_seqs], dtype=torch.long).cumsum(0)
        t_off = torch.tensor([0] + [len(s.completion_ids) for s in t_samples], dtype=torch.long).cumsum(0)
        eot = torch.tensor(eot, dtype=torch.long).view(-1, 3)
        sample = torch.cat([groups.sequence, eot[:, 0]])
        s_first = torch.cat([s_off[groups.sequence] + groups.student_start, s_off[eot[:, 0]] + eot[:, 1]])
        s_end = torch.cat([s_off[groups.sequence] + groups.student_end, s_off[eot[:, 0]] + eot[:, 1] + 1])
        t_first = torch.cat([t_off[groups.sequence] + groups.teacher_start, t_off[eot[:, 0]] + eot[:, 2]])
        t_end = torch.cat([t_off[groups.sequence] + groups.teacher_end, t_off[eot[:, 0]] + eot[:, 2] + 1])
        student = self.student.batch(samples)
        byte_groups = len(groups)
        if counted is not None:
            keep = sample < counted
            byte_groups = int(keep[:byte_groups].sum())
            s_first, s_end, t_first, t_end = s_first[keep], s_end[keep], t_first[keep], t_end[keep]
            student["loss_mask"][counted:] = False
        s_rows, s_tokens = _completion_rows(s_seqs)
        t_rows, t_tokens = _completion_rows([(s.prompt_ids, s.completion_ids) for s in t_samples])
        events = prefix_events(self.student.tokenizer, self.teacher.tokenizer, s_tokens, t_tokens,
                               torch.cat(s_spans).view(-1, 2), torch.cat(t_spans).view(-1, 2), s_first, s_end,
                               t_first, t_end, byte_groups)
        alignment = Alignment(student_rows=s_rows, student_tokens=s_tokens, teacher_rows=t_rows,
                              teacher_tokens=t_tokens, student_start=s_first, student_end=s_end,
                              teacher_start=t_first, teacher_end=t_end, events=events)
        counters = {"align/covered_bytes": int(groups.covered_bytes.sum()),
                    "align/total_bytes": int(groups.total_bytes.sum()),
                    "align/groups": len(s_first), "align/unaligned_samples": unaligned}
        return MicroBatch(student=student, teacher=self.teacher.batch(t_samples), alignment=alignment,
                          counters=counters)
