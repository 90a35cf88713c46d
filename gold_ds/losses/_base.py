"""The chunking base shared by every loss: argument checks, row selection, the autograd Function.

A loss is a *kernel*: a function that takes one chunk of rows as fp32 tensors and returns the loss
of each row together with the gradient of ``weight * (sum of the rows' losses)`` with respect to
every input that needs one (``weight`` is the reduction's 1 or 1/count, folded into the gradient
passes the kernel makes anyway). The base owns everything else: flattening ``[..., V]`` to rows, picking the counted rows,
walking them ``chunk_size`` at a time, weighting for the reduction, and storing the input gradient
(in the input dtype) so that ``backward`` only scales it by ``grad_output``.
"""

import math

import torch
import torch.distributed as dist

# Bytes of one fp32 [chunk_size, V] block when chunk_size is chosen automatically. A kernel holds
# about a dozen such blocks (sort indices count double), so the working set is ~100-150 MiB per chunk.
CHUNK_BYTES = 8 << 20
REDUCTIONS = ("mean", "sum")


def check_logits(name, x):
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
        got = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else repr(x)
        raise ValueError(f"{name} must be a floating-point tensor shaped [..., V]; got {got}")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty vocabulary dimension; got shape {tuple(x.shape)}")


def check_rows(student, teacher):
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"student_logits and teacher_logits must have the same rows (all dims but the last); "
            f"got {tuple(student.shape)} and {tuple(teacher.shape)}")


def check_row_tensor(name, x, rows_shape, floating):
    if x is None:
        return
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(rows_shape):
        got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else repr(x)
        raise ValueError(f"{name} must be a tensor of shape {tuple(rows_shape)} (one value per row); got {got}")
    if floating and not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")


def check_positive(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")


def check_beta(beta):
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1]; got {beta!r}")


def check_weight(name, value):
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be None or a finite number >= 0; got {value!r}")


def check_common(reduction, chunk_size):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1; got {chunk_size!r}")


def vocab_sizes(group, rows, *local_sizes):
    """Return, per rank of ``group``, the tuple (rows, *local_sizes); one all_gather.

    Called by every rank of ``group``. Without a group it is just the local tuple, in a list.
    Raises ValueError (on every rank alike) if the ranks disagree on the number of rows.
    """
    mine = (rows, *local_sizes)
    if group is None:
        return [mine]
    every = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    if len({e[0] for e in every}) != 1:
        raise ValueError(f"every rank of group must pass the same rows; got row counts {[e[0] for e in every]}")
    return every


