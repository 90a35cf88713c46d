"""gold_ds.losses against the plain fp64 reference in tests/reference_losses.py (never against
itself), plus properties (hypothesis), chunking, dtype, and argument errors.

Tolerance: "relative" means |got - want| <= tol * max|want| over the compared tensor; 1e-6 for fp32
inputs. bf16 inputs are compared with the fp64 reference evaluated on the same (bf16-representable)
values: the loss still at 1e-6, gradients at 2**-7 (they are returned rounded to bf16). Property
tests compare fp32 with fp32 on random sizes, where a gradient can be exactly zero in exact
arithmetic (e.g. a one-column teacher), so there the scale is max(max|want|, 1) (their losses
and gradients are O(1)).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference_losses as ref
from gold_ds import losses
from gold_ds.losses import generalized_jsd, hybrid_uld, uld

ROWS = (3, 7)
VS, VT = 40, 57
STUDENT_IDS = torch.tensor([0, 3, 39, 7, 20, 11, 12])
TEACHER_IDS = torch.tensor([56, 1, 2, 9, 33, 12, 11])


def close(got, want, tol=1e-6, what="", floor=1e-30):
    """|got - want| <= tol * max(max|want|, floor) elementwise."""
    assert got.shape == want.shape
    err = ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(floor)).item()
    assert err <= tol, f"{what} relative error {err:.2e} > {tol:.0e}"


def make_inputs(seed, vs=VS, vt=VT):
    """Student and teacher logits with ties (equal logits in some rows, one row entirely flat),
    and two log scales."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(*ROWS, vs, generator=gen) * 2
    t = torch.randn(*ROWS, vt, generator=gen) * 2
    s[0, 0, 5:15] = 0.5
    t[0, 0, 3:9] = 0.5
    s[1, 2, :] = 1.0
    t[2, 4, 10:30] = -1.0
    return s, t, torch.randn(ROWS, generator=gen) * 0.3, torch.randn(ROWS, generator=gen) * 0.3


def check_parity(lib_fn, ref_fn, inputs, grad_tol=1e-6):
    """Loss and gradients of lib_fn(inputs) vs ref_fn(inputs as fp64)."""
    mine = [x.clone().requires_grad_() for x in inputs]
    got = lib_fn(*mine)
    got_grads = torch.autograd.grad(got, mine)
    exact = [x.detach().double().requires_grad_() for x in inputs]
    want = ref_fn(*exact)
    want_grads = torch.autograd.grad(want, exact)
    assert got.dtype == torch.float32
    close(got, want, 1e-6, "loss")
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert g.dtype == inputs[i].dtype and g.shape == inputs[i].shape
        close(g, w, grad_tol, f"gradient of input {i}")


MASK = torch.rand(ROWS, generator=torch.Generator().manual_seed(7)) > 0.3


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_jsd_matches_reference(beta, reduction):
    s, t, _, _ = make_inputs(1, VS, VS)
    kw = dict(temperature=1.7, mask=MASK, reduction=reduction)
    check_parity(lambda s, t: generalized_jsd(s, t, beta=beta, chunk_size=5, **kw),
                 lambda s, t: ref.generalized_jsd(s, t, beta, **kw), [s, t])


