"""The losses from hidden states and output heads (fused): no [rows, V] logits tensor outlives a chunk.

``linear_generalized_jsd``, ``linear_uld``, ``linear_hybrid_uld`` and ``linear_byte_prefix_jsd`` take each side's final hidden
states (after the model's final norm) and its head (``weight`` [V_local, H], optional ``bias``,
``logit_scale`` and ``softcap``: logits = softcap(logit_scale * (hidden @ weight.T + bias)), the
forms real checkpoints use: Cohere's ``logit_scale``, Gemma 2/3's ``final_logit_softcapping``). Per
chunk of rows they compute the logits, run the same kernel as the logits losses, and chain the
gradient back to the hidden states and the head at once, so memory is O(chunk_size x V_local) plus
the gradients themselves. ``linear_token_logprobs`` is log softmax(logits / T)[token] per row (for
cross-entropy and GOLD's merged log scales), recomputed chunk by chunk in backward.

Vocabulary sharding (``group``): every rank passes the same hidden rows and its contiguous slice of
the head (rows of ``weight``), in rank order. Every rank gets the same loss, its slice of the weight
(and bias) gradient, and, for the hidden states, *its slice's contribution* to their gradient: as
for a column-parallel linear layer, the caller sums it over the group (the backward of an
all_gather of the rows does exactly that, or an all_reduce where the rows were replicated).
Collectives run in forward only; backward is local.
"""

import torch
import torch.distributed as dist

from . import _base
from .jsd import jsd_loss
from .prefix import byte_prefix_jsd_loss
from .uld import _check_pair, hybrid_uld_loss, uld_loss

# Bytes of one fp32 [chunk_size, V_local] logits block when chunk_size is chosen automatically (the
# head's matmuls want many rows; one block per side lives at a time). The divergence kernels then
# run on sub-chunks of the logits losses' size (``_base.CHUNK_BYTES``), which stay in cache.
LINEAR_CHUNK_BYTES = 256 << 20


def _heads(student_hidden, student_weight, student_bias, student_logit_scale, student_softcap,
           teacher_hidden, teacher_weight, teacher_bias, teacher_logit_scale, teacher_softcap):
    heads = (_base.check_head("student", student_hidden, student_weight, student_bias, student_logit_scale,
                              student_softcap),
             _base.check_head("teacher", teacher_hidden, teacher_weight, teacher_bias, teacher_logit_scale,
                              teacher_softcap))
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"student_hidden and teacher_hidden must have the same rows (all dims but the last); got "
                         f"{tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}")
    return heads


def _chunk(chunk_size, local_vocab):
    """Rows per head chunk: ``chunk_size``, or LINEAR_CHUNK_BYTES per fp32 [rows, local_vocab] block
    (``local_vocab``: the largest slice of any rank, so that every rank picks the same)."""
    return chunk_size if chunk_size is not None else max(1, LINEAR_CHUNK_BYTES // (4 * local_vocab))


def _kernel_rows(head_rows, vocab):
    """Rows per kernel sub-chunk: the logits losses' default for the full ``vocab``, at most ``head_rows``."""
    return min(head_rows, _base.auto_chunk_size(None, vocab))


def linear_generalized_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, *, beta=0.5,
                           temperature=1.0, mask=None, reduction="sum", group=None, chunk_size=None,
                           student_bias=None, teacher_bias=None, student_logit_scale=1.0,
                           teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None):
    """:func:`gold_ds.losses.generalized_jsd` of the two heads' logits, from hidden states.

    student_hidden [..., Hs], teacher_hidden [..., Ht] (same rows); student_weight [V_local, Hs] and
    teacher_weight [V_local, Ht] cover the same vocabulary columns (this rank's slice under
    ``group``). Other arguments and the return value as in ``generalized_jsd``; see the module
    docstring for the heads' options and the gradients under ``group``.
    """
    heads = _heads(student_hidden, student_weight, student_bias, student_logit_scale, student_softcap,
                   teacher_hidden, teacher_weight, teacher_bias, teacher_logit_scale, teacher_softcap)
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"linear_generalized_jsd needs one vocabulary slice for both heads; got student_weight "
                         f"{tuple(student_weight.shape)} and teacher_weight {tuple(teacher_weight.shape)}")
    _base.check_beta(beta)
    _base.check_positive("temperature", temperature)
    _base.check_row_tensor("mask", mask, student_hidden.shape[:-1], floating=False)
    _base.check_common(reduction, chunk_size)
    every = _base.vocab_sizes(group, student_hidden.shape[:-1].numel(), student_weight.shape[0])
    rows = _chunk(chunk_size, max(e[1] for e in every))
    return jsd_loss(student_hidden, teacher_hidden, beta=beta, temperature=temperature, mask=mask,
                    reduction=reduction, group=group, chunk_size=rows, heads=heads,
                    kernel_rows=_kernel_rows(rows, sum(e[1] for e in every)))


