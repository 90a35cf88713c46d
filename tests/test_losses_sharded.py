"""Vocab-sharded losses on 2 and 3 gloo ranks (CPU) against the unsharded library result.

One set of spawned ranks per world size (conftest's ``run_ranks``) runs every case; each rank builds
the full tensors from a shared seed, computes the unsharded loss, then the sharded one on its own
(uneven) vocabulary slices, and checks the loss and its slice of every gradient at 1e-6 relative
(relative to the largest entry), with every input needing a gradient and with only the student's.
bf16 cases: the fp32 math may sum in another order across shards, so gradients, returned rounded to
bf16, may differ by one bf16 step: 2**-7 there.
"""

import random

import pytest
import torch
import torch.distributed as dist

from conftest import run_ranks
from gold_ds.losses import byte_prefix_jsd, generalized_jsd, hybrid_uld, uld
from test_losses_prefix import random_events, random_vocab, tables

ROWS = (3, 5)


def split_sizes(vocab, world):
    """Deliberately uneven contiguous slices: rank q gets a share proportional to q + 1."""
    weights = [q + 1 for q in range(world)]
    sizes = [vocab * w // sum(weights) for w in weights]
    sizes[-1] += vocab - sum(sizes)
    return sizes


def shard(x, sizes, rank):
    start = sum(sizes[:rank])
    return x[..., start:start + sizes[rank]]


def close(got, want, what, tol):
    scale = want.double().abs().max().clamp_min(1e-30)
    err = ((got.double() - want.double()).abs().max() / scale).item()
    assert err <= tol, f"rank {dist.get_rank()} of {dist.get_world_size()}, {what}: relative error {err:.2e}"


def cases(gen):
    """(name, loss fn, kwargs, student vocab, teacher vocab, input dtype)."""
    mask = torch.rand(ROWS, generator=gen) > 0.4
    one_row = torch.zeros(ROWS, dtype=torch.bool)
    one_row[1, 2] = True
    ids = dict(student_ids=torch.tensor([0, 5, 17, 30, 44, 2]), teacher_ids=torch.tensor([60, 1, 33, 8, 21, 47]))
    f32, bf16 = torch.float32, torch.bfloat16
    yield "jsd beta=0.3", generalized_jsd, dict(beta=0.3, temperature=1.5, mask=mask), 47, 47, f32
    yield "jsd beta=0 sum", generalized_jsd, dict(beta=0.0, reduction="sum", chunk_size=4), 47, 47, f32
    yield "jsd beta=1 one row", generalized_jsd, dict(beta=1.0, mask=one_row, chunk_size=2), 47, 47, f32
    yield "jsd bf16", generalized_jsd, dict(beta=0.5, chunk_size=4), 47, 47, bf16
    yield "uld", uld, dict(student_temperature=0.7, teacher_temperature=1.4, mask=mask, chunk_size=4), 47, 61, f32
    yield "uld one row", uld, dict(mask=one_row), 61, 47, f32
    yield "uld no rows", uld, dict(mask=torch.zeros(ROWS, dtype=torch.bool)), 47, 61, f32
    yield "uld bf16", uld, dict(chunk_size=4), 47, 61, bf16
    for beta in (0.0, 0.5, 1.0):
        yield f"hybrid beta={beta}", hybrid_uld, dict(ids, beta=beta, teacher_temperature=1.3, mask=mask,
                                                      chunk_size=4), 47, 61, f32
    rng = random.Random(7)
    (s_vocab, s_eos), (t_vocab, t_eos) = random_vocab(rng, "abcd", 45), random_vocab(rng, "abcd", 59)
    events = [x.view(ROWS) for x in random_events(rng, 15, s_vocab, t_vocab)]
    prefix = dict(zip(("side", "skip", "student_token", "teacher_token"), events))
    prefix.update(zip(("student_to_teacher", "teacher_to_student"), tables(s_vocab, s_eos, t_vocab, t_eos)))
    yield "byte_prefix beta=0.5", byte_prefix_jsd, dict(prefix, teacher_temperature=1.3, mask=mask,
                                                        chunk_size=4), 47, 61, f32
    yield "byte_prefix beta=0", byte_prefix_jsd, dict(prefix, beta=0.0), 47, 61, f32


def worker():
    """One rank (run_ranks has set the launcher's env: RANK, WORLD_SIZE, MASTER_*); a failed check raises."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(1234)
    for name, fn, kwargs, vs, vt, dtype in cases(gen):
        s = (torch.randn(*ROWS, vs, generator=gen) * 2).to(dtype)
        t = (torch.randn(*ROWS, vt, generator=gen) * 2).to(dtype)
        tol = 1e-6 if dtype == torch.float32 else 2 ** -7
        scales = {}
        if fn in (uld, hybrid_uld):
            scales = dict(student_log_scale=torch.randn(ROWS, generator=gen) * 0.3,
                          teacher_log_scale=torch.randn(ROWS, generator=gen) * 0.3)
        full = [x.clone().requires_grad_() for x in (s, t, *scales.values())]
        want = fn(full[0], full[1], **dict(zip(scales, full[2:])), **kwargs)
        want_grads = torch.autograd.grad(want, full)
        s_sizes, t_sizes = split_sizes(vs, world), split_sizes(vt, world)
        mine = [shard(s, s_sizes, rank), shard(t, t_sizes, rank), *scales.values()]
        mine = [x.clone().requires_grad_() for x in mine]
        got = fn(mine[0], mine[1], **dict(zip(scales, mine[2:])), **kwargs, group=dist.group.WORLD)
        got_grads = torch.autograd.grad(got, mine)
        close(got, want, f"{name}: loss", 1e-6)
        close(got_grads[0], shard(want_grads[0], s_sizes, rank), f"{name}: student grad", tol)
        close(got_grads[1], shard(want_grads[1], t_sizes, rank), f"{name}: teacher grad", tol)
        for key, g, w in zip(scales, got_grads[2:], want_grads[2:]):
            close(g, w, f"{name}: {key} grad", tol)
        # the distillation case: only the student needs a gradient (teacher work is skipped)
        student = mine[0].detach().requires_grad_()
        got = fn(student, mine[1].detach(), **scales, **kwargs, group=dist.group.WORLD)
        (got_grad,) = torch.autograd.grad(got, student)
        close(got_grad, shard(want_grads[0], s_sizes, rank), f"{name}: student-only grad", tol)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_matches_unsharded(world, tmp_path):
    run_ranks(worker, world, err_dir=str(tmp_path))
