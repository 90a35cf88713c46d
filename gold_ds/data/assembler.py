"""The micro-step assembler: everything the loop needs from the data, chosen once at start-up.

``build_assembler(cfg)`` loads both models' tokenizers (or processors), runs the start-up checks
that need them (each a ``ConfigError`` naming the key), and returns one of two assemblers over two
*sides* (``gold_ds.data.render``): text (``TextSide``) or vision-language (``VLMSide``) models, x

- ``SharedAssembler`` (``distill.loss`` ``jsd``): one vocabulary; the teacher reads the student's
  tensors (its own side only generates: seq_kd, evaluation);
- ``CrossTokenizerAssembler`` (``uld``, ``hybrid_uld``; ``gold_ds.data.cross_tokenizer``): the
  teacher reads its own rendering of each sample, aligned to the student's by bytes.

Interface (both), called on every rank:
- ``student``, ``teacher``: the two sides (tokenizers, processors, what an export saves);
- ``teacher_prompt_ids(row)``: a dataset row's prompt in the teacher's template (seq_kd, evaluation);
- ``from_teacher_completion(row, ids)``: a teacher-sampled completion as the student's sample (seq_kd);
- ``teacher_sample(row)``: a dataset row as the teacher's supervised sequence (teacher SFT);
- ``assemble(samples, counted=None) -> MicroBatch``: one micro-step's tensors (only the first
  ``counted`` samples count in the loss: evaluation pads its last micro-step with repeated rows).
"""
from dataclasses import dataclass, field
from typing import Optional

from ..config import ConfigError
from .dataset import Sample


@dataclass
class MicroBatch:
    """The tensors of one micro-step."""
    student: dict
    """The student's inputs (``input_ids``, ``attention_mask``, pixel inputs) and ``loss_mask``:
    ``loss_mask[b, t]`` is 1 where logits row ``t`` predicts a completion token that counts."""
    teacher: dict
    """The teacher's inputs: the same dict as ``student`` when they share a tokenizer."""
    alignment: Optional[object] = None
    """Across tokenizers: the ``gold_ds.data.cross_tokenizer.Alignment`` of the two renderings."""
    counters: dict = field(default_factory=dict)
    """Counts to sum over the window and ranks (``align/...``)."""


class SharedAssembler:
    """Student and teacher share one tokenizer (and, for vision-language models, one processor)."""

    def __init__(self, student, teacher):
        self.student, self.teacher = student, teacher

    def teacher_prompt_ids(self, row: Sample) -> list:
        return row.prompt_ids

    def from_teacher_completion(self, row: Sample, completion_ids: list) -> Sample:
        return Sample(row.prompt_ids, completion_ids, row.example)

    def teacher_sample(self, row: Sample) -> Sample:
        return row

    def assemble(self, samples: list, counted: int = None) -> MicroBatch:
        batch = self.student.batch(samples)
        if counted is not None:
            batch["loss_mask"][counted:] = False
        return MicroBatch(student=batch, teacher=batch)


def _check_shared_vocabulary(student, teacher) -> None:
    if student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
        raise ConfigError("config key 'distill.loss': got 'jsd'; jsd compares the two models' distributions token "
                          "by token, so the student and teacher must share a tokenizer (student.model.tokenizer and "
                          "teacher.model.tokenizer have different vocabularies): use 'hybrid_uld', 'byte_prefix_jsd' or 'uld' across "
                          "tokenizers")


def build_assembler(cfg):
    """The run's assembler (``cfg``: the ``RunConfig``); needs no process group. Raises
    ``ConfigError`` for a pair that cannot be distilled with the configured loss."""
    from .tokenizer import load_tokenizer, tokenizer_key
    s_cfg, t_cfg = cfg.student.model, cfg.teacher.model
    if s_cfg.processor:
        from .vlm import vlm_sides
        student, teacher = vlm_sides(cfg)
    else:
        from .render import TextSide
        student = TextSide(load_tokenizer(s_cfg, "student.model"), tokenizer_key(s_cfg, "student.model"))
        teacher = TextSide(load_tokenizer(t_cfg, "teacher.model"), tokenizer_key(t_cfg, "teacher.model"))
    if not cfg.distill.cross_tokenizer:
        _check_shared_vocabulary(student, teacher)
        return SharedAssembler(student, teacher)
    from ..align import UnsupportedTokenizerError
    from .cross_tokenizer import CrossTokenizerAssembler
    try:
        return CrossTokenizerAssembler(student, teacher, cfg.data.max_completion_length)
    except UnsupportedTokenizerError as e:
        raise ConfigError(f"config key 'distill.loss': got {cfg.distill.loss!r}, which aligns the two tokenizers by "
                          f"bytes; {e}") from None
