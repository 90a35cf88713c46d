"""Vocabulary map: pairs of student and teacher tokens that stand for the same bytes.

``Ġthe`` (byte-level BPE) and ``▁the`` (SentencePiece) both stand for b" the"; the byte-fallback
piece ``<0x41>`` and the regular piece ``A`` both stand for b"A". When several ids of one tokenizer
stand for the same bytes, one is kept: a regular piece before a byte-fallback piece, then the lowest
id. Special tokens, the unknown token and zero-width tokens are never matched by bytes (the trainer
pairs end-of-turn tokens itself). Pieces are taken as spelled in the vocabulary (no dummy prefix is
dropped). Only the byte-level and metaspace families have byte pieces; an ``offsets`` tokenizer
(WordPiece, ...) raises UnsupportedTokenizerError.

The map feeds ``gold_ds.losses.hybrid_uld(student_logits, teacher_logits, student_ids, teacher_ids)``:
1-D int64, no repeated id on either side, ids < len(tokenizer). Pairs are sorted by teacher id.
"""

import weakref
from dataclasses import dataclass

import torch

from .spans import UnsupportedTokenizerError, _table

__all__ = ["VocabularyMap", "vocabulary_map"]


@dataclass(frozen=True)
class VocabularyMap:
    student_ids: torch.Tensor   # [K] int64
    teacher_ids: torch.Tensor   # [K] int64
    student_vocab_size: int     # len(student tokenizer)
    teacher_vocab_size: int     # len(teacher tokenizer)

    @property
    def num_matched(self) -> int:
        """K, the number of pairs."""
        return int(self.student_ids.numel())

    K = num_matched

    @property
    def match_rate(self) -> float:
        """K / teacher vocabulary size."""
        return self.num_matched / max(self.teacher_vocab_size, 1)


_PAIRS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _bytes_to_id(tokenizer) -> dict:
    table = _table(tokenizer)
    if table.family == "offsets":
        raise UnsupportedTokenizerError(
            f"vocabulary_map needs byte pieces, but {table.name} is of the offsets family (its pieces, e.g. "
            f"WordPiece '##' pieces, do not stand for fixed bytes). Supported: byte-level BPE and "
            f"SentencePiece/Metaspace tokenizers.")
    best: dict = {}
    special = table.special.tolist()
    fallback = table.fallback.tolist()
    for i, piece in enumerate(table.pieces):   # once per tokenizer (cached by the caller)
        if not piece or special[i]:
            continue
        rank = (fallback[i], i)
        have = best.get(piece)
        if have is None or rank < have:
            best[piece] = rank
    return {piece: rank[1] for piece, rank in best.items()}


def vocabulary_map(student_tokenizer, teacher_tokenizer) -> VocabularyMap:
    """The pairs (student id, teacher id) of tokens that stand for the same bytes; cached per pair."""
    sizes = (len(student_tokenizer), len(teacher_tokenizer))
    inner = _PAIRS.get(student_tokenizer)
    cached = inner.get(teacher_tokenizer) if inner is not None else None
    if cached is not None and (cached.student_vocab_size, cached.teacher_vocab_size) == sizes:
        return cached
    student, teacher = _bytes_to_id(student_tokenizer), _bytes_to_id(teacher_tokenizer)
    pairs = sorted((t_id, student[piece]) for piece, t_id in teacher.items() if piece in student)
    ids = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    result = VocabularyMap(student_ids=ids[:, 1].contiguous(), teacher_ids=ids[:, 0].contiguous(),
                           student_vocab_size=sizes[0], teacher_vocab_size=sizes[1])
    _PAIRS.setdefault(student_tokenizer, weakref.WeakKeyDictionary())[teacher_tokenizer] = result
    return result
