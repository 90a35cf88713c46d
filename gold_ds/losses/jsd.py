"""Generalized Jensen-Shannon divergence between student and teacher over a shared vocabulary."""

from . import _base
from ._math import jsd_terms, log_softmax, row_sums, scale_logits, to_logit_grad


def generalized_jsd(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, mask=None,
                    reduction="mean", group=None, chunk_size=None):
    """Generalized JSD per row, reduced over the counted rows.

    With P_s = softmax(student_logits / temperature), P_t = softmax(teacher_logits / temperature) and
    M = beta * P_t + (1 - beta) * P_s, a row's loss is beta * KL(P_t || M) + (1 - beta) * KL(P_s || M);
    beta == 0 is exactly KL(P_t || P_s) and beta == 1 exactly KL(P_s || P_t) (the GKD/TRL convention).
    The loss is not multiplied by temperature**2.

    Args:
        student_logits, teacher_logits: [..., V] logits over the same vocabulary (any float dtype;
            math in fp32). Under ``group`` each is this rank's contiguous vocabulary shard, and the
            two shards cover the same columns.
        beta: in [0, 1]. temperature: > 0, divides both logits.
        mask: optional tensor shaped like the rows (``[...]``); non-zero marks rows that count.
        reduction: "sum" over counted rows, or "mean" over them (0, with a graph, if none count).
        group: torch.distributed process group over which the vocabulary is sharded, or None.
        chunk_size: rows per chunk (forward and backward); None picks it from the vocabulary size.

    Returns a 0-dim fp32 tensor. Sharded: per chunk, one MAX all_reduce of [n, 2], one SUM
    all_reduce of [n, 2] and one SUM all_reduce of [2, n] fp32 scalars, all in forward; backward is
    local (every rank holds the same loss, so its gradient is just its own slice).
    """
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        _base.check_logits(name, x)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"generalized_jsd needs student_logits and teacher_logits of the same shape "
                         f"(same rows, same vocabulary shard); got {tuple(student_logits.shape)} and "
                         f"{tuple(teacher_logits.shape)}")
    _base.check_beta(beta)
    _base.check_positive("temperature", temperature)
    _base.check_row_tensor("mask", mask, student_logits.shape[:-1], floating=False)
    _base.check_common(reduction, chunk_size)
    every = _base.vocab_sizes(group, student_logits.shape[:-1].numel(), student_logits.shape[-1])
    return jsd_loss(student_logits, teacher_logits, beta=beta, temperature=temperature, mask=mask,
                    reduction=reduction, group=group,
                    chunk_size=_base.auto_chunk_size(chunk_size, sum(e[1] for e in every)))


def jsd_loss(student, teacher, *, beta, temperature, mask, reduction, group, chunk_size, heads=(None, None),
             kernel_rows=None):
    """The chunked JSD of checked inputs: logits, or hidden states with ``heads`` (see ``_base``)."""
    beta, temperature = float(beta), float(temperature)

    def kernel(s, t, _s_scale, _t_scale, need, weight):
        lb, la = log_softmax([scale_logits(s, temperature), scale_logits(t, temperature)], group)
        b, a = lb.exp(), la.exp()
        r_a, r_b, (c_a, c_b) = jsd_terms(la, a, lb, b, beta, generalized=False)
        sum_a, sum_b = row_sums([r_a, r_b], group)
        g_s = to_logit_grad(r_b, b, sum_b, weight / temperature) if need[0] else None
        g_t = to_logit_grad(r_a, a, sum_a, weight / temperature) if need[1] else None
        return c_a * sum_a + c_b * sum_b, g_s, g_t, None, None

    return _base.chunked_loss(kernel, student, teacher, None, None, mask, reduction, chunk_size, heads, kernel_rows)