def _pair(student_hidden, student_weight, teacher_hidden, teacher_weight, options):
    """Check a cross-vocabulary pair; returns (heads, every) and sets options' chunk sizes."""
    heads = _heads(student_hidden, student_weight, options.pop("student_bias"), options.pop("student_logit_scale"),
                   options.pop("student_softcap"), teacher_hidden, teacher_weight, options.pop("teacher_bias"),
                   options.pop("teacher_logit_scale"), options.pop("teacher_softcap"))
    rows = student_hidden.shape[:-1]
    _check_pair(student_hidden.new_empty(*rows, 1), teacher_hidden.new_empty(*rows, 1),
                options["student_temperature"], options["teacher_temperature"], options["student_log_scale"],
                options["teacher_log_scale"], options["mask"], options["reduction"], options["chunk_size"])
    every = _base.vocab_sizes(options["group"], rows.numel(), student_weight.shape[0], teacher_weight.shape[0])
    options["chunk_size"] = _chunk(options["chunk_size"], max(max(e[1], e[2]) for e in every))
    options["kernel_rows"] = _kernel_rows(options["chunk_size"], max(sum(e[1] for e in every),
                                                                     sum(e[2] for e in every)))
    return heads, every


def linear_uld(student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_temperature=1.0,
               teacher_temperature=1.0, student_log_scale=None, teacher_log_scale=None, mask=None,
               reduction="sum", group=None, chunk_size=None, student_bias=None, teacher_bias=None,
               student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None):
    """:func:`gold_ds.losses.uld` of the two heads' logits, from hidden states (each head has its
    own vocabulary). See the module docstring for the heads' options and ``group``."""
    options = dict(locals())
    for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight"):
        options.pop(k)
    heads, every = _pair(student_hidden, student_weight, teacher_hidden, teacher_weight, options)
    return uld_loss(student_hidden, teacher_hidden, **options, every=every, heads=heads)


def linear_hybrid_uld(student_hidden, student_weight, teacher_hidden, teacher_weight, student_ids, teacher_ids, *,
                      beta=0.5, matched_weight=None, unmatched_weight=None, student_temperature=1.0,
                      teacher_temperature=1.0, student_log_scale=None, teacher_log_scale=None, mask=None,
                      reduction="sum", group=None, chunk_size=None, student_bias=None, teacher_bias=None,
                      student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None,
                      teacher_softcap=None):
    """:func:`gold_ds.losses.hybrid_uld` of the two heads' logits, from hidden states (ids global,
    as there). See the module docstring for the heads' options and ``group``."""
    options = dict(locals())
    for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "student_ids", "teacher_ids",
              "beta", "matched_weight", "unmatched_weight"):
        options.pop(k)
    _base.check_beta(beta)
    _base.check_weight("matched_weight", matched_weight)
    _base.check_weight("unmatched_weight", unmatched_weight)
    heads, every = _pair(student_hidden, student_weight, teacher_hidden, teacher_weight, options)
    return hybrid_uld_loss(student_hidden, teacher_hidden, student_ids, teacher_ids, beta=beta,
                           matched_weight=matched_weight, unmatched_weight=unmatched_weight, **options,
                           every=every, heads=heads)


def linear_byte_prefix_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, side, skip,
                           student_token, teacher_token, student_to_teacher, teacher_to_student, *, beta=0.5,
                           student_temperature=1.0, teacher_temperature=1.0, mask=None, reduction="sum", group=None,
                           chunk_size=None, student_bias=None, teacher_bias=None, student_logit_scale=1.0,
                           teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None):
    """:func:`gold_ds.losses.byte_prefix_jsd` of the two heads' logits, from hidden states (the
    per-row tensors and tables as there). See the module docstring for the heads' options and ``group``."""
    options = dict(locals(), student_log_scale=None, teacher_log_scale=None)
    for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "side", "skip",
              "student_token", "teacher_token", "student_to_teacher", "teacher_to_student", "beta"):
        options.pop(k)
    _base.check_beta(beta)
    heads, every = _pair(student_hidden, student_weight, teacher_hidden, teacher_weight, options)
    for k in ("student_log_scale", "teacher_log_scale"):
        options.pop(k)
    return byte_prefix_jsd_loss(student_hidden, teacher_hidden, side, skip, student_token, teacher_token,
                                student_to_teacher, teacher_to_student, beta=beta, **options, every=every,
                                heads=heads)


