"""Alignment groups: runs of student tokens and teacher tokens that spell the same bytes.

Definitions (per sequence; spans are [n, 2] (start, end) byte offsets as from ``byte_spans``, ordered
and non-overlapping, zero-width tokens allowed):

* A *boundary* is a byte position where both sides have a positive-width token ending. Byte 0 is
  the boundary every sequence starts from.
* A *candidate* is the byte range [b_prev, b) between consecutive boundaries. On each side its
  tokens are the positive-width tokens ending in (b_prev, b]. It becomes a *group* only if on both
  sides those tokens tile [b_prev, b) exactly (their widths sum to b - b_prev: they are disjoint and
  end at b, so this means no gap and nothing starting before b_prev). Other candidates' bytes are
  uncovered.
* A group's token range on each side runs from its first to its last positive-width token (end
  exclusive). Zero-width tokens at its edges (EOS, a lone dummy-prefix ``▁``, clipped template
  tokens) belong to no group; a zero-width token strictly between two of its tokens lies inside the
  range, as ranges are contiguous.
* ``covered_bytes`` is the sum of the groups' byte lengths; ``total_bytes`` is the number of bytes
  covered by at least one token of either side (the union of both sides' spans).

Everything is computed over the flattened batch with sorted keys ``offset[sequence] + byte``,
searchsorted and cumsum: there is no per-token Python loop.
"""

from dataclasses import dataclass

import torch

__all__ = ["Groups", "group_spans"]


@dataclass
class Groups:
    """Alignment groups of a batch. Token indices are within each sequence, end exclusive; bytes are
    offsets into each sequence's completion bytes."""
    sequence: torch.Tensor       # [G] int64
    student_start: torch.Tensor  # [G] int64
    student_end: torch.Tensor    # [G] int64
    teacher_start: torch.Tensor  # [G] int64
    teacher_end: torch.Tensor    # [G] int64
    byte_start: torch.Tensor     # [G] int64
    byte_end: torch.Tensor       # [G] int64
    covered_bytes: torch.Tensor  # [B] int64
    total_bytes: torch.Tensor    # [B] int64

    def __len__(self) -> int:
        return int(self.sequence.numel())

    @property
    def coverage(self) -> float:
        """Covered bytes / total bytes over the batch (1.0 for a batch with no bytes)."""
        total = int(self.total_bytes.sum())
        return 1.0 if total == 0 else int(self.covered_bytes.sum()) / total


def _as_batch(spans, side: str) -> list[torch.Tensor]:
    if isinstance(spans, torch.Tensor):
        spans = [spans]
    out = []
    for b, s in enumerate(spans):
        s = torch.as_tensor(s, dtype=torch.long)
        if s.numel() == 0:
            s = s.reshape(0, 2)
        if s.dim() != 2 or s.shape[1] != 2:
            raise ValueError(f"{side}_spans[{b}] must be [n, 2], got shape {tuple(s.shape)}")
        out.append(s)
    return out


class _Side:
    """One side's spans, flattened over the batch and validated."""

    def __init__(self, batch: list[torch.Tensor], side: str):
        counts = torch.tensor([s.shape[0] for s in batch], dtype=torch.long)
        flat = torch.cat(batch) if batch else torch.zeros(0, 2, dtype=torch.long)
        seq = torch.repeat_interleave(torch.arange(len(batch)), counts)
        first = torch.zeros(flat.shape[0], dtype=torch.bool)
        starts_at = torch.cumsum(counts, 0) - counts
        first[starts_at[counts > 0]] = True
        start, end = flat[:, 0], flat[:, 1]
        prev_end = torch.cat([torch.zeros(1, dtype=torch.long), end[:-1]]) if flat.shape[0] else end
        bad = (start < 0) | (end < start) | (~first & (start < prev_end))
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            b = int(seq[i])
            raise ValueError(f"{side}_spans[{b}] must be ordered, non-overlapping (start <= end, start >= "
                             f"previous end): token {i - int(starts_at[b])} is {flat[i].tolist()}")
        self.seq, self.start, self.end = seq, start, end
        self.index = torch.arange(flat.shape[0]) - starts_at[seq]   # index within its sequence
        self.extent = torch.zeros(len(batch), dtype=torch.long)
        if flat.shape[0]:
            self.extent.scatter_reduce_(0, seq, end, reduce="amax")
        keep = end > start
        self.pos_seq, self.pos_start, self.pos_end = seq[keep], start[keep], end[keep]
        self.pos_index = self.index[keep]
        # number of positive-width tokens before each sequence
        pos_counts = torch.bincount(self.pos_seq, minlength=len(batch))
        self.pos_before = torch.cumsum(pos_counts, 0) - pos_counts
        widths = self.pos_end - self.pos_start
        self.width_cum = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(widths, 0)])