@pytest.mark.parametrize("vocab", [(VS, VT), (VT, VS)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_uld_matches_reference(vocab, reduction):
    s, t, cs, ct = make_inputs(2, *vocab)
    kw = dict(student_temperature=0.8, teacher_temperature=1.3, mask=MASK, reduction=reduction)
    check_parity(lambda s, t, cs, ct: uld(s, t, student_log_scale=cs, teacher_log_scale=ct, chunk_size=4, **kw),
                 lambda s, t, cs, ct: ref.uld(s, t, student_log_scale=cs, teacher_log_scale=ct, **kw),
                 [s, t, cs, ct])


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("weights", [(None, None), (0.7, 0.2)])
def test_hybrid_matches_reference(beta, weights):
    s, t, cs, ct = make_inputs(3)
    kw = dict(beta=beta, matched_weight=weights[0], unmatched_weight=weights[1], student_temperature=0.8,
              teacher_temperature=1.3, mask=MASK)
    check_parity(lambda s, t, cs, ct: hybrid_uld(s, t, STUDENT_IDS, TEACHER_IDS, student_log_scale=cs,
                                                 teacher_log_scale=ct, chunk_size=4, **kw),
                 lambda s, t, cs, ct: ref.hybrid_uld(s, t, STUDENT_IDS, TEACHER_IDS, student_log_scale=cs,
                                                     teacher_log_scale=ct, **kw),
                 [s, t, cs, ct])


@pytest.mark.parametrize("loss", ["generalized_jsd", "uld", "hybrid_uld"])
def test_student_only_gradient(loss):
    """The distillation case: the teacher's logits need no gradient (the kernels skip its work)."""
    s, t, _, _ = make_inputs(9)
    t = t[..., :VS] if loss == "generalized_jsd" else t
    args = (STUDENT_IDS, TEACHER_IDS) if loss == "hybrid_uld" else ()
    student = s.clone().requires_grad_()
    (got,) = torch.autograd.grad(getattr(losses, loss)(student, t, *args, mask=MASK, chunk_size=4), student)
    exact = s.double().requires_grad_()
    (want,) = torch.autograd.grad(getattr(ref, loss)(exact, t.double(), *args, mask=MASK), exact)
    close(got, want)


def test_bf16_inputs():
    s, t, cs, ct = (x.bfloat16() for x in make_inputs(4))
    loose = dict(grad_tol=2 ** -7)
    check_parity(lambda s, t: generalized_jsd(s, t[..., :VS], beta=0.3, temperature=1.5),
                 lambda s, t: ref.generalized_jsd(s, t[..., :VS], 0.3, 1.5), [s, t], **loose)
    check_parity(lambda s, t, cs: uld(s, t, student_log_scale=cs), lambda s, t, cs: ref.uld(s, t, 1, 1, cs),
                 [s, t, cs], **loose)
    check_parity(lambda s, t: hybrid_uld(s, t, STUDENT_IDS, TEACHER_IDS, beta=0.5),
                 lambda s, t: ref.hybrid_uld(s, t, STUDENT_IDS, TEACHER_IDS, 0.5), [s, t], **loose)


@pytest.mark.parametrize("shape", [(VS,), (2, 3, 4, VS)])
def test_any_leading_shape(shape):
    gen = torch.Generator().manual_seed(5)
    s, t = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    check_parity(lambda s, t: generalized_jsd(s, t, beta=0.5), lambda s, t: ref.generalized_jsd(s, t, 0.5), [s, t])
    check_parity(lambda s, t: uld(s, t), lambda s, t: ref.uld(s, t), [s, t])


def test_no_counted_rows_mean_is_zero_with_graph():
    s, t, _, _ = make_inputs(6)
    s.requires_grad_()
    none = torch.zeros(ROWS, dtype=torch.bool)
    for loss in (generalized_jsd(s, t[..., :VS], mask=none), uld(s, t, mask=none),
                 hybrid_uld(s, t, STUDENT_IDS, TEACHER_IDS, mask=none)):
        assert loss.item() == 0.0 and loss.requires_grad
        (grad,) = torch.autograd.grad(loss, s)
        assert not grad.any()


def test_no_grad_stores_no_gradient(monkeypatch):
    s, t, _, _ = make_inputs(8)
    s.requires_grad_()
    sizes = []  # numel of every torch.zeros buffer the loss allocates
    real_zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda size, **k: sizes.append(torch.Size(size).numel()) or real_zeros(size, **k))
    with torch.no_grad():
        loss = uld(s, t)
    assert not loss.requires_grad
    assert s.numel() not in sizes, "a gradient buffer was allocated under no_grad"
    close(loss, ref.uld(s.detach().double(), t.double()))


def test_backward_scales_by_grad_output_and_runs_once():
    s, t, _, _ = make_inputs(7)
    s.requires_grad_()
    (once,) = torch.autograd.grad(uld(s, t), s)
    loss = uld(s, t)
    (thrice,) = torch.autograd.grad(3 * loss, s, retain_graph=True)
    close(thrice, 3 * once)
    with pytest.raises(RuntimeError, match="only once"):
        torch.autograd.grad(loss, s)


# ---------------------------------------------------------------- properties (hypothesis)

sizes = st.integers(1, 24)
seeds = st.integers(0, 2 ** 31 - 1)
betas = st.sampled_from([0.0, 0.2, 0.5, 0.9, 1.0])
SETTINGS = settings(max_examples=25, deadline=None)


def random_case(seed, n, vs, vt):
    """Student [n, vs] and teacher [n, vt] logits, two log scales [n], and the generator."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, vs, generator=gen) * 3, torch.randn(n, vt, generator=gen) * 3,
            torch.randn(n, generator=gen) * 0.5, torch.randn(n, generator=gen) * 0.5, gen)


def shared_vocab_teacher(gen, s):
    return torch.randn(s.shape, generator=gen) * 3


def random_ids(gen, vs, vt):
    k = int(torch.randint(0, min(vs, vt) + 1, (), generator=gen))
    return torch.randperm(vs, generator=gen)[:k], torch.randperm(vt, generator=gen)[:k]


@SETTINGS
@given(seed=seeds, n=st.integers(1, 5), vs=sizes, vt=sizes)
def test_uld_invariant_to_vocabulary_permutation(seed, n, vs, vt):
    s, t, cs, ct, gen = random_case(seed, n, vs, vt)
    s.requires_grad_()
    base = uld(s, t, student_log_scale=cs, teacher_log_scale=ct)
    (grad,) = torch.autograd.grad(base, s)
    ps, pt = torch.randperm(vs, generator=gen), torch.randperm(vt, generator=gen)
    permuted = uld(s[:, ps], t[:, pt], student_log_scale=cs, teacher_log_scale=ct)
    (grad_permuted,) = torch.autograd.grad(permuted, s)
    close(permuted, base, floor=1.0)
    close(grad_permuted, grad, floor=1.0)  # both are gradients w.r.t. the same unpermuted s


@SETTINGS
@given(seed=seeds, n=st.integers(1, 5), v=sizes, beta=betas, temperature=st.floats(0.3, 3.0))
def test_identical_inputs_give_zero(seed, n, v, beta, temperature):
    s, _, cs, _, gen = random_case(seed, n, v, v)
    ids, _ = random_ids(gen, v, v)
    assert abs(generalized_jsd(s, s, beta=beta, temperature=temperature).item()) <= 1e-6
    same = dict(student_temperature=temperature, teacher_temperature=temperature, student_log_scale=cs,
                teacher_log_scale=cs)
    assert abs(uld(s, s, **same).item()) <= 1e-6
    assert abs(hybrid_uld(s, s, ids, ids, beta=beta, **same).item()) <= 1e-6


@SETTINGS
@given(seed=seeds, n=st.integers(1, 5), vs=sizes, vt=sizes, beta=betas)
def test_losses_are_non_negative(seed, n, vs, vt, beta):
    s, t, cs, ct, gen = random_case(seed, n, vs, vt)
    s_ids, t_ids = random_ids(gen, vs, vt)
    scales = dict(student_log_scale=cs, teacher_log_scale=ct)
    assert generalized_jsd(s, shared_vocab_teacher(gen, s), beta=beta).item() >= -1e-6
    assert uld(s, t, **scales).item() >= 0
    assert hybrid_uld(s, t, s_ids, t_ids, beta=beta, **scales).item() >= -1e-6


@SETTINGS
@given(seed=seeds, n=st.integers(1, 12), vs=sizes, vt=sizes, beta=betas, chunk=st.integers(1, 12),
       masked=st.booleans())
def test_chunked_equals_unchunked(seed, n, vs, vt, beta, chunk, masked):
    s, t, cs, ct, gen = random_case(seed, n, vs, vt)
    s_ids, t_ids = random_ids(gen, vs, vt)
    mask = torch.rand(n, generator=gen) > 0.5 if masked else None
    losses = [(lambda s, t, cs, ct, c: generalized_jsd(s, t, beta=beta, mask=mask, chunk_size=c),
               shared_vocab_teacher(gen, s)),
              (lambda s, t, cs, ct, c: uld(s, t, student_log_scale=cs, teacher_log_scale=ct, mask=mask,
                                           chunk_size=c), t),
              (lambda s, t, cs, ct, c: hybrid_uld(s, t, s_ids, t_ids, beta=beta, student_log_scale=cs,
                                                  teacher_log_scale=ct, mask=mask, chunk_size=c), t)]
    for fn, teacher in losses:
        results = []
        for c in (chunk, n):
            inputs = [x.clone().requires_grad_() for x in (s, teacher, cs, ct)]
            loss = fn(*inputs, c)
            results.append([loss, *torch.autograd.grad(loss, inputs, allow_unused=True)])
        for got, want in zip(*results):
            if want is None:
                assert got is None
            else:
                close(got, want, floor=1.0)


# ---------------------------------------------------------------- errors

def _err_cases():
    s, t = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    t9 = torch.randn(2, 3, 9)
    ids = torch.tensor([1, 2])
    yield lambda: generalized_jsd(s, t9), "student_logits and teacher_logits.*same shape.*\\(2, 3, 9\\)"
    yield lambda: uld(s, torch.randn(2, 4, 9)), "same rows.*\\(2, 4, 9\\)"
    yield lambda: uld(s, t9, reduction="avg"), "reduction must be one of \\('mean', 'sum'\\); got 'avg'"
    yield lambda: generalized_jsd(s, t, beta=1.5), "beta must be a number in \\[0, 1\\]; got 1.5"
    yield lambda: hybrid_uld(s, t9, ids, ids, beta=-0.1), "beta must be a number in \\[0, 1\\]; got -0.1"
    yield lambda: generalized_jsd(s, t, temperature=0), "temperature must be a finite number > 0; got 0"
    yield lambda: uld(s, t9, teacher_temperature=-1.0), "teacher_temperature must be .*> 0; got -1.0"
    yield lambda: uld(s, t9, student_log_scale=torch.zeros(2, 4)), "student_log_scale must be .*\\(2, 3\\).*\\(2, 4\\)"
    yield lambda: uld(s, t9, mask=torch.ones(3, 2)), "mask must be .*\\(2, 3\\).*\\(3, 2\\)"
    yield lambda: uld(s, t9, chunk_size=0), "chunk_size must be None or an int >= 1; got 0"
    yield lambda: uld(s.long(), t9), "student_logits must be a floating-point tensor.*torch.int64"
    yield lambda: hybrid_uld(s, t9, torch.tensor([1, 8]), ids), "student_ids must lie in \\[0, 8\\).*\\[8\\]"
    yield lambda: hybrid_uld(s, t9, ids, torch.tensor([-1, 3])), "teacher_ids must lie in \\[0, 9\\).*\\[-1\\]"
    yield lambda: hybrid_uld(s, t9, ids, torch.tensor([3])), "same length.*got 2 and 1"
    yield lambda: hybrid_uld(s, t9, torch.tensor([1, 1]), ids), "student_ids must not repeat"
    yield lambda: hybrid_uld(s, t9, ids.float(), ids), "student_ids must be a 1-D int64"
    yield lambda: hybrid_uld(s, t9, ids, ids, matched_weight=-1), "matched_weight must be .*>= 0; got -1"


@pytest.mark.parametrize("call, message", list(_err_cases()))
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
