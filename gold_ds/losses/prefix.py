"""Byte-prefix JSD: a divergence between two models of different tokenizers that compares, at each
position, what both of them can say about the next bytes.

Why. Where one tokenizer says in one token what the other spells in several (``circle`` against
``c i r c l e``; ``139`` against ``13 9``), the row-level cross-tokenizer losses compare rows that do
not talk about the same thing: ``hybrid_uld`` compares the student's probability of its first piece
``c`` with the teacher's probability of the *token* ``c``, which a teacher that says ``circle`` gives
almost none; ``uld`` sorts the probabilities and so never says which token is right. What both
models do define is a distribution over the next *bytes*: a teacher that gives ``circle`` 0.6 and
``cat`` 0.3 says the next byte is ``c`` with probability 0.9, then ``i`` after ``c`` with 2/3.

What. We compare next-piece distributions on the finer of the two tokenizations, by projecting the
coarser side's distribution through byte prefixes (a sparse, fixed projection between the
vocabularies, in the spirit of X-Token's, arXiv 2605.21699, and of byte-level marginalization of
token distributions, Phan et al. 2024, "exact byte-level probabilities from tokenized language
models"). Per row (an *event*: ``gold_ds.align.prefix_events`` builds them from aligned groups):

* the fine side's row gives p_F = softmax(z_F / T_F) over its vocabulary V_F;
* the coarse side's row gives p_C = softmax(z_C / T_C) over V_C, and the coarse side has already
  spelled ``skip`` bytes c of its actual token u* (c is empty at skip 0). With the projection tables
  (``gold_ds.align.prefix_projection``: key[skip, u] names the prefix b(u)[:skip], piece[skip, u] is
  the fine side's longest piece that begins the rest b(u)[skip:], whole[u] names b(u)), the tokens
  that agree with what was spelled are
  - M = {u : key[skip, u] = key[skip, u*]}, those that go on past c: each either says which fine piece
    comes next (piece[skip, u] >= 0) or says something the fine side has no piece for;
  - E = {u : whole[u] = key[skip, u*]}, those that are exactly c: they end here, and what follows
    them is on a row nobody computed;
  so, given c, the coarse side's next fine piece is v with probability
  q_C(v) = sum_{u in M, piece[skip, u] = v} p_C(u) / Z, and "something else" (a *stop* class) with
  q_C(stop) = (p_C(E) + p_C(M without a piece)) / Z, Z = p_C(M) + p_C(E);
* the fine side says v with p_F(v) on S = {piece[skip, u] : u in M} (what both sides can say
  there), and stop with p_F(stop) = 1 - p_F(S): a fine piece no coarse token reaches is something the
  coarse side cannot say at this position in its current token (under canonical tokenizations: the
  coarse token ended, as for E);
* both, distributions over S + {stop}, are compared by the generalized JSD of ``generalized_jsd``
  with ``beta`` (teacher a, student b: beta 0 is KL(teacher || student), beta 1 KL(student ||
  teacher)). At skip 0 (both sides at a token boundary) there is no stop class: p_F is renormalized on
  S, since a fine piece no coarse token reaches there (one longer than any coarse token) is not wrong,
  only said in other tokens on the coarse side. Inside a coarse token (skip > 0) the fine side's mass
  off S is priced: the coarse side has committed to the bytes it spelled, and every continuation it
  can say is in S (or in stop).

Why the stop class: without it a student whose tokens merge digits (``85``) could meet "the first
digit is 8" with its token ``8`` and "after 8 comes 5" with ``85`` renormalized among the tokens
that go on, while ``85`` itself stays improbable; with it, the mass on ``8`` alone is the
student's "the number ends after 8", which the teacher's row after ``8`` prices.

An event where both sides start a token of the same length is compared both ways (``side`` 2: the
mean of the two rows' losses): each direction sees only the other side's alternatives that are longer
than its own pieces (a student's ``10`` where the teacher says ``1``, then ``0``), so each catches
what the other renormalizes away.

Where one side gives a compared class no mass and the other some (possible only for the stop class:
the fine side's mass off S where the coarse side has no stopping token), KL is infinite; such a
probability is taken as fp32's smallest normal number (about 1e-38), so the row costs about 87 nats
times the other side's mass there, with no gradient through it.

Approximations, stated: a coarse token's rest is credited to the fine side's *longest* piece that
begins it, which is the fine tokenizer's first piece for greedy longest-match tokenizers and an
approximation for others (BPE may split a rest differently); the stop class lumps together what
each side cannot say in the other's terms.

Properties (tests/test_losses_prefix.py): with one tokenizer the projection is the identity, every
event has skip 0, S is the whole vocabulary, both stop masses are 0, and the loss is
``generalized_jsd`` exactly; it is 0 when the two sides' distributions over byte strings agree; its
gradient is that of the formula.

Rows: one per event; the caller sums them (``reduction``). The gradient comes from autograd on each
chunk (the projection is a scatter, whose closed form would repeat autograd's), stored by the
chunking base like the other losses'. Vocabulary shards: as ``uld``, each chunk moves to a
row-sharded layout (one all_to_all per input), the whole-row kernel runs there, and gradients come
back the same way.
"""

