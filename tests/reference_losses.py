"""Plain, fully materialized reference losses (autograd does the gradients).

Independent of gold_ds.losses: the tests run these in fp64, bench/losses.py runs them in fp32 as the
"straightforward implementation". Same conventions as the library (see gold_ds/losses/__init__.py).
"""

import torch
import torch.nn.functional as F


def reduce_rows(rows, mask, reduction):
    if mask is not None:
        rows = rows[mask != 0]
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / max(rows.numel(), 1)


def jsd_rows(p_s, p_t, beta, generalized):
    """Generalized JSD per row between probability vectors (possibly sub-vectors), last dim."""
    if beta == 0:
        rows = (p_t * (p_t.log() - p_s.log())).sum(-1)
        return rows + (p_s - p_t).sum(-1) if generalized else rows
    if beta == 1:
        rows = (p_s * (p_s.log() - p_t.log())).sum(-1)
        return rows + (p_t - p_s).sum(-1) if generalized else rows
    m = beta * p_t + (1 - beta) * p_s
    return beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)


def sorted_l1_rows(p, q):
    width = max(p.shape[-1], q.shape[-1])
    p = F.pad(p, (0, width - p.shape[-1])).sort(dim=-1, descending=True, stable=True).values
    q = F.pad(q, (0, width - q.shape[-1])).sort(dim=-1, descending=True, stable=True).values
    return (p - q).abs().sum(-1)


def scaled_probs(logits, temperature, log_scale):
    p = torch.softmax(logits / temperature, -1)
    return p if log_scale is None else p * log_scale.exp()[..., None]


def generalized_jsd(s, t, beta=0.5, temperature=1.0, mask=None, reduction="mean"):
    rows = jsd_rows(torch.softmax(s / temperature, -1), torch.softmax(t / temperature, -1), beta, False)
    return reduce_rows(rows, mask, reduction)


def uld(s, t, student_temperature=1.0, teacher_temperature=1.0, student_log_scale=None,
        teacher_log_scale=None, mask=None, reduction="mean"):
    p = scaled_probs(s, student_temperature, student_log_scale)
    q = scaled_probs(t, teacher_temperature, teacher_log_scale)
    return reduce_rows(sorted_l1_rows(p, q), mask, reduction)


def hybrid_uld(s, t, student_ids, teacher_ids, beta=0.5, matched_weight=None, unmatched_weight=None,
               student_temperature=1.0, teacher_temperature=1.0, student_log_scale=None,
               teacher_log_scale=None, mask=None, reduction="mean"):
    p = scaled_probs(s, student_temperature, student_log_scale)
    q = scaled_probs(t, teacher_temperature, teacher_log_scale)
    k, vs, vt = len(student_ids), s.shape[-1], t.shape[-1]
    w_m = k / vt if matched_weight is None else matched_weight
    w_u = 1 - k / vt if unmatched_weight is None else unmatched_weight
    s_matched, t_matched = set(student_ids.tolist()), set(teacher_ids.tolist())
    s_un = [i for i in range(vs) if i not in s_matched]
    t_un = [i for i in range(vt) if i not in t_matched]
    matched = jsd_rows(p[..., student_ids], q[..., teacher_ids], beta, True)
    unmatched = sorted_l1_rows(p[..., s_un], q[..., t_un])
    return reduce_rows(w_m * matched + w_u * unmatched, mask, reduction)


def longest_piece(rest: bytes, vocab: list) -> int:
    """The id of the longest entry of ``vocab`` (bytes; empty for special tokens) that begins
    ``rest``, by brute force; -1 if none."""
    best, best_len = -1, 0
    for v, piece in enumerate(vocab):
        if piece and len(piece) > best_len and rest.startswith(piece):
            best, best_len = v, len(piece)
    return best


def prefix_tables(a_vocab: list, b_vocab: list, a_eos: int, b_eos: int) -> tuple:
    """(key [D, V], piece [D, V], whole [V]) int64 tables projecting ``a_vocab`` (V entries) onto
    ``b_vocab`` pieces, by their definition in gold_ds.align.prefix, written out by brute force."""
    depth = max(len(p) for p in a_vocab)
    names = {b"": 0}
    key = torch.full((depth, len(a_vocab)), -1, dtype=torch.long)
    piece = torch.full((depth, len(a_vocab)), -1, dtype=torch.long)
    whole = torch.full((len(a_vocab),), -1, dtype=torch.long)
    for u, p in enumerate(a_vocab):
        for d in range(len(p)):
            key[d, u] = names.setdefault(p[:d], len(names))
            piece[d, u] = longest_piece(p[d:], b_vocab)
    for u, p in enumerate(a_vocab):
        if p:
            whole[u] = names.setdefault(p, len(names))
    key[0, a_eos], piece[0, a_eos] = 0, b_eos
    return key, piece, whole


