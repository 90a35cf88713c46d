"""The fused losses of gold_ds.losses.linear (output head applied inside the loss) against plain fp64
autograd on materialized logits (tests/reference_losses.py), never against the library itself.

The reference builds logits = softcap(logit_scale * (hidden @ weight.T + bias)) in fp64 and applies
the logits-loss formulas; autograd gives the gradients w.r.t. hidden states, weights, biases and log
scales. "Relative" means |got - want| <= tol * max|want| over the compared tensor.

Tolerances: fp32 inputs 1e-5 for the loss and every gradient. bf16 inputs (the reference runs in
fp64 on the same bf16-representable values, so it is exact where the library's matmuls round to
bf16): loss 2e-2, gradients 5e-2 (the head's matmuls, and so the logits and the gradients chained
back through them, round to bf16). ULD's gradients (the sorted L1 is not differentiable at ties
across the two sides) are compared with the reference on bf16-rounded logits; see BF16_SORTED.
Observed worst errors over 20 seeds: fp32 1.5e-6; bf16 loss 4e-3, gradients 2.2e-2.

Sharded (gloo, 2 and 3 ranks, uneven vocabulary slices): every rank's loss equals the unsharded
reference, its weight/bias gradient is its slice of the reference's, and its hidden-state gradient,
summed over the group, is the reference's.

Inputs: student and teacher have different hidden widths; some weight rows are zero with equal
biases, so some logits are exactly tied in every row and every precision (the stable sort ranks them
by column index in both the library and the reference).
"""

import pytest
import torch
import torch.distributed as dist

import reference_losses as ref
from conftest import run_ranks
from gold_ds.losses import linear_generalized_jsd, linear_hybrid_uld, linear_token_logprobs, linear_uld

ROWS = (2, 5)  # 3-D hidden states [B, T, H]
HS, HT = 12, 20
VS, VT = 37, 53
# matched token pairs (global ids, valid for both vocabulary orders: all < min(VS, VT))
STUDENT_IDS = torch.tensor([0, 5, 36, 17, 9, 22, 4])
TEACHER_IDS = torch.tensor([30, 3, 0, 11, 9, 17, 36])
MASK = torch.tensor([[True, False, True, True, False], [True, True, False, True, True]])

# head variants per side: (bias, logit_scale, softcap)
HEADS = {
    "plain": dict(student=(False, 1.0, None), teacher=(False, 1.0, None)),
    "bias+scale": dict(student=(True, 1.3, None), teacher=(True, 0.7, None)),
    "bias+scale+softcap": dict(student=(True, 1.3, 3.0), teacher=(False, 2.0, 4.5)),
}
CHUNKS = [1, 3, 1000, None]  # one row, uneven chunks, one chunk larger than the rows, automatic


