"""The process group, and the few reductions the trainer needs. Every function is called by every rank."""
import os

import torch
import torch.distributed as dist


def init_distributed():
    """Join the process group set up by the launcher (deepspeed, torchrun or spawn env vars).
    nccl on GPUs, gloo on CPU (DeepSpeed picks it). Returns DeepSpeed's accelerator."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    deepspeed.init_distributed()
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


def global_max(values: list, device) -> list:
    """Element-wise maxima over all ranks."""
    return _all_reduce(values, device, dist.ReduceOp.MAX)