def byte_prefix_jsd(s, t, side, skip, student_token, teacher_token, s_vocab, t_vocab, s_eos, t_eos,
                    beta=0.5, student_temperature=1.0, teacher_temperature=1.0, mask=None, reduction="mean"):
    """Byte-prefix JSD row by row from the vocabularies' bytes (``*_vocab``: one bytes per id, empty
    for special tokens; ``*_eos``: the end-of-turn ids, which stand for each other): the coarse side's
    tokens that agree with the spelled prefix, grouped by the fine side's longest piece of what
    follows, or "stop" (the token is the prefix itself, or the fine side has no piece for its rest);
    the fine side's pieces reached, and "stop" for the rest of its mass (renormalized on the pieces
    reached instead when no coarse token stops); then the generalized JSD (teacher a, student b) of
    the two distributions over those classes. ``side`` 0: the teacher is fine, 1: the student, 2:
    the mean of both."""
    s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    rows = []
    for i in range(s.shape[0]):
        code = int(side.reshape(-1)[i])
        both = [_prefix_row(s[i], t[i], f, int(skip.reshape(-1)[i]), int(student_token.reshape(-1)[i]),
                            int(teacher_token.reshape(-1)[i]), s_vocab, t_vocab, s_eos, t_eos, beta,
                            student_temperature, teacher_temperature) for f in ((False, True) if code == 2 else
                                                                                (bool(code),))]
        rows.append(sum(both) / len(both))
    return reduce_rows(torch.stack(rows).reshape(side.shape), mask, reduction)


def _prefix_row(s_row, t_row, fine_is_student, d, s_token, t_token, s_vocab, t_vocab, s_eos, t_eos, beta,
                student_temperature, teacher_temperature):
    """One direction of one row of ``byte_prefix_jsd``."""
    ls = torch.log_softmax(s_row / student_temperature, -1)
    lt = torch.log_softmax(t_row / teacher_temperature, -1)
    if fine_is_student:
        lf, lc, f_vocab, c_vocab, c_tok, c_eos, f_eos = ls, lt, s_vocab, t_vocab, t_token, t_eos, s_eos
    else:
        lf, lc, f_vocab, c_vocab, c_tok, c_eos, f_eos = lt, ls, t_vocab, s_vocab, s_token, s_eos, t_eos
    spelled = c_vocab[c_tok]
    classes = {}
    if d < len(spelled) or (d == 0 and c_tok == c_eos):
        for u, p in enumerate(c_vocab):
            if u == c_eos and d == 0:
                classes.setdefault(f_eos, []).append(u)
            elif len(p) > d and p[:d] == spelled[:d]:
                v = longest_piece(p[d:], f_vocab)
                classes.setdefault(v if v >= 0 else "stop", []).append(u)
            elif d > 0 and p == spelled[:d]:
                classes.setdefault("stop", []).append(u)
    if not classes:
        return s_row.sum() * 0
    support = sorted(v for v in classes if v != "stop")
    p_c = lc.exp()
    q = torch.stack([p_c[classes[v]].sum() for v in support]
                    + [p_c[classes["stop"]].sum() if "stop" in classes else lc.new_zeros(())])
    q = q / q.sum()
    off = [v for v in range(lf.shape[0]) if v not in classes]
    if d > 0:  # inside the coarse token: the fine side's mass off the pieces reached is its stop
        p_f = torch.cat([lf.exp()[support], lf.exp()[off].sum(0, keepdim=True)])
    else:
        p_f = lf.exp()[support] / lf.exp()[support].sum()
        q = q[:-1]
    a, b = (q, p_f) if fine_is_student else (p_f, q)
    tiny = torch.finfo(torch.float32).tiny  # the library's floor for a probability it takes the log of
    kl = lambda x, y: (x[x > 0] * (x[x > 0] / y[x > 0].clamp_min(tiny)).log()).sum()  # noqa: E731  (0 log 0 = 0)
    if beta == 0:
        return kl(a, b)
    if beta == 1:
        return kl(b, a)
    m = beta * a + (1 - beta) * b
    return beta * kl(a, m) + (1 - beta) * kl(b, m)