def auto_chunk_size(chunk_size, vocab):
    return chunk_size if chunk_size is not None else max(1, CHUNK_BYTES // (4 * vocab))


class LinearHead:
    """An output layer applied inside a loss: logits = softcap(logit_scale * (hidden @ weight.T + bias)),
    softcap(z) = c * tanh(z / c) when ``softcap`` is set. ``weight`` [V_local, H] is this rank's
    vocabulary slice (the whole head without a group), ``bias`` [V_local] or None.

    The matmuls run in the weight's dtype (as the model's own head would), the logits are fp32 from
    there on; the weight and bias gradients accumulate, chunk by chunk, in the weight's dtype.
    """

    def __init__(self, weight, bias, logit_scale, softcap):
        self.weight, self.bias = weight, bias
        self.logit_scale = float(logit_scale)
        self.softcap = None if softcap is None else float(softcap)

    def logits(self, h):
        """fp32 [n, V_local] logits of hidden rows ``h`` [n, H], and what ``backward`` needs."""
        z = torch.nn.functional.linear(h.to(self.weight.dtype), self.weight, self.bias).float()
        if self.logit_scale != 1.0:
            z.mul_(self.logit_scale)
        if self.softcap is None:
            return z, None
        t = z.div_(self.softcap).tanh_()
        return t * self.softcap, t

    def backward(self, g, h, aux, need, grads):
        """Chain the fp32 logits gradient ``g`` of rows ``h`` back through the head. ``need`` and
        ``grads``: for (hidden, weight, bias), whether wanted and where it goes (weight and bias
        gradients are accumulated into ``grads[1]``, ``grads[2]``). Returns the hidden gradient or None."""
        if aux is not None:
            g = g.mul_(aux.mul_(aux).neg_().add_(1.0))  # d softcap = 1 - tanh^2
        if self.logit_scale != 1.0:
            g = g.mul_(self.logit_scale)
        g = g.to(self.weight.dtype)
        if need[1]:
            grads[1].addmm_(g.t(), h.to(self.weight.dtype))
        if need[2]:
            grads[2].add_(g.sum(0))
        return g @ self.weight if need[0] else None


def check_head(side, hidden, weight, bias, logit_scale, softcap):
    """Validate one side's (hidden [..., H], weight [V_local, H], bias, logit_scale, softcap); ``side``
    prefixes the argument names ("student", "teacher", or "" for none)."""
    side = f"{side}_" if side else ""
    check_logits(f"{side}hidden", hidden)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point() \
            or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        got = f"shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else repr(weight)
        raise ValueError(f"{side}weight must be a floating-point [V_local, {hidden.shape[-1]}] tensor (this rank's "
                         f"vocabulary slice of the head, rows = tokens); got {got}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        got = f"shape {tuple(bias.shape)}" if isinstance(bias, torch.Tensor) else repr(bias)
        raise ValueError(f"{side}bias must be None or a [{weight.shape[0]}] tensor (one per weight row); got {got}")
    check_positive(f"{side}logit_scale", logit_scale)
    if softcap is not None:
        check_positive(f"{side}softcap", softcap)
    return LinearHead(weight, bias, logit_scale, softcap)


class _ChunkedLoss(torch.autograd.Function):
    """forward(ctx, run, *inputs) -> fp32 scalar; inputs are (student, teacher, student_log_scale,
    teacher_log_scale, student_weight, student_bias, teacher_weight, teacher_bias), None where absent.

    ``run`` is the closure built by :func:`chunked_loss`: given which inputs need a gradient, it
    returns (loss, [stored gradient or None per input]).
    """

    @staticmethod
    def forward(ctx, run, *inputs):
        loss, ctx.grads = run(ctx.needs_input_grad[1:])
        ctx.shapes = [None if x is None else x.shape for x in inputs]
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("backward through a gold_ds loss can run only once (its gradient is stored, "
                               "then handed over); recompute the loss to differentiate it again")
        scale = None if bool(grad_output == 1) else grad_output
        out = []
        for g, shape in zip(grads, ctx.shapes):
            if g is not None:
                if scale is not None:
                    g.mul_(scale.to(g.dtype))
                g = g.view(shape)
            out.append(g)
        return (None, *out)


def chunked_loss(kernel, student, teacher, student_log_scale, teacher_log_scale, mask, reduction, chunk_size,
                 heads=(None, None), kernel_rows=None, row_data=None):
    """Apply ``kernel`` to the counted rows, ``chunk_size`` rows at a time; return the reduced loss.

    kernel(s, t, s_scale, t_scale, need, weight) gets fp32 [n, Vs_local], [n, Vt_local] and fp32 [n]
    log scales (or None), ``need`` (4 bools) and the float ``weight``, and returns (row_loss [n],
    then per input the gradient of weight * row_loss.sum() w.r.t. it, fp32, or None where not
    needed). Every rank of a group must call with the
    same rows, mask and chunk_size, because kernels may run collectives once per chunk.

    ``heads``: per side a :class:`LinearHead` or None. With a head, that side's input is hidden
    states [..., H] and each chunk's logits are computed from it (and its gradient chained back
    through the head) inside the chunk, so no [rows, V] logits tensor outlives a chunk. Under a
    vocabulary group the hidden-state gradient is this rank's slice's contribution (the
    column-parallel convention: sum it over the group). ``kernel_rows``: the kernel then runs on
    sub-chunks of that many rows (the head's matmuls want many rows, the kernel's elementwise passes
    want blocks that stay in cache); the logits' gradient overwrites the logits. ``row_data``: a list
    of flat [rows] tensors (per-row integers a kernel needs, no gradient); the kernel then gets
    ``data=`` those tensors' entries for its rows.
    """
    inputs = (student, teacher, student_log_scale, teacher_log_scale)
    params = [t for h in heads for t in ((None, None) if h is None else (h.weight, h.bias))]
    flat = [None if x is None else x.reshape(-1, x.shape[-1]) for x in inputs[:2]]
    flat += [None if x is None else x.reshape(-1) for x in inputs[2:]]
    n_rows = flat[0].shape[0]
    if mask is None:
        counted, select = n_rows, lambda a, b: slice(a, b)
    else:
        index = (mask.reshape(-1) != 0).nonzero().squeeze(1).to(flat[0].device)
        counted, select = index.numel(), lambda a, b: index[a:b]
    weight = 1.0 if reduction == "sum" else 1.0 / max(counted, 1)
    grad_enabled = torch.is_grad_enabled()  # under no_grad, compute and store no gradient at all

    def run(need):
        every = flat + params
        need = [grad_enabled and bool(n) and x is not None for n, x in zip(need, every)]
        grads = [torch.zeros(x.shape, dtype=x.dtype, device=x.device) if n else None for x, n in zip(every, need)]
        side_need = [need[0:1] + need[4:6], need[1:2] + need[6:8]]  # per side: (input, weight, bias)
        side_grads = [grads[0:1] + grads[4:6], grads[1:2] + grads[6:8]]
        kernel_need = [any(side_need[0]), any(side_need[1]), need[2], need[3]]
        total = torch.zeros((), dtype=torch.float64, device=flat[0].device)
        for start in range(0, counted, chunk_size):
            rows = select(start, min(start + chunk_size, counted))
            chunk = [None if x is None else x[rows] for x in flat]
            z = [chunk[i].float() if heads[i] is None else heads[i].logits(chunk[i]) for i in (0, 1)]
            logits = [zi if heads[i] is None else zi[0] for i, zi in enumerate(z)]
            scales = [None if x is None else x.float() for x in chunk[2:]]
            n = logits[0].shape[0]
            step = min(kernel_rows or n, n)
            chunk_grads = [None] * 4
            for a in range(0, n, step):  # the kernel on sub-chunks: its dozen passes stay in cache
                b = min(a + step, n)
                extra = {} if row_data is None else {"data": [x[rows][a:b] for x in row_data]}
                row_loss, *g = kernel(*(x[a:b] for x in logits), *(None if x is None else x[a:b] for x in scales),
                                      kernel_need, weight, **extra)
                total += row_loss.sum(dtype=torch.float64)
                if step == n:
                    chunk_grads = g
                    break
                for i, gi in enumerate(g):
                    if gi is not None:
                        if chunk_grads[i] is None:  # a head's logits are not needed after the kernel: reuse them
                            chunk_grads[i] = logits[i] if i < 2 and heads[i] is not None else gi.new_empty(n)
                        chunk_grads[i][a:b] = gi
            for i in (0, 1):
                g = chunk_grads[i]
                if heads[i] is not None and g is not None:
                    g = heads[i].backward(g, chunk[i], z[i][1], side_need[i], side_grads[i])
                if need[i] and g is not None:
                    grads[i][rows] = g.to(grads[i].dtype)
            for i in (2, 3):
                if need[i]:
                    grads[i][rows] = chunk_grads[i].to(grads[i].dtype)
        return (total * weight).float(), grads

    return _ChunkedLoss.apply(run, *inputs, *params)
