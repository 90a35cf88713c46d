"""Universal Logit Distillation (sorted L1 between probability vectors) and its hybrid with JSD on
the tokens the two vocabularies share. Vocabularies may differ in size and order.

Sharded vocabularies: the kernels here need whole rows (a sort), so under a ``group`` each chunk is
moved from the vocab-sharded layout to a row-sharded one with one all_to_all per input (rank q gets
full rows for its ~n/W rows of the chunk), computed there, and the gradient moved back the same
way; see the package docstring for why.
"""

import torch
import torch.distributed as dist

from . import _base
from ._math import jsd_terms, scale_logits, sorted_l1, to_logit_grad


def _check_pair(student_logits, teacher_logits, student_temperature, teacher_temperature,
                student_log_scale, teacher_log_scale, mask, reduction, chunk_size):
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        _base.check_logits(name, x)
    _base.check_rows(student_logits, teacher_logits)
    _base.check_positive("student_temperature", student_temperature)
    _base.check_positive("teacher_temperature", teacher_temperature)
    rows = student_logits.shape[:-1]
    _base.check_row_tensor("student_log_scale", student_log_scale, rows, floating=True)
    _base.check_row_tensor("teacher_log_scale", teacher_log_scale, rows, floating=True)
    _base.check_row_tensor("mask", mask, rows, floating=False)
    _base.check_common(reduction, chunk_size)


def _probs(z, temperature, log_scale):
    """(p, x) with p = softmax(z / T) and x = p * exp(log_scale) per row."""
    p = torch.softmax(scale_logits(z, temperature), -1)
    return p, (p if log_scale is None else p * log_scale.exp()[:, None])


def _log_probs(z, temperature, log_scale):
    """(p, log x, x) with p = softmax(z / T) and x = p * exp(log_scale) per row."""
    lp = torch.log_softmax(scale_logits(z, temperature), -1)
    if log_scale is None:
        p = lp.exp()
        return p, lp, p
    lx = lp + log_scale[:, None]
    return lp.exp(), lx, lx.exp()


def _grads(need, weight, r_b, p_s, ts, r_a, p_t, tt):
    """Turn r = x * dL/dx of student (b) and teacher (a) into the kernel's four gradients, times
    ``weight`` (``r_a`` may be None when neither teacher gradient is needed)."""
    sum_b = r_b.sum(-1)
    sum_a = r_a.sum(-1) if r_a is not None else None
    return (to_logit_grad(r_b, p_s, sum_b, weight / ts) if need[0] else None,
            to_logit_grad(r_a, p_t, sum_a, weight / tt) if need[1] else None,
            sum_b.mul_(weight) if need[2] else None,
            sum_a.mul_(weight) if need[3] else None)


