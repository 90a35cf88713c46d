"""Per-chunk math on fp32 rows: log-softmax, the divergence terms, the sorted L1, and the chain rule
back to logits. Everything here works on rows [n, V] and returns per-row results.

Gradients travel as ``r = x * dL/dx`` for a (scaled) probability vector ``x = softmax(z / T) * c``:
then ``dL/dz = (r - softmax(z / T) * sum(r)) / T`` and ``dL/d log(c) = sum(r)`` (``sum`` over the full
vocabulary), which needs no division by probabilities that may underflow.
"""

import torch
import torch.distributed as dist


def row_sums(xs, group):
    """[len(xs), n]: each [n, v] tensor summed over its last dim; under a vocab-sharded ``group``,
    over the full vocabulary (one SUM all_reduce of [len(xs), n])."""
    s = torch.stack([x.sum(-1) for x in xs])
    if group is not None:
        dist.all_reduce(s, group=group)
    return s


def scale_logits(z, temperature):
    return z if temperature == 1.0 else z / temperature


def log_softmax(zs, group):
    """log_softmax of each [n, v] tensor in ``zs``; under ``group`` the last dim is a vocab shard and
    normalization spans all shards (one MAX and one SUM all_reduce of [n, len(zs)] for all of them)."""
    if group is None:
        return [torch.log_softmax(z, -1) for z in zs]
    m = torch.stack([z.amax(-1) for z in zs], -1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    shifted = [z - m[:, i, None] for i, z in enumerate(zs)]
    e = torch.stack([s.exp().sum(-1) for s in shifted], -1)
    dist.all_reduce(e, group=group)
    return [s.sub_(e[:, i, None].log()) for i, s in enumerate(shifted)]


def jsd_terms(la, a, lb, b, beta, generalized):
    """Generalized JSD between teacher ``a`` and student ``b`` (log values ``la``, ``lb``).

    Returns (r_a, r_b, (c_a, c_b)): ``x * dL/dx`` for both sides, and the per-element loss terms as
    ``c_a * r_a + c_b * r_b`` (c in {0, 1}; sum the r's first, they are summed anyway).
    0 < beta < 1: terms = beta*a*log(a/m) + (1-beta)*b*log(b/m), m = beta*a + (1-beta)*b; each term is
    the Jensen gap of x*log(x), so it is >= 0 even when ``a`` and ``b`` are not normalized. log(m)
    is taken of m itself (clamped to the smallest normal float: where m underflows, a and b do too
    and their terms are 0); the log-ratios use the exact ``la``, ``lb``.
    beta == 0: KL(a||b) = a*log(a/b); beta == 1: KL(b||a). With ``generalized`` the endpoints add
    ``b - a`` (resp. ``a - b``), the I-divergence, which is >= 0 on sub-vectors too and equals KL on
    distributions. The r's are the same either way on normalized rows (the differences cancel in
    the softmax chain rule), so they are always those of the generalized form.
    """
    if beta == 0.0:
        return a * (la - lb), b - a, (1, int(generalized))
    if beta == 1.0:
        return a - b, b * (lb - la), (int(generalized), 1)
    a_part, b_part = a * beta, b * (1.0 - beta)
    lm = (a_part + b_part).clamp_min_(torch.finfo(a.dtype).tiny).log_()
    return (la - lm).mul_(a_part), (lb - lm).mul_(b_part), (1, 1)


def sorted_l1(a, b, need_r_a=True):
    """ULD distance: L1 between ``a`` and ``b`` each sorted descending, the shorter zero-padded.

    Rows [n, Va], [n, Vb] of non-negative values; returns (row_loss, r_a or None unless
    ``need_r_a``, r_b). The sort is stable, so tied values are ranked by column index: that fixes
    the subgradient used at ties (the loss is not differentiable there) and makes it the same
    whether or not the vocabulary is sharded.
    """
    sa, ia = a.sort(dim=-1, descending=True, stable=True)
    sb, ib = b.sort(dim=-1, descending=True, stable=True)
    k = min(a.shape[-1], b.shape[-1])
    d = sb[:, :k] - sa[:, :k]
    loss = torch.linalg.vector_norm(d, 1, -1) + sa[:, k:].sum(-1) + sb[:, k:].sum(-1)
    sign = d.sign_()
    # r in sorted order is value * sign; past the common length the partner is a zero pad: sign +1.
    sb[:, :k] *= sign
    r_b = b.new_empty(b.shape).scatter_(-1, ib, sb)
    if not need_r_a:
        return loss, None, r_b
    sa[:, :k] *= sign.neg_()
    return loss, a.new_empty(a.shape).scatter_(-1, ia, sa), r_b


def to_logit_grad(r, p, r_sum, factor):
    """factor * dL/dz for p = softmax(z / T) with factor = weight / T: (r - p * sum(r)) * factor,
    ``r_sum`` the full-vocabulary sum (computed in place in ``r``)."""
    r.addcmul_(p, r_sum[:, None], value=-1.0)
    return r if factor == 1.0 else r.mul_(factor)