import math

import torch

from . import _base
from .uld import _check_pair, _row_layout

_NEG = -1e30  # a finite "minus infinity": rows without members stay NaN-free in forward and backward


def _projected(lc, key, piece, whole, skip, token, fine_vocab):
    """The coarse rows' log q [n, V_F + 1] (the last column: stop) and the classes compared [n, V_F + 1]
    bool (S, and stop at skip > 0), from their log-probabilities ``lc`` [n, V_C]."""
    k, p = key[skip], piece[skip]                                     # [n, V_C]
    want = key[skip, token]                                           # [n] the spelled prefix
    valid = (want >= 0)[:, None]
    goes_on = (k == want[:, None]) & valid
    said = goes_on & (p >= 0)
    agree = goes_on | ((whole[None, :] == want[:, None]) & valid)    # M and E
    top = lc.masked_fill(~agree, _NEG).amax(-1, keepdim=True)
    w = (lc - top).masked_fill(~agree, _NEG).exp()
    index = p.clamp(min=0)
    q = w.new_zeros(w.shape[0], fine_vocab + 1)
    q[:, :fine_vocab].scatter_add_(1, index, w * said)
    q[:, fine_vocab] = (w * ~said).sum(-1)
    support = torch.zeros_like(q[:, :fine_vocab]).scatter_add_(1, index, said.float()) > 0
    stops = (skip > 0)[:, None]
    tiny = torch.finfo(q.dtype).tiny
    log_q = q.clamp_min(tiny).log() - w.sum(-1, keepdim=True).clamp_min(tiny).log()
    return log_q.clamp_min(math.log(tiny)), torch.cat([support, stops], -1)


def _fine(lf, classes):
    """The fine rows' log p [n, V_F + 1] on ``classes``: with a stop class (skip > 0), their
    log-probabilities and log p(stop) = the log of their mass off S; without (skip 0) renormalized
    on S."""
    support, stops = classes[:, :-1], classes[:, -1:]
    off = lf.masked_fill(support, _NEG).logsumexp(-1, keepdim=True).clamp_min(math.log(torch.finfo(lf.dtype).tiny))
    on = lf.masked_fill(~support, _NEG).logsumexp(-1, keepdim=True)
    return torch.cat([torch.where(stops, lf, lf - on), off], -1)


def _divergence(la, lb, support, beta):
    """Generalized JSD per row between teacher a and student b (log values [n, V_F + 1], compared on
    the classes ``support``)."""
    la, lb = la.masked_fill(~support, 0.0), lb.masked_fill(~support, 0.0)
    a, b = la.exp() * support, lb.exp() * support
    if beta == 0.0:
        return (a * (la - lb)).sum(-1)
    if beta == 1.0:
        return (b * (lb - la)).sum(-1)
    lm = (a * beta + b * (1.0 - beta)).clamp_min(torch.finfo(a.dtype).tiny).log()
    return (a * (la - lm) * beta + b * (lb - lm) * (1.0 - beta)).sum(-1)


def _row_losses(s, t, side, skip, student_token, teacher_token, s_to_t, t_to_s, ts, tt, beta):
    """[n] losses of whole rows s [n, Vs], t [n, Vt] (fp32, differentiable); ``side``: 0 the
    teacher is fine, 1 the student, 2 the mean of both."""
    ls = torch.log_softmax(s / ts if ts != 1.0 else s, -1)
    lt = torch.log_softmax(t / tt if tt != 1.0 else t, -1)
    loss = s.new_zeros(s.shape[0])
    half = torch.where(side == 2, 0.5, 1.0)
    rows = (side >= 1).nonzero().squeeze(1)
    if rows.numel():  # compared over the student's vocabulary: the teacher is projected
        lq, support = _projected(lt[rows], *t_to_s, skip[rows], teacher_token[rows], s.shape[1])
        loss = loss.index_add(0, rows, half[rows] * _divergence(lq, _fine(ls[rows], support), support, beta))
    rows = (side != 1).nonzero().squeeze(1)
    if rows.numel():  # over the teacher's vocabulary: the student is projected
        lq, support = _projected(ls[rows], *s_to_t, skip[rows], student_token[rows], t.shape[1])
        loss = loss.index_add(0, rows, half[rows] * _divergence(_fine(lt[rows], support), lq, support, beta))
    return loss


def _check_tables(name, table, vocab, device):
    key, piece, whole = table
    for part, x, dims in (("key", key, 2), ("piece", piece, 2), ("whole", whole, 1)):
        if (not isinstance(x, torch.Tensor) or x.dim() != dims or x.shape[-1] != vocab or x.dtype != torch.long
                or x.shape[0] != key.shape[0] and dims == 2):
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else repr(x)
            want = f"[D, {vocab}]" if dims == 2 else f"[{vocab}]"
            raise ValueError(f"{name} {part} must be an int64 {want} tensor; got {got}")
    return key.to(device), piece.to(device), whole.to(device)