def _row_layout(kernel, group, every):
    """Wrap a whole-row kernel so that it runs on vocab-sharded chunks (called by every rank); a
    kernel's per-row ``data`` (see ``_base.chunked_loss``) follows its rows."""
    if group is None:
        return kernel
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    vocab = ([e[1] for e in every], [e[2] for e in every])

    def to_rows(x, sizes, counts):
        """[n, sizes[rank]] vocab shard -> [counts[rank], sum(sizes)] whole rows."""
        mine = counts[rank]
        out = x.new_empty(mine * sum(sizes))
        dist.all_to_all_single(out, x.contiguous().view(-1), [mine * v for v in sizes],
                               [c * x.shape[1] for c in counts], group=group)
        return torch.cat([blk.view(mine, v) for blk, v in zip(out.split([mine * v for v in sizes]), sizes)], 1)

    def to_vocab(g, sizes, counts):
        """[counts[rank], sum(sizes)] whole rows -> [n, sizes[rank]] vocab shard (inverse of to_rows)."""
        send = torch.cat([blk.reshape(-1) for blk in g.split(sizes, 1)])
        out = g.new_empty(sum(counts) * sizes[rank])
        dist.all_to_all_single(out, send, [c * sizes[rank] for c in counts],
                               [counts[rank] * v for v in sizes], group=group)
        return out.view(sum(counts), sizes[rank])

    def sharded(s, t, s_scale, t_scale, need, weight, **extra):
        n = s.shape[0]
        counts = [n // world + (q < n % world) for q in range(world)]
        lo = sum(counts[:rank])
        hi = lo + counts[rank]
        loss, g_s, g_t, g_cs, g_ct = kernel(
            to_rows(s, vocab[0], counts), to_rows(t, vocab[1], counts),
            None if s_scale is None else s_scale[lo:hi], None if t_scale is None else t_scale[lo:hi], need, weight,
            **{k: [x[lo:hi] for x in v] for k, v in extra.items()})  # per-row data: this rank's rows
        scalars = s.new_zeros(3, n)  # row loss and the two log-scale gradients, gathered by a SUM
        scalars[0, lo:hi] = loss
        if g_cs is not None:
            scalars[1, lo:hi] = g_cs
        if g_ct is not None:
            scalars[2, lo:hi] = g_ct
        dist.all_reduce(scalars, group=group)
        return (scalars[0],
                to_vocab(g_s, vocab[0], counts) if need[0] else None,
                to_vocab(g_t, vocab[1], counts) if need[1] else None,
                scalars[1] if need[2] else None,
                scalars[2] if need[3] else None)

    return sharded


def uld(student_logits, teacher_logits, *, student_temperature=1.0, teacher_temperature=1.0,
        student_log_scale=None, teacher_log_scale=None, mask=None, reduction="mean", group=None,
        chunk_size=None):
    """ULD loss per row, reduced over the counted rows.

    Per row, p = softmax(student_logits / student_temperature) * exp(student_log_scale) and
    q = softmax(teacher_logits / teacher_temperature) * exp(teacher_log_scale) (a missing log scale is
    0; log scales are per-row [...] tensors, e.g. GOLD's span merge factors, and get gradients too);
    the loss is sum_k |sort_desc(p)_k - sort_desc(q)_k| with the shorter vector zero-padded to
    max(Vs, Vt). Ties are ranked by column index (stable sort), which fixes the subgradient there.
    Other arguments as in :func:`gold_ds.losses.generalized_jsd`; under ``group`` each logits tensor
    is this rank's shard of its own vocabulary.
    """
    _check_pair(student_logits, teacher_logits, student_temperature, teacher_temperature,
                student_log_scale, teacher_log_scale, mask, reduction, chunk_size)
    every = _base.vocab_sizes(group, student_logits.shape[:-1].numel(), student_logits.shape[-1],
                              teacher_logits.shape[-1])
    return uld_loss(student_logits, teacher_logits, student_temperature=student_temperature,
                    teacher_temperature=teacher_temperature, student_log_scale=student_log_scale,
                    teacher_log_scale=teacher_log_scale, mask=mask, reduction=reduction, group=group,
                    chunk_size=_base.auto_chunk_size(chunk_size, max(sum(e[1] for e in every),
                                                                     sum(e[2] for e in every))), every=every)


def uld_loss(student, teacher, *, student_temperature, teacher_temperature, student_log_scale, teacher_log_scale,
             mask, reduction, group, chunk_size, every, heads=(None, None), kernel_rows=None):
    """The chunked ULD of checked inputs: logits, or hidden states with ``heads`` (see ``_base``);
    ``every``: the ranks' (rows, Vs_local, Vt_local)."""
    ts, tt = float(student_temperature), float(teacher_temperature)

    def kernel(s, t, s_scale, t_scale, need, weight):
        p_s, b = _probs(s, ts, s_scale)
        p_t, a = _probs(t, tt, t_scale)
        loss, r_a, r_b = sorted_l1(a, b, need_r_a=need[1] or need[3])
        return (loss, *_grads(need, weight, r_b, p_s, ts, r_a, p_t, tt))

    return _base.chunked_loss(_row_layout(kernel, group, every), student, teacher, student_log_scale,
                              teacher_log_scale, mask, reduction, chunk_size, heads, kernel_rows)


def _check_ids(name, ids, vocab):
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
        got = f"{ids.dtype} tensor of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else repr(ids)
        raise ValueError(f"{name} must be a 1-D int64 (or int32) tensor of global token ids; got {got}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = ids[(ids < 0) | (ids >= vocab)][:5].tolist()
        raise ValueError(f"{name} must lie in [0, {vocab}) (the full vocabulary); got out-of-range ids {bad}")
    if ids.unique().numel() != ids.numel():
        raise ValueError(f"{name} must not repeat an id (each token is matched at most once); got {ids.numel()} "
                         f"ids of which {ids.unique().numel()} distinct")


def _unmatched(ids, vocab):
    keep = torch.ones(vocab, dtype=torch.bool, device=ids.device)
    keep[ids] = False
    return keep.nonzero().squeeze(1)


def hybrid_uld(student_logits, teacher_logits, student_ids, teacher_ids, *, beta=0.5, matched_weight=None,
               unmatched_weight=None, student_temperature=1.0, teacher_temperature=1.0,
               student_log_scale=None, teacher_log_scale=None, mask=None, reduction="mean", group=None,
               chunk_size=None):
    """Hybrid ULD per row: JSD on the tokens both vocabularies share, sorted L1 on the rest.

    ``student_ids[k]`` and ``teacher_ids[k]`` (1-D, same length K, global ids, no repeats) name the
    same token. With p, q the scaled probabilities of :func:`uld`, a_k = q[teacher_ids[k]] and
    b_k = p[student_ids[k]] (not renormalized), the matched part is, summed over k:
    0 < beta < 1: beta*a*log(a/m) + (1-beta)*b*log(b/m), m = beta*a + (1-beta)*b;
    beta == 0: a*log(a/b) - a + b; beta == 1: b*log(b/a) - b + a (generalized KL, i.e. KL plus the
    mass difference, so it is >= 0 on sub-vectors and equals KL on distributions).
    The unmatched part is the sorted L1 of :func:`uld` between p without the columns ``student_ids``
    and q without the columns ``teacher_ids``. loss = matched_weight * matched + unmatched_weight *
    unmatched, with defaults matched_weight = K / Vt and unmatched_weight = 1 - matched_weight.
    """
    _check_pair(student_logits, teacher_logits, student_temperature, teacher_temperature,
                student_log_scale, teacher_log_scale, mask, reduction, chunk_size)
    _base.check_beta(beta)
    _base.check_weight("matched_weight", matched_weight)
    _base.check_weight("unmatched_weight", unmatched_weight)
    every = _base.vocab_sizes(group, student_logits.shape[:-1].numel(), student_logits.shape[-1],
                              teacher_logits.shape[-1])
    return hybrid_uld_loss(student_logits, teacher_logits, student_ids, teacher_ids, beta=beta,
                           matched_weight=matched_weight, unmatched_weight=unmatched_weight,
                           student_temperature=student_temperature, teacher_temperature=teacher_temperature,
                           student_log_scale=student_log_scale, teacher_log_scale=teacher_log_scale, mask=mask,
                           reduction=reduction, group=group, chunk_size=chunk_size, every=every)


def hybrid_uld_loss(student, teacher, student_ids, teacher_ids, *, beta, matched_weight, unmatched_weight,
                    student_temperature, teacher_temperature, student_log_scale, teacher_log_scale, mask,
                    reduction, group, chunk_size, every, heads=(None, None), kernel_rows=None):
    """The chunked hybrid ULD of checked inputs (ids checked here): logits, or hidden states with
    ``heads`` (see ``_base``); ``every``: the ranks' (rows, Vs_local, Vt_local); ``chunk_size`` None
    picks the logits losses' default."""
    vs, vt = sum(e[1] for e in every), sum(e[2] for e in every)
    _check_ids("student_ids", student_ids, vs)
    _check_ids("teacher_ids", teacher_ids, vt)
    if student_ids.numel() != teacher_ids.numel():
        raise ValueError(f"student_ids and teacher_ids must have the same length (pairs of one token); got "
                         f"{student_ids.numel()} and {teacher_ids.numel()}")
    device = student.device
    s_ids, t_ids = student_ids.long().to(device), teacher_ids.long().to(device)
    s_un, t_un = _unmatched(s_ids, vs), _unmatched(t_ids, vt)
    w_m = float(matched_weight) if matched_weight is not None else s_ids.numel() / vt
    w_u = float(unmatched_weight) if unmatched_weight is not None else 1.0 - s_ids.numel() / vt
    ts, tt, beta = float(student_temperature), float(teacher_temperature), float(beta)

    def kernel(s, t, s_scale, t_scale, need, weight):
        p_s, lb, b = _log_probs(s, ts, s_scale)
        p_t, la, a = _log_probs(t, tt, t_scale)
        r_a_m, r_b_m, _ = jsd_terms(la[:, t_ids], a[:, t_ids], lb[:, s_ids], b[:, s_ids], beta, generalized=True)
        need_r_a = need[1] or need[3]
        loss_u, r_a_u, r_b_u = sorted_l1(a[:, t_un], b[:, s_un], need_r_a)
        loss = (r_a_m.sum(-1) + r_b_m.sum(-1)).mul_(w_m).add_(loss_u, alpha=w_u)  # generalized: both count
        r_b = b.new_empty(b.shape).index_copy_(1, s_ids, r_b_m.mul_(w_m)).index_copy_(1, s_un, r_b_u.mul_(w_u))
        r_a = None
        if need_r_a:
            r_a = a.new_empty(a.shape).index_copy_(1, t_ids, r_a_m.mul_(w_m)).index_copy_(1, t_un, r_a_u.mul_(w_u))
        return (loss, *_grads(need, weight, r_b, p_s, ts, r_a, p_t, tt))

    return _base.chunked_loss(_row_layout(kernel, group, every), student, teacher, student_log_scale,
                              teacher_log_scale, mask, reduction, _base.auto_chunk_size(chunk_size, max(vs, vt)),
                              heads, kernel_rows)
