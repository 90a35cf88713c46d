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