def byte_prefix_jsd(student_logits, teacher_logits, side, skip, student_token, teacher_token,
                    student_to_teacher, teacher_to_student, *, beta=0.5, student_temperature=1.0,
                    teacher_temperature=1.0, mask=None, reduction="mean", group=None, chunk_size=None):
    """Byte-prefix JSD per row (module docstring), reduced over the counted rows.

    ``student_logits`` [..., Vs], ``teacher_logits`` [..., Vt]: each row is one event's pair of rows.
    Per row ([...] tensors): ``side`` (the fine side: 0 the teacher, 1 the student, 2 both, the mean
    of the two comparisons, for rows at skip 0), ``skip`` (bytes of the coarse side's token already
    spelled), ``student_token`` and ``teacher_token`` (each side's actual token at its row; the
    coarse side's names the spelled prefix). ``student_to_teacher``: (key [D, Vs], piece [D, Vs],
    whole [Vs]) int64 projecting the student's vocabulary onto the teacher's pieces
    (``gold_ds.align.prefix_projection``); ``teacher_to_student`` the other way. Other arguments as
    in :func:`gold_ds.losses.uld` (``group``: vocabulary shards).
    """
    _check_pair(student_logits, teacher_logits, student_temperature, teacher_temperature, None, None, mask,
                reduction, chunk_size)
    _base.check_beta(beta)
    every = _base.vocab_sizes(group, student_logits.shape[:-1].numel(), student_logits.shape[-1],
                              teacher_logits.shape[-1])
    return byte_prefix_jsd_loss(student_logits, teacher_logits, side, skip, student_token, teacher_token,
                                student_to_teacher, teacher_to_student, beta=beta,
                                student_temperature=student_temperature, teacher_temperature=teacher_temperature,
                                mask=mask, reduction=reduction, group=group, chunk_size=chunk_size, every=every)


def byte_prefix_jsd_loss(student, teacher, side, skip, student_token, teacher_token, student_to_teacher,
                         teacher_to_student, *, beta, student_temperature, teacher_temperature, mask, reduction,
                         group, chunk_size, every, heads=(None, None), kernel_rows=None):
    """The chunked byte-prefix JSD of checked logits (or hidden states with ``heads``, see ``_base``);
    the per-row tensors and tables are checked here."""
    vs, vt = sum(e[1] for e in every), sum(e[2] for e in every)
    device = student.device
    s_to_t = _check_tables("student_to_teacher", student_to_teacher, vs, device)
    t_to_s = _check_tables("teacher_to_student", teacher_to_student, vt, device)
    rows = student.shape[:-1]
    data = []
    for name, x in (("side", side), ("skip", skip), ("student_token", student_token),
                    ("teacher_token", teacher_token)):
        if not isinstance(x, torch.Tensor) or x.shape != rows:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else repr(x)
            raise ValueError(f"{name} must be a tensor shaped like the rows {tuple(rows)}; got {got}")
        data.append(x.reshape(-1).to(device))
    data = [x.long() for x in data]
    if data[0].numel() and (int(data[0].min()) < 0 or int(data[0].max()) > 2):
        raise ValueError(f"side must be 0 (teacher), 1 (student) or 2 (both); got values in "
                         f"[{int(data[0].min())}, {int(data[0].max())}]")
    if data[1].numel() and (int(data[1].min()) < 0 or bool((data[1][data[0] == 2] != 0).any())):
        raise ValueError("skip must be >= 0, and 0 where side is 2 (both)")
    for name, x, vocab in (("student_token", data[2], vs), ("teacher_token", data[3], vt)):
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab):
            raise ValueError(f"{name} must lie in [0, {vocab}); got [{int(x.min())}, {int(x.max())}]")
    # a skip past a table's depth has no member (the coarse token is longer than the table knows)
    depth = torch.where(data[0] == 1, t_to_s[0].shape[0], s_to_t[0].shape[0])
    too_long = data[1] >= depth
    data[1] = torch.where(too_long, 0, data[1])
    ts, tt, beta = float(student_temperature), float(teacher_temperature), float(beta)

    def kernel(s, t, s_scale, t_scale, need, weight, data):
        fine, sk, s_tok, t_tok, cut = data
        with torch.enable_grad():
            s_in = s.detach().requires_grad_(need[0])
            t_in = t.detach().requires_grad_(need[1])
            loss = _row_losses(s_in, t_in, fine, sk, s_tok, t_tok, s_to_t, t_to_s, ts, tt, beta)
            loss = torch.where(cut, 0.0, loss)
            wanted = [x for x, n in ((s_in, need[0]), (t_in, need[1])) if n]
            grads = list(torch.autograd.grad(loss.sum() * weight, wanted)) if wanted else []
        g_s = grads.pop(0) if need[0] else None
        g_t = grads.pop(0) if need[1] else None
        return loss.detach(), g_s, g_t, None, None

    return _base.chunked_loss(_row_layout(kernel, group, every), student, teacher, None, None, mask, reduction,
                              _base.auto_chunk_size(chunk_size, max(vs, vt)), heads, kernel_rows,
                              row_data=[*data, too_long])