def group_spans(student_spans, teacher_spans) -> Groups:
    """Alignment groups between student and teacher byte spans (lists with one [n, 2] tensor per
    sequence, or one [n, 2] tensor for a batch of one). See the module docstring."""
    s_batch, t_batch = _as_batch(student_spans, "student"), _as_batch(teacher_spans, "teacher")
    if len(s_batch) != len(t_batch):
        raise ValueError(f"student_spans has {len(s_batch)} sequences, teacher_spans {len(t_batch)}")
    batch = len(s_batch)
    s, t = _Side(s_batch, "student"), _Side(t_batch, "teacher")
    extent = torch.maximum(s.extent, t.extent)
    offset = torch.cumsum(extent + 1, 0) - (extent + 1)      # sequence b's bytes live at offset[b] + byte

    key_s = offset[s.pos_seq] + s.pos_end                     # strictly increasing
    key_t = offset[t.pos_seq] + t.pos_end
    where = torch.searchsorted(key_t, key_s)
    hit = where < key_t.numel()
    hit &= key_t[where.clamp(max=max(key_t.numel() - 1, 0))] == key_s if key_t.numel() else hit
    j_s = hit.nonzero().squeeze(1)                            # boundary token, student (flat positive index)
    j_t = where[j_s]
    seq = s.pos_seq[j_s]
    b_end = s.pos_end[j_s]
    # the previous boundary of the same sequence, else byte 0 (before the sequence's first token)
    same = torch.zeros_like(seq, dtype=torch.bool)
    if seq.numel() > 1:
        same[1:] = seq[1:] == seq[:-1]
    shift = lambda x: torch.cat([x[:1], x[:-1]])  # noqa: E731  (value at k-1; masked by `same` at k=0)
    b_start = torch.where(same, shift(b_end), torch.zeros_like(b_end))
    prev_s = torch.where(same, shift(j_s), s.pos_before[seq] - 1)
    prev_t = torch.where(same, shift(j_t), t.pos_before[seq] - 1)
    length = b_end - b_start
    tiles_s = s.width_cum[j_s + 1] - s.width_cum[prev_s + 1] == length
    tiles_t = t.width_cum[j_t + 1] - t.width_cum[prev_t + 1] == length
    emit = tiles_s & tiles_t

    seq, length = seq[emit], length[emit]
    covered = torch.zeros(batch, dtype=torch.long).index_add_(0, seq, length)
    total = _union_bytes(s, t, offset, extent)
    return Groups(
        sequence=seq,
        student_start=s.pos_index[prev_s[emit] + 1], student_end=s.pos_index[j_s[emit]] + 1,
        teacher_start=t.pos_index[prev_t[emit] + 1], teacher_end=t.pos_index[j_t[emit]] + 1,
        byte_start=b_start[emit], byte_end=b_end[emit],
        covered_bytes=covered, total_bytes=total)


def _union_bytes(s: _Side, t: _Side, offset: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
    """Per sequence: bytes inside a positive-width token of either side."""
    size = int(offset[-1] + extent[-1] + 1) if offset.numel() else 0
    union = torch.zeros(size + 1, dtype=torch.bool)
    for side in (s, t):
        delta = torch.zeros(size + 1, dtype=torch.long)
        delta.index_add_(0, offset[side.pos_seq] + side.pos_start, torch.ones_like(side.pos_start))
        delta.index_add_(0, offset[side.pos_seq] + side.pos_end, -torch.ones_like(side.pos_end))
        union |= torch.cumsum(delta, 0) > 0
    run = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(union.long(), 0)])
    return run[offset + extent] - run[offset]
