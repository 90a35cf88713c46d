"""The process group, and the few reductions the trainer needs. Every function is called by every rank."""
import os

import torch
import torch.distributed as dist


def init_distributed(timeout_s: int = 300):
    """Join the process group set up by the launcher (deepspeed, torchrun or spawn env vars).
    nccl on GPUs, gloo on CPU (DeepSpeed picks it); a collective fails after ``timeout_s``.
    Returns DeepSpeed's accelerator."""
    import datetime
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s))
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return acc


def _all_reduce(values: list, device, op) -> list:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def global_sum(values: list, device) -> list:
    """Element-wise sums over all ranks (``device``: where the backend's tensors live)."""
    return _all_reduce(values, device, dist.ReduceOp.SUM)


def global_sums_and_maxima(sums: list, maxima: list, device) -> tuple:
    """(element-wise sums of ``sums``, element-wise maxima of ``maxima``) over all ranks, from one
    all_gather (fp64; summed in rank order)."""
    mine = torch.tensor(list(sums) + list(maxima), dtype=torch.float64, device=device)
    every = torch.empty(dist.get_world_size() * mine.numel(), dtype=torch.float64, device=device)
    dist.all_gather_into_tensor(every, mine)  # gloo wants a flat output
    every = every.cpu().view(dist.get_world_size(), mine.numel())
    return every[:, :len(sums)].sum(0).tolist(), every[:, len(sums):].amax(0).tolist()


class RowGather:
    """Concatenate every rank's rows of a micro-step, in rank order (ranks may hold different numbers
    of rows, zero included): one all_gather of the row counts at construction, one per tensor after.

    ``gather`` is differentiable for the fused losses' convention (every rank computes on all rows,
    its hidden-state gradient is its vocabulary slice's contribution): backward sums the gathered
    rows' gradient over ranks (one all_reduce of it) and keeps this rank's rows.
    """

    def __init__(self, rows: int, device):
        counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
        dist.all_gather(counts, torch.tensor([rows], dtype=torch.long, device=device))
        self.counts = [int(c) for c in counts]
        rank = dist.get_rank()
        self.offset = sum(self.counts[:rank])  # where this rank's rows start in the gathered rows
        self.rows = slice(self.offset, self.offset + rows)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return _GatherRows.apply(x, self)


def _gather(x, counts):
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[:x.shape[0]] = x
    every = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(every, padded)
    return torch.cat([e[:n] for e, n in zip(every, counts)])


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gather):
        ctx.gather = gather
        return _gather(x.contiguous(), gather.counts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.gather.rows], None
