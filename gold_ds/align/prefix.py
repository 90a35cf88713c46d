"""Byte-prefix projections between two vocabularies, and the comparison events of aligned groups:
what ``gold_ds.losses.byte_prefix_jsd`` compares (see its module docstring for the divergence).

Projection (once per ordered tokenizer pair A -> B, ``prefix_projection``). For a token u of A with
bytes b(u) and a number of bytes d < len(b(u)) already spelled:

* ``key[d, u]`` names the prefix b(u)[:d] (equal keys, equal prefixes; 0 is the empty prefix, so
  every token with bytes has key 0 at d = 0), -1 where u has no byte d (or no bytes: special,
  zero-width or unmappable tokens);
* ``piece[d, u]`` is B's longest token that is a prefix of the rest b(u)[d:] (B's special tokens and
  byte-fallback duplicates excluded, as in ``vocabulary_map``), -1 where B has none;
* ``whole[u]`` names b(u) itself in the same numbering (so ``whole[u] = key[d, u']`` says that u is
  exactly the bytes u' has spelled after d of them), -1 for a token without bytes.

So, at a position where A has already spelled the bytes c of its current token and B starts a token,
"A's next token begins with c + x" for B's piece x is the event {u : key[d, u] = key of c,
piece[d, u] = x}, and A's probability that B's next piece is x is the sum of A's probabilities over
it; the tokens that are exactly c ({u : whole[u] = key of c}) end where B's piece starts, and what
follows them is on a row nobody computed. A's end-of-turn token maps to B's at d = 0 (they stand for
no bytes; the trainer pairs them).

Events (per micro-step, ``prefix_events``). Inside a group (``group_spans``: both sides spell the
same bytes), at every byte offset where one side starts a token the two sides can be compared:

* the *fine* side is the one that starts a token there whose token ends no later than the other
  side's token covering that offset (both start one: the shorter). Its row there is compared whole,
  over its own vocabulary;
* the *coarse* side is represented by its row that predicted the token covering the offset, with
  ``skip`` = the bytes of that token before the offset (0 when it starts there too), projected onto
  the fine side's pieces as above, conditioned on the bytes it has already spelled.

Where both start a token of the same length, each side is fine in turn (``side`` BOTH: the loss takes
the mean of the two comparisons): the student's alternatives may be longer than the teacher's pieces
(``10`` where the teacher has ``1``) or the other way round, and each direction sees only the other
side's longer alternatives. Offsets where the side that starts a token has a token reaching past the
other side's covering token are not compared (neither side's row predicts the other's piece there;
the next offset covers it). An end-of-turn group is one event with skip 0 and side BOTH. A coarse token whose span in
the text is not its piece's bytes (a dropped dummy prefix) is compared only at skip 0.
"""

from dataclasses import dataclass

import torch

from .spans import _table
from .vocab import _bytes_to_id

__all__ = ["PrefixProjection", "prefix_projection", "PrefixEvents", "prefix_events", "TEACHER", "STUDENT", "BOTH"]

TEACHER, STUDENT, BOTH = 0, 1, 2
"""``PrefixEvents.side``: the vocabulary an event is compared over (BOTH: the mean of the two)."""


@dataclass(frozen=True)
class PrefixProjection:
    """A's tokens projected onto B's pieces (module docstring): ``key``, ``piece`` [D, V_A] and
    ``whole`` [V_A] int64, D = the longest token of A in bytes (at most ``max_bytes``)."""
    key: torch.Tensor
    piece: torch.Tensor
    whole: torch.Tensor

    @property
    def max_skip(self) -> int:
        return int(self.key.shape[0])


_CACHE: dict = {}


def prefix_projection(a_tokenizer, b_tokenizer, a_eos: int, b_eos: int, max_bytes: int = 16) -> PrefixProjection:
    """The projection of A's vocabulary onto B's pieces (module docstring); cached per pair. Python
    over A's tokens once (seconds for a 150k vocabulary), tensors after: 2 x D x V_A int64 (D <=
    ``max_bytes``: about 40 MB for 150k tokens). Offsets ``max_bytes`` or more bytes into a longer
    token are not compared (``byte_prefix_jsd`` gives such events no members)."""
    cache_key = (id(a_tokenizer), id(b_tokenizer), len(a_tokenizer), len(b_tokenizer), a_eos, b_eos, max_bytes)
    if cache_key in _CACHE:
        return _CACHE[cache_key][2]
    a = _table(a_tokenizer)
    b_ids = _bytes_to_id(b_tokenizer)
    b_longest = max((len(p) for p in b_ids), default=0)
    size = len(a.pieces)
    depth = max(1, min(max_bytes, max((len(p) for p in a.pieces if p), default=1)))
    key = [[-1] * size for _ in range(depth)]
    piece = [[-1] * size for _ in range(depth)]
    whole = [-1] * size
    prefixes = {b"": 0}
    special = a.special.tolist()
    for u, p in enumerate(a.pieces):
        if not p or special[u]:
            continue
        whole[u] = prefixes.setdefault(p, len(prefixes))
        for d in range(min(len(p), depth)):
            key[d][u] = prefixes.setdefault(p[:d], len(prefixes))
            rest = p[d:]
            for n in range(min(len(rest), b_longest), 0, -1):
                v = b_ids.get(rest[:n])
                if v is not None:
                    piece[d][u] = v
                    break
    key[0][a_eos], piece[0][a_eos] = 0, b_eos
    result = PrefixProjection(torch.tensor(key, dtype=torch.long), torch.tensor(piece, dtype=torch.long),
                              torch.tensor(whole, dtype=torch.long))
    _CACHE[cache_key] = (a_tokenizer, b_tokenizer, result)  # the tokenizers kept alive: ids stay unique
    return result


