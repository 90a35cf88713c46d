"""Checkpoints that resume exactly, and the Hugging Face export.

Layout under ``<output_dir>/checkpoints``: one directory per checkpoint, ``step-<N>``, holding
DeepSpeed's ZeRO-3 files (model, optimizer and scheduler partitions of every rank), ``trainer.pt``
(the trainer's own state, from rank 0) and ``rng-rank<R>.pt`` (each rank's RNG states), plus a
``latest`` file naming the newest complete checkpoint.

Atomicity: a checkpoint is written as ``step-<N>.tmp`` and renamed once every rank has finished;
``latest`` is replaced atomically after that. A crash mid-write leaves only a ``.tmp`` directory,
which is never resumed from and is removed by the next save. Assumes the checkpoint directory is
on a filesystem every rank sees (the usual shared filesystem of a cluster).

All functions are called by every rank.
"""
import os
import random
import shutil

import torch
import torch.distributed as dist

LATEST = "latest"


def _rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(engine, root: str, step: int, trainer_state: dict, keep_last: int) -> str:
    rank = dist.get_rank()
    tag = f"step-{step}"
    tmp_tag = tag + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(os.path.join(root, tmp_tag), ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(root, tag=tmp_tag, save_latest=False)
    torch.save(_rng_state(), os.path.join(root, tmp_tag, f"rng-rank{rank}.pt"))
    if rank == 0:
        torch.save(trainer_state, os.path.join(root, tmp_tag, "trainer.pt"))
    dist.barrier()
    if rank == 0:
        final = os.path.join(root, tag)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(os.path.join(root, tmp_tag), final)
        with open(os.path.join(root, LATEST + ".tmp"), "w") as f:
            f.write(tag)
        os.replace(os.path.join(root, LATEST + ".tmp"), os.path.join(root, LATEST))
        _prune(root, keep_last)
    dist.barrier()
    return os.path.join(root, tag)


def _prune(root: str, keep_last: int) -> None:
    done = sorted((int(d.split("-")[1]), d) for d in os.listdir(root)
                  if d.startswith("step-") and not d.endswith(".tmp"))
    for _, d in done[:-keep_last]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    for d in os.listdir(root):
        if d.endswith(".tmp") and os.path.isdir(os.path.join(root, d)):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def latest_checkpoint(root: str):
    """The newest complete checkpoint's tag, or None."""
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return tag if os.path.isdir(os.path.join(root, tag)) else None


def load_checkpoint(engine, root: str, tag: str) -> dict:
    """Restore engine, optimizer, scheduler and this rank's RNGs; return the trainer state."""
    load_path, _ = engine.load_checkpoint(root, tag=tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(root, tag)}")
    rng = os.path.join(root, tag, f"rng-rank{dist.get_rank()}.pt")
    if not os.path.isfile(rng):
        raise RuntimeError(f"checkpoint {os.path.join(root, tag)} has no RNG state for rank {dist.get_rank()}: "
                           "it was written with a different number of ranks; resume with the same world size")
    _set_rng_state(torch.load(rng, weights_only=False))
    return trainer_state(root, tag)


def trainer_state(root: str, tag: str) -> dict:
    """The trainer's state saved with checkpoint ``tag`` (read alone, before any engine exists)."""
    return torch.load(os.path.join(root, tag, "trainer.pt"), weights_only=False)


def export_hf(engine, tokenizer, out_dir: str) -> None:
    """Write a Hugging Face model directory (consolidated weights + config + tokenizer).

    ``save_pretrained`` on a ZeRO-3 module alone writes empty tensors; the weights are gathered
    first (a collective: every rank calls this), and rank 0 writes them.
    """
    state = engine._zero3_consolidated_16bit_state_dict()
    if dist.get_rank() == 0:
        write_directory(out_dir, lambda tmp: (engine.module.save_pretrained(tmp, state_dict=state, safe_serialization=True),
                                              tokenizer.save_pretrained(tmp)))
    dist.barrier()


def write_directory(out_dir: str, save) -> None:
    """``save(tmp)`` into a fresh sibling directory, then renamed to ``out_dir``: an export is never
    seen half written."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