def close(got, want, tol, what=""):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def ref_logits(h, w, b, logit_scale, softcap, round_to=None):
    """The head in plain autograd ops (fp64 in the tests). ``round_to``: round hidden @ weight.T + bias
    to that dtype in forward (straight through in backward), as a head whose matmul runs in it does."""
    z = h @ w.T
    if b is not None:
        z = z + b
    if round_to is not None:
        z = z + (z.to(round_to).to(z.dtype) - z).detach()
    z = z * logit_scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def make_side(gen, rows, h, v, bias, dtype=torch.float32):
    """Hidden states [*rows, h], weight [v, h] (logits ~ N(0, 4)) with exactly tied columns 3..7
    (zero weight rows, equal biases), and a bias [v] or None."""
    hidden = torch.randn(*rows, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (2 / h ** 0.5)
    weight[3:8] = 0.0
    b = None
    if bias:
        b = torch.randn(v, generator=gen) * 0.5
        b[3:8] = 0.25
    return hidden.to(dtype), weight.to(dtype), None if b is None else b.to(dtype)


def make_inputs(seed, heads, vs, vt, rows=ROWS, log_scales=False, dtype=torch.float32):
    """A dict of named inputs: hs, ws, [bs], ht, wt, [bt], [cs, ct] (log scales [*rows])."""
    gen = torch.Generator().manual_seed(seed)
    x = {}
    for side, key, h, v in (("student", "s", HS, vs), ("teacher", "t", HT, vt)):
        hidden, weight, bias = make_side(gen, rows, h, v, heads[side][0], dtype)
        x["h" + key], x["w" + key] = hidden, weight
        if bias is not None:
            x["b" + key] = bias
    if log_scales:
        x["cs"] = (torch.randn(rows, generator=gen) * 0.3).to(dtype)
        x["ct"] = (torch.randn(rows, generator=gen) * 0.3).to(dtype)
    return x


def head_options(heads):
    out = {}
    for side in ("student", "teacher"):
        _, scale, cap = heads[side]
        out[f"{side}_logit_scale"], out[f"{side}_softcap"] = scale, cap
    return out


def call_library(loss, x, heads, kw, chunk_size, group=None):
    opts = dict(kw, **head_options(heads), student_bias=x.get("bs"), teacher_bias=x.get("bt"), group=group)
    if chunk_size != "omit":
        opts["chunk_size"] = chunk_size
    if loss == "jsd":
        return linear_generalized_jsd(x["hs"], x["ws"], x["ht"], x["wt"], **opts)
    opts.update(student_log_scale=x.get("cs"), teacher_log_scale=x.get("ct"))
    if loss == "uld":
        return linear_uld(x["hs"], x["ws"], x["ht"], x["wt"], **opts)
    return linear_hybrid_uld(x["hs"], x["ws"], x["ht"], x["wt"], STUDENT_IDS, TEACHER_IDS, **opts)


def call_reference(loss, x, heads, kw, round_to=None):
    """The fp64 reference; ``kw`` as for the library (reduction defaults to the library's "sum")."""
    kw = dict(kw)
    kw.setdefault("reduction", "sum")
    s = ref_logits(x["hs"], x["ws"], x.get("bs"), *heads["student"][1:], round_to=round_to)
    t = ref_logits(x["ht"], x["wt"], x.get("bt"), *heads["teacher"][1:], round_to=round_to)
    if loss == "jsd":
        return ref.generalized_jsd(s, t, **kw)
    scales = dict(student_log_scale=x.get("cs"), teacher_log_scale=x.get("ct"))
    if loss == "uld":
        return ref.uld(s, t, **scales, **kw)
    return ref.hybrid_uld(s, t, STUDENT_IDS, TEACHER_IDS, **scales, **kw)


def reference_and_grads(loss, x, heads, kw, round_to=None):
    exact = {k: v.detach().double().requires_grad_() for k, v in x.items()}
    want = call_reference(loss, exact, heads, kw, round_to)
    return want, dict(zip(exact, torch.autograd.grad(want, list(exact.values()))))


def check_parity(loss, x, heads, kw, chunk_size, loss_tol=1e-5, grad_tol=1e-5, grads_rounded_to=None):
    """Loss and the gradient w.r.t. every input of the library vs the fp64 reference (the gradients
    vs the reference with logits rounded to ``grads_rounded_to`` where that is given)."""
    mine = {k: v.clone().requires_grad_() for k, v in x.items()}
    got = call_library(loss, mine, heads, kw, chunk_size)
    got_grads = dict(zip(mine, torch.autograd.grad(got, list(mine.values()))))
    want, want_grads = reference_and_grads(loss, x, heads, kw)
    if grads_rounded_to is not None:
        _, want_grads = reference_and_grads(loss, x, heads, kw, grads_rounded_to)
    assert got.dtype == torch.float32 and got.dim() == 0
    close(got, want, loss_tol, "loss")
    for k, g in got_grads.items():
        assert g.dtype == x[k].dtype, f"gradient of {k}: dtype {g.dtype}, input {x[k].dtype}"
        close(g, want_grads[k], grad_tol, f"gradient of {k}")


# ---------------------------------------------------------------- single process, fp32


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_linear_jsd_matches_reference(beta, reduction, heads, chunk_size):
    x = make_inputs(1, HEADS[heads], VS, VS)
    kw = dict(beta=beta, temperature=1.7, mask=MASK, reduction=reduction)
    check_parity("jsd", x, HEADS[heads], kw, chunk_size)


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("vocab", [(VS, VT), (VT, VS)])
def test_linear_uld_matches_reference(vocab, reduction, heads, chunk_size):
    x = make_inputs(2, HEADS[heads], *vocab, log_scales=True)
    kw = dict(student_temperature=0.8, teacher_temperature=1.3, mask=MASK, reduction=reduction)
    check_parity("uld", x, HEADS[heads], kw, chunk_size)


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("vocab", [(VS, VT), (VT, VS)])
@pytest.mark.parametrize("beta, weights, reduction", [(0.0, (None, None), "sum"), (0.5, (0.7, 0.2), "mean"),
                                                      (1.0, (None, None), "mean"), (0.3, (0.4, 1.1), "sum")])
def test_linear_hybrid_uld_matches_reference(beta, weights, reduction, vocab, heads, chunk_size):
    x = make_inputs(3, HEADS[heads], *vocab, log_scales=True)
    kw = dict(beta=beta, matched_weight=weights[0], unmatched_weight=weights[1], student_temperature=0.8,
              teacher_temperature=1.3, mask=MASK, reduction=reduction)
    check_parity("hybrid", x, HEADS[heads], kw, chunk_size)


@pytest.mark.parametrize("loss", ["jsd", "uld", "hybrid"])
def test_defaults_no_mask_and_2d_hidden(loss):
    """Default reduction ("sum") and chunk size, no mask, no log scales, hidden [n, H] and [H]."""
    heads = HEADS["bias+scale+softcap"]
    vt = VS if loss == "jsd" else VT
    for rows in ((7,), ()):
        check_parity(loss, make_inputs(4, heads, VS, vt, rows=rows), heads, {}, "omit")


@pytest.mark.parametrize("loss", ["jsd", "uld", "hybrid"])
def test_student_only_gradient_and_grad_output(loss):
    """The distillation case (teacher hidden and head frozen), with a non-unit upstream gradient."""
    heads = HEADS["bias+scale+softcap"]
    vt = VS if loss == "jsd" else VT
    x = make_inputs(5, heads, VS, vt, log_scales=loss != "jsd")
    kw = dict(mask=MASK, reduction="mean")
    student = {k: (v.clone().requires_grad_() if k in ("hs", "ws", "bs") else v) for k, v in x.items()}
    got = call_library(loss, student, heads, kw, 3)
    trainable = [student[k] for k in ("hs", "ws", "bs")]
    got_grads = torch.autograd.grad(2.5 * got, trainable)
    want, want_grads = reference_and_grads(loss, x, heads, kw)
    close(got, want, 1e-5, "loss")
    for k, g in zip(("hs", "ws", "bs"), got_grads):
        close(g, 2.5 * want_grads[k], 1e-5, f"gradient of {k}")


def ref_token_logprobs(h, w, b, tokens, logit_scale, softcap, temperature):
    z = ref_logits(h, w, b, logit_scale, softcap) / temperature
    return torch.log_softmax(z, -1).gather(-1, tokens[:, None]).squeeze(-1)


def check_token_logprobs(seed, bias, logit_scale, softcap, temperature, chunk_size, dtype=torch.float32, n=9,
                         value_tol=1e-5, grad_tol=1e-5):
    gen = torch.Generator().manual_seed(seed)
    h, w, b = make_side(gen, (n,), HS, VS, bias, dtype)
    tokens = torch.randint(0, VS, (n,), generator=gen)
    tokens[:2] = torch.tensor([0, VS - 1])  # the vocabulary's ends
    tokens[2] = 4  # a tied (zero-weight) column
    upstream = torch.randn(n, generator=gen)  # a per-row weight: not the all-ones gradient of a sum
    inputs = [h, w] + ([b] if bias else [])
    mine = [x.clone().requires_grad_() for x in inputs]
    kw = dict(logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    got = linear_token_logprobs(mine[0], mine[1], tokens, bias=mine[2] if bias else None, chunk_size=chunk_size,
                                **kw)
    got_grads = torch.autograd.grad(got, mine, grad_outputs=upstream)
    exact = [x.detach().double().requires_grad_() for x in inputs]
    want = ref_token_logprobs(exact[0], exact[1], exact[2] if bias else None, tokens, logit_scale, softcap,
                              temperature)
    want_grads = torch.autograd.grad(want, exact, grad_outputs=upstream.double())
    assert got.dtype == torch.float32 and got.shape == (n,)
    close(got, want, value_tol, "token logprobs")
    for name, x, g, wg in zip(("hidden", "weight", "bias"), inputs, got_grads, want_grads):
        assert g.dtype == x.dtype, f"gradient of {name}: dtype {g.dtype}, input {x.dtype}"
        close(g, wg, grad_tol, f"gradient of {name}")


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("bias, logit_scale, softcap, temperature",
                         [(False, 1.0, None, 1.0), (True, 1.0, None, 0.6), (True, 1.4, None, 1.0),
                          (True, 0.8, 2.5, 1.7), (False, 1.0, 4.0, 1.0)])
def test_linear_token_logprobs_matches_reference(bias, logit_scale, softcap, temperature, chunk_size):
    check_token_logprobs(6, bias, logit_scale, softcap, temperature, chunk_size)


# ---------------------------------------------------------------- bf16 inputs

BF16 = dict(loss_tol=2e-2, grad_tol=5e-2)
# The sorted L1 is not differentiable where a student and a teacher value of equal rank are equal:
# its gradient there jumps by 2 * value (the sign flips). bf16 logits (~2**-8 relative error) move a
# near tie across that edge often enough (seed 8 below: a row's teacher gradient is off by half its
# scale against the exact-logits reference), so ULD's gradients are compared with the reference on
# logits rounded to bf16 like the library's head (hidden @ weight.T + bias in bf16), still fp64
# after that; the loss, continuous, is still compared with the exact-logits reference.
BF16_SORTED = dict(BF16, grads_rounded_to=torch.bfloat16)


@pytest.mark.parametrize("chunk_size", [1, 4, None])
@pytest.mark.parametrize("heads", ["plain", "bias+scale+softcap"])
def test_bf16_inputs(heads, chunk_size):
    h = HEADS[heads]
    check_parity("jsd", make_inputs(7, h, VS, VS, dtype=torch.bfloat16), h,
                 dict(beta=0.3, temperature=1.5, mask=MASK), chunk_size, **BF16)
    check_parity("jsd", make_inputs(7, h, VS, VS, dtype=torch.bfloat16), h,
                 dict(beta=0.0, reduction="mean"), chunk_size, **BF16)
    # sorted L1: see BF16_SORTED
    check_parity("uld", make_inputs(8, h, VS, VT, log_scales=True, dtype=torch.bfloat16), h,
                 dict(teacher_temperature=1.3, mask=MASK), chunk_size, **BF16_SORTED)
    check_parity("hybrid", make_inputs(9, h, VT, VS, log_scales=True, dtype=torch.bfloat16), h,
                 dict(beta=0.5, reduction="mean"), chunk_size, **BF16_SORTED)


@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_bf16_token_logprobs(chunk_size):
    check_token_logprobs(10, True, 1.2, 3.0, 1.3, chunk_size, dtype=torch.bfloat16, value_tol=2e-2,
                         grad_tol=5e-2)
    check_token_logprobs(11, False, 1.0, None, 1.0, chunk_size, dtype=torch.bfloat16, value_tol=2e-2,
                         grad_tol=5e-2)


# ---------------------------------------------------------------- vocabulary-sharded (gloo)


def split_sizes(vocab, world):
    """Deliberately uneven contiguous slices: rank q gets a share proportional to q + 1."""
    weights = [q + 1 for q in range(world)]
    sizes = [vocab * w // sum(weights) for w in weights]
    sizes[-1] += vocab - sum(sizes)
    return sizes


def vocab_slice(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def sharded_cases():
    """(name, loss, head variant, kwargs, student vocab, teacher vocab, log scales, chunk size)."""
    yield "jsd beta=0.3", "jsd", "bias+scale+softcap", dict(beta=0.3, temperature=1.5, mask=MASK), VS, VS, False, 3
    yield "jsd beta=0 mean", "jsd", "plain", dict(beta=0.0, reduction="mean"), VS, VS, False, 1
    yield "jsd beta=1", "jsd", "bias+scale", dict(beta=1.0, mask=MASK), VS, VS, False, 1000
    yield "uld", "uld", "bias+scale+softcap", dict(student_temperature=0.8, teacher_temperature=1.3,
                                                   mask=MASK), VS, VT, True, 4
    yield "uld swapped mean", "uld", "bias+scale", dict(reduction="mean"), VT, VS, True, None
    for beta in (0.0, 0.5, 1.0):
        yield f"hybrid beta={beta}", "hybrid", "bias+scale+softcap", dict(beta=beta, teacher_temperature=1.3,
                                                                          mask=MASK), VS, VT, True, 3
    yield "hybrid weights swapped", "hybrid", "plain", dict(beta=0.3, matched_weight=0.6, unmatched_weight=0.3,
                                                            reduction="mean"), VT, VS, True, 1000


def sharded_check(what, rank, world, got, want, tol=1e-5):
    close(got, want, tol, f"rank {rank} of {world}, {what}")


def sharded_worker():
    """One rank; a failed check raises (run_ranks reports every rank's traceback)."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    for i, (name, loss, head, kw, vs, vt, log_scales, chunk_size) in enumerate(sharded_cases()):
        heads = HEADS[head]
        x = make_inputs(100 + i, heads, vs, vt, log_scales=log_scales)  # the same full tensors on every rank
        want, want_grads = reference_and_grads(loss, x, heads, kw)
        s_part, t_part = vocab_slice(split_sizes(vs, world), rank), vocab_slice(split_sizes(vt, world), rank)
        parts = dict(ws=s_part, bs=s_part, wt=t_part, bt=t_part)
        for student_only in (False, True):
            mine = {k: (v[parts[k]] if k in parts else v).clone() for k, v in x.items()}
            trainable = [k for k in mine if not student_only or k in ("hs", "ws", "bs")]
            for k in trainable:
                mine[k].requires_grad_()
            got = call_library(loss, mine, heads, kw, chunk_size, group=group)
            grads = dict(zip(trainable, torch.autograd.grad(got, [mine[k] for k in trainable])))
            tag = f"{name}{' (student only)' if student_only else ''}"
            sharded_check(f"{tag}: loss", rank, world, got, want)
            for k, g in grads.items():
                if k in ("hs", "ht"):  # this slice's contribution: sum over the group
                    g = g.clone()
                    dist.all_reduce(g, group=group)
                w = want_grads[k][parts[k]] if k in parts else want_grads[k]
                sharded_check(f"{tag}: gradient of {k}", rank, world, g, w)
    # token logprobs: values on every rank, weight/bias slices, hidden summed over the group
    for i, (bias, logit_scale, softcap, temperature, chunk_size) in enumerate(
            [(True, 1.3, 3.0, 1.6, 4), (False, 1.0, None, 1.0, 1), (True, 0.9, None, 0.7, None)]):
        gen = torch.Generator().manual_seed(200 + i)
        n = 9
        h, w, b = make_side(gen, (n,), HS, VT, bias)
        sizes = split_sizes(VT, world)
        tokens = torch.randint(0, VT, (n,), generator=gen)
        # a token at each shard's first and last column
        edges = [c for q in range(world) for c in (sum(sizes[:q]), sum(sizes[:q + 1]) - 1)]
        tokens[:len(edges)] = torch.tensor(edges)
        upstream = torch.randn(n, generator=gen)
        full = [h, w] + ([b] if bias else [])
        exact = [x.double().requires_grad_() for x in full]
        want = ref_token_logprobs(exact[0], exact[1], exact[2] if bias else None, tokens, logit_scale, softcap,
                                  temperature)
        want_grads = torch.autograd.grad(want, exact, grad_outputs=upstream.double())
        part = vocab_slice(sizes, rank)
        mine = [h.clone(), w[part].clone()] + ([b[part].clone()] if bias else [])
        mine = [x.requires_grad_() for x in mine]
        got = linear_token_logprobs(mine[0], mine[1], tokens, bias=mine[2] if bias else None,
                                    logit_scale=logit_scale, softcap=softcap, temperature=temperature,
                                    group=group, chunk_size=chunk_size)
        grads = list(torch.autograd.grad(got, mine, grad_outputs=upstream))
        dist.all_reduce(grads[0], group=group)
        tag = f"token logprobs case {i}"
        sharded_check(f"{tag}: values", rank, world, got, want)
        sharded_check(f"{tag}: gradient of hidden", rank, world, grads[0], want_grads[0])
        sharded_check(f"{tag}: gradient of weight", rank, world, grads[1], want_grads[1][part])
        if bias:
            sharded_check(f"{tag}: gradient of bias", rank, world, grads[2], want_grads[2][part])


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_matches_unsharded_reference(world, tmp_path):
    run_ranks(sharded_worker, world, err_dir=str(tmp_path))


# ---------------------------------------------------------------- argument errors


def _err_cases():
    gen = torch.Generator().manual_seed(0)
    hs, ws, _ = make_side(gen, ROWS, HS, VS, False)
    ht, wt, _ = make_side(gen, ROWS, HT, VT, False)
    wt_shared = torch.randn(VS, HT, generator=gen)
    ids = torch.tensor([1, 2])
    yield lambda: linear_generalized_jsd(hs, torch.randn(VS, HS + 1), ht, wt_shared), \
        r"student_weight must be a floating-point \[V_local, 12\].*\(37, 13\)"
    yield lambda: linear_uld(hs, ws, ht, torch.randn(VT, HS)), \
        r"teacher_weight must be a floating-point \[V_local, 20\].*\(53, 12\)"
    yield lambda: linear_uld(hs, ws.flatten(), ht, wt), r"student_weight must be a floating-point"
    yield lambda: linear_generalized_jsd(hs, ws, ht, wt_shared, student_bias=torch.zeros(VS + 1)), \
        r"student_bias must be None or a \[37\] tensor.*\(38,\)"
    yield lambda: linear_hybrid_uld(hs, ws, ht, wt, ids, ids, teacher_bias=torch.zeros(VS)), \
        r"teacher_bias must be None or a \[53\] tensor.*\(37,\)"
    yield lambda: linear_uld(hs, ws, ht, wt, student_softcap=0.0), r"student_softcap must be a finite number > 0"
    yield lambda: linear_hybrid_uld(hs, ws, ht, wt, ids, ids, teacher_softcap=-2.0), \
        r"teacher_softcap must be a finite number > 0; got -2.0"
    yield lambda: linear_generalized_jsd(hs, ws, ht, wt_shared, student_logit_scale=0), \
        r"student_logit_scale must be a finite number > 0; got 0"
    yield lambda: linear_uld(hs, ws, ht, wt, teacher_logit_scale=-1.0), \
        r"teacher_logit_scale must be a finite number > 0; got -1.0"
    yield lambda: linear_uld(hs, ws, ht, wt, teacher_logit_scale=float("inf")), r"teacher_logit_scale must be"
    yield lambda: linear_generalized_jsd(hs, ws, ht, wt), r"one vocabulary slice for both heads"
    yield lambda: linear_uld(hs, ws, ht[:, :4], wt), r"student_hidden and teacher_hidden must have the same rows"
    yield lambda: linear_generalized_jsd(hs, ws, ht, wt_shared, mask=torch.ones(5, 2)), r"mask must be"
    yield lambda: linear_uld(hs, ws, ht, wt, chunk_size=0), r"chunk_size must be None or an int >= 1; got 0"
    yield lambda: linear_hybrid_uld(hs, ws, ht, wt, torch.tensor([1, VS]), ids), \
        r"student_ids must lie in \[0, 37\)"
    # token logprobs (hidden [n, H], weight, bias, logit_scale, softcap). The library currently names
    # these "_weight", "_bias", "_logit_scale", "_softcap" (check_head with an empty side prefix);
    # the patterns match the argument's name with or without that stray underscore.
    h2 = hs.reshape(-1, HS)
    tok = torch.zeros(h2.shape[0], dtype=torch.long)
    yield lambda: linear_token_logprobs(h2, torch.randn(VS, HS + 2), tok), \
        r"weight must be a floating-point \[V_local, 12\].*\(37, 14\)"
    yield lambda: linear_token_logprobs(h2, ws, tok, bias=torch.zeros(3)), r"bias must be None or a \[37\] tensor"
    yield lambda: linear_token_logprobs(h2, ws, tok, softcap=0.0), r"softcap must be a finite number > 0; got 0.0"
    yield lambda: linear_token_logprobs(h2, ws, tok, logit_scale=-0.5), \
        r"logit_scale must be a finite number > 0; got -0.5"
    yield lambda: linear_token_logprobs(h2, ws, tok, temperature=0), r"temperature must be a finite number > 0"
    yield lambda: linear_token_logprobs(hs, ws, tok), r"hidden must be \[n, H\]"
    yield lambda: linear_token_logprobs(h2, ws, tok + VS), r"tokens must lie in \[0, 37\)"
    yield lambda: linear_token_logprobs(h2, ws, tok[:3]), r"tokens must be an int64 tensor of shape \[10\]"


@pytest.mark.parametrize("call, message", list(_err_cases()))
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