@dataclass
class PrefixEvents:
    """One row per comparison (module docstring); rows index each side's flat completion rows."""
    student_row: torch.Tensor   # [E] int64
    teacher_row: torch.Tensor   # [E] int64
    side: torch.Tensor          # [E] int64: TEACHER, STUDENT or BOTH, the fine side(s)
    skip: torch.Tensor          # [E] int64: bytes of the coarse side's token before the offset

    def __len__(self) -> int:
        return int(self.student_row.numel())


def _members(first, end, spans):
    """Flat rows inside the groups [first, end) with positive width: (row, group, start, end)."""
    lengths = end - first
    group = torch.repeat_interleave(torch.arange(first.numel()), lengths)
    row = torch.repeat_interleave(first - (torch.cumsum(lengths, 0) - lengths), lengths) + torch.arange(int(lengths.sum()))
    start, stop = spans[row, 0], spans[row, 1]
    keep = stop > start
    return row[keep], group[keep], start[keep], stop[keep]


def _covering(group, start, other_group, other_start):
    """Per row, the index (into the other side's members) of the other side's member of the same
    group that starts last at or before ``start``."""
    key = group * (1 << 40) + start
    other = other_group * (1 << 40) + other_start
    return torch.searchsorted(other, key, right=True) - 1


def prefix_events(student_tokenizer, teacher_tokenizer, student_tokens, teacher_tokens, student_spans, teacher_spans,
                  student_first, student_end, teacher_first, teacher_end, byte_groups: int) -> PrefixEvents:
    """The comparison events of a micro-step's groups.

    ``*_tokens`` [N] and ``*_spans`` [N, 2]: each side's flat completion rows' tokens and byte spans
    (spans relative to each sample's text); ``*_first``, ``*_end``: [G] flat row ranges of the
    groups, the first ``byte_groups`` of them byte groups, the rest end-of-turn pairs (one row
    each)."""
    b = byte_groups
    student_widths_ok = student_spans[:, 1] - student_spans[:, 0] == _table(student_tokenizer).lengths[student_tokens]
    teacher_widths_ok = teacher_spans[:, 1] - teacher_spans[:, 0] == _table(teacher_tokenizer).lengths[teacher_tokens]
    s_row, s_grp, s_start, s_stop = _members(student_first[:b], student_end[:b], student_spans)
    t_row, t_grp, t_start, t_stop = _members(teacher_first[:b], teacher_end[:b], teacher_spans)
    cols = [[], [], [], []]

    def add(student_row, teacher_row, side, skip):
        for c, x in zip(cols, (student_row, teacher_row, side, skip)):
            c.append(x)

    if s_row.numel() and t_row.numel():
        # offsets where the student starts a token: the teacher's covering token
        j = _covering(s_grp, s_start, t_grp, t_start)
        skip_t = s_start - t_start[j]
        both = skip_t == 0
        s_len, t_len = s_stop - s_start, t_stop[j] - t_start[j]
        side = torch.where(~both | (s_len < t_len), STUDENT, torch.where(s_len > t_len, TEACHER, BOTH))
        fits = s_stop <= t_stop[j]
        keep = (both | fits) & (both | teacher_widths_ok[t_row[j]])
        add(s_row[keep], t_row[j][keep], side[keep], skip_t[keep])
        # offsets where only the teacher starts a token: the student's covering token, teacher fine
        i = _covering(t_grp, t_start, s_grp, s_start)
        skip_s = t_start - s_start[i]
        keep = (skip_s > 0) & (t_stop <= s_stop[i]) & student_widths_ok[s_row[i]]
        add(s_row[i][keep], t_row[keep], torch.full((int(keep.sum()),), TEACHER), skip_s[keep])
    eot = student_first.numel() - b
    add(student_first[b:], teacher_first[b:], torch.full((eot,), BOTH), torch.zeros(eot, dtype=torch.long))
    cat = [torch.cat(c) for c in cols]
    order = torch.argsort(cat[0] * (1 << 20) + cat[1], stable=True)  # student row order, then teacher's
    return PrefixEvents(*(c[order] for c in cat))