class _TokenLogprobs(torch.autograd.Function):
    """forward(ctx, head, offset, tokens, temperature, group, chunk_size, hidden, weight, bias) -> [n] fp32."""

    @staticmethod
    def forward(ctx, head, offset, tokens, temperature, group, chunk_size, hidden, weight, bias):
        n, v_local = hidden.shape[0], weight.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        local = tokens - offset
        mine = (local >= 0) & (local < v_local)
        for a in range(0, n, chunk_size):
            b = min(a + chunk_size, n)
            z, _ = head.logits(hidden[a:b])
            if temperature != 1.0:
                z.div_(temperature)
            top = z.amax(1)
            picked = z.gather(1, local[a:b].clamp(0, v_local - 1)[:, None]).squeeze(1).where(mine[a:b], 0.0)
            if group is not None:
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            sums = torch.stack([z.sub_(top[:, None]).exp_().sum(1), picked])
            if group is not None:
                dist.all_reduce(sums, group=group)
            lse[a:b] = sums[0].log_().add_(top)
            out[a:b] = sums[1] - lse[a:b]
        ctx.head, ctx.temperature, ctx.chunk_size = head, temperature, chunk_size
        ctx.save_for_backward(hidden, local, mine, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, local, mine, lse = ctx.saved_tensors
        head, t = ctx.head, ctx.temperature
        need = ctx.needs_input_grad[6:9]
        grads = [torch.zeros_like(x) if n else None for x, n in zip((hidden, head.weight, head.bias), need)]
        v_local = head.weight.shape[0]
        for a in range(0, hidden.shape[0], ctx.chunk_size):
            b = min(a + ctx.chunk_size, hidden.shape[0])
            z, aux = head.logits(hidden[a:b])
            w = grad_out[a:b].float()[:, None]
            g = z.div_(t).sub_(lse[a:b, None]).exp_().mul_(-w)  # d/dz of w * log p[token]: w * (onehot - p) / T
            g.scatter_add_(1, local[a:b].clamp(0, v_local - 1)[:, None], w * mine[a:b, None])
            if t != 1.0:
                g.div_(t)
            gh = head.backward(g, hidden[a:b], aux, need, grads)
            if need[0]:
                grads[0][a:b] = gh.to(grads[0].dtype)
        return (None,) * 6 + tuple(grads)


def linear_token_logprobs(hidden, weight, tokens, *, bias=None, logit_scale=1.0, softcap=None, temperature=1.0,
                          group=None, chunk_size=None):
    """[n] fp32: log softmax(logits / temperature)[tokens] per row of hidden [n, H], logits from the
    head as in the module docstring; ``tokens`` [n] are global ids. Differentiable w.r.t. hidden,
    weight and bias (backward recomputes each chunk's logits; under ``group`` the hidden gradient
    is this slice's contribution, see the module docstring). Under ``group``, per chunk one MAX
    all_reduce of [n] and one SUM all_reduce of [2, n]."""
    head = _base.check_head("", hidden, weight, bias, logit_scale, softcap)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [n, H]; got shape {tuple(hidden.shape)}")
    _base.check_positive("temperature", temperature)
    if not isinstance(tokens, torch.Tensor) or tuple(tokens.shape) != (hidden.shape[0],) \
            or tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"tokens must be an int64 tensor of shape [{hidden.shape[0]}]; got {tokens!r}")
    _base.check_common("sum", chunk_size)
    every = _base.vocab_sizes(group, hidden.shape[0], weight.shape[0])
    rank = 0 if group is None else dist.get_rank(group)
    offset, vocab = sum(e[1] for e in every[:rank]), sum(e[1] for e in every)
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise ValueError(f"tokens must lie in [0, {vocab}) (the full vocabulary)")
    return _TokenLogprobs.apply(head, offset, tokens.long().to(hidden.device), float(temperature), group,
                                _chunk(chunk_size, max(e[1] for e in every)), hidden, weight, bias)
