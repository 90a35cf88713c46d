"""Merging a group's token distributions into one distribution over its first token's vocabulary.

A group (see ``groups.py``) is a run of tokens ``t_start .. t_{end-1}`` of one model that spells the
same bytes as a run of the other model's tokens. ``logits[i]`` is the row that *predicts*
``token_ids[i]`` (the caller has shifted: the model's output at position j-1 predicts token j; using
the row at the token itself is an off-by-one). The merged distribution of a group is

    q(v) = softmax(logits[start] / T)(v) * exp(log_scale),
    log_scale = sum_{i = start+1}^{end-1} log softmax(logits[i] / T)[token_ids[i]],

so at the span's actual first token, q equals the joint probability of the whole span by the chain
rule: p(t_start | ctx) * prod_i p(t_i | ctx, t_start .. t_{i-1}).

Why the *first* row carries the distribution: a group starts at a byte boundary that both
tokenizers share, so ``logits[start]`` is conditioned only on the text before the span, which both
models have seen (in their own tokens) and is the one row where the two models' predictions are
comparable. Later rows are conditioned on part of the span, spelled in this tokenizer's own pieces,
which the other model never saw as such; they only enter as the scalar probability of continuing the
span as it was actually spelled.

``merge_log_scales`` computes the log-probabilities of the needed rows only (those strictly inside a
group), chunked over rows (each chunk is at most ~``2**23`` fp32 elements), then segment sums by an
fp64 cumsum. Its backward writes ``w_i / T * (onehot(token_ids[i]) - softmax(logits[i] / T))`` on
those rows (w_i = the upstream gradient of the group holding row i) and zeros elsewhere, again
chunked, so nothing of size N x V is kept between forward and backward besides ``logits`` itself.
"""

import torch

__all__ = ["merge_log_scales"]

_CHUNK_ELEMENTS = 1 << 23


def _inside(n: int, start: torch.Tensor, end: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[n] sum of `weight` over the groups whose interior (start, end) holds each row."""
    diff = torch.zeros(n + 1, dtype=weight.dtype, device=weight.device)
    diff.index_add_(0, start + 1, weight)
    diff.index_add_(0, end, -weight)
    return torch.cumsum(diff, 0)[:n]


def _row_chunks(rows: torch.Tensor, vocab: int):
    return rows.split(max(1, _CHUNK_ELEMENTS // max(vocab, 1)))


def _scaled(logits, rows, temperature, buf):
    """fp32 ``logits[rows] / temperature`` written into (a prefix of) the reused buffer ``buf``
    (fresh multi-MiB allocations per chunk cost more than the math on CPU)."""
    z = buf[:rows.numel()]
    if logits.dtype == torch.float32:
        torch.index_select(logits, 0, rows, out=z)
    else:
        z.copy_(logits.index_select(0, rows))
    return z.div_(temperature) if temperature != 1.0 else z


def _buffer(rows, vocab, device):
    return torch.empty(min(rows.numel(), max(1, _CHUNK_ELEMENTS // max(vocab, 1))), vocab, dtype=torch.float32,
                       device=device)


class _MergeLogScales(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, token_ids, start, end, temperature):
        n, vocab = logits.shape
        rows = (_inside(n, start, end, torch.ones_like(start)) > 0).nonzero().squeeze(1)
        logp = torch.zeros(n, dtype=torch.float64, device=logits.device)
        lse = torch.empty(rows.numel(), dtype=torch.float32, device=logits.device)
        done, buf = 0, _buffer(rows, vocab, logits.device)
        for chunk in _row_chunks(rows, vocab):
            z = _scaled(logits, chunk, temperature, buf)
            picked = z.gather(1, token_ids[chunk].unsqueeze(1)).squeeze(1)
            top = z.amax(1, keepdim=True)  # log-sum-exp in place (torch.logsumexp is ~3x slower here)
            norm = z.sub_(top).exp_().sum(1).log_().add_(top.squeeze(1))
            lse[done:done + chunk.numel()] = norm
            logp[chunk] = (picked - norm).double()
            done += chunk.numel()
        run = torch.cat([logp.new_zeros(1), torch.cumsum(logp, 0)])
        out = (run[end] - run[start + 1]).float()   # sum over rows start+1 .. end-1
        ctx.save_for_backward(logits, token_ids, start, end, rows, lse)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, token_ids, start, end, rows, lse = ctx.saved_tensors
        t = ctx.temperature
        n, vocab = logits.shape
        weight = _inside(n, start, end, grad_out.detach().double()).float() / t
        grad = torch.zeros_like(logits)
        done, buf = 0, _buffer(rows, vocab, logits.device)
        for chunk in _row_chunks(rows, vocab):
            z = _scaled(logits, chunk, t, buf)
            w = weight[chunk].unsqueeze(1)
            g = torch.exp_(z.sub_(lse[done:done + chunk.numel()].unsqueeze(1))).mul_(-w)   # -w * softmax
            g.scatter_add_(1, token_ids[chunk].unsqueeze(1), w)
            grad.index_copy_(0, chunk, g.to(grad.dtype))
            done += chunk.numel()
        return grad, None, None, None, None


def merge_log_scales(logits: torch.Tensor, token_ids: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
    """[G] fp32 log-scales: for each group g, the sum over rows i in [start[g] + 1, end[g]) of
    log_softmax(logits[i] / temperature)[token_ids[i]] (0 for a single-token group).

    logits: [N, V] floating (CPU), row i predicting token_ids[i]; token_ids: [N] int64; start, end:
    [G] int64 with 0 <= start < end <= N. Differentiable w.r.t. logits. See the module docstring.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating [N, V] tensor, got "
                         f"{getattr(logits, 'shape', type(logits))} {getattr(logits, 'dtype', '')}")
    n, vocab = logits.shape
    token_ids = torch.as_tensor(token_ids, dtype=torch.long)
    start = torch.as_tensor(start, dtype=torch.long)
    end = torch.as_tensor(end, dtype=torch.long)
    if token_ids.shape != (n,):
        raise ValueError(f"token_ids must be [N] = [{n}], got {tuple(token_ids.shape)}")
    if start.dim() != 1 or start.shape != end.shape:
        raise ValueError(f"start and end must be 1-D of one length, got {tuple(start.shape)}, {tuple(end.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if n and (int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab):
        raise ValueError(f"token_ids must be in [0, {vocab}), got [{int(token_ids.min())}, {int(token_ids.max())}]")
    if start.numel() and (int(start.min()) < 0 or int(end.max()) > n or bool((end <= start).any())):
        raise ValueError(f"groups must satisfy 0 <= start < end <= N = {n}")
    device = logits.device
    return _MergeLogScales.apply(logits, token_ids.to(device), start.to(device), end.to(device),
                                 float(temperature))
