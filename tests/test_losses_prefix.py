"""gold_ds.losses.byte_prefix_jsd against the plain fp64 reference (tests/reference_losses.py, which
works from the vocabularies' bytes, not from the projection tables), hand-worked examples, and its
properties: the token-level JSD with one tokenizer, zero when the byte-level distributions agree.
Tolerance: relative to the largest entry, 1e-6 on losses and 1e-5 on gradients (fp32 kernels with
a scatter, against fp64)."""

import math
import random

import pytest
import torch

import reference_losses as ref
from gold_ds.losses import byte_prefix_jsd, generalized_jsd, linear_byte_prefix_jsd

NEVER = -1e4  # a logit whose probability is 0 in fp32 and fp64


def close(got, want, tol, what=""):
    err = ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-12)).item()
    assert err <= tol, f"{what} relative error {err:.2e} > {tol:.0e}"


def random_vocab(rng, alphabet, size, drop=()):
    """``size`` distinct byte strings over ``alphabet`` (every single letter but ``drop`` among them),
    then a pad (special, no bytes) and an end-of-turn token (special): (vocab, eos id)."""
    vocab = [c.encode() for c in alphabet if c not in drop]
    while len(vocab) < size:
        w = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 4))).encode()
        if w not in vocab:
            vocab.append(w)
    rng.shuffle(vocab)
    return vocab + [b"", b""], size + 1


def random_events(rng, n, s_vocab, t_vocab):
    """Per row: which side is fine (0 teacher, 1 student, 2 both at skip 0), the coarse token and a
    skip inside it (sometimes past it: no members, loss 0), and any token on the fine side."""
    side, skip, s_tok, t_tok = [], [], [], []
    for _ in range(n):
        code = rng.choice((0, 1, 1, 0, 2))
        f = code == 1
        coarse = t_vocab if f else s_vocab
        c = rng.randrange(len(coarse) - 2)
        d = 0 if code == 2 else rng.randrange(len(coarse[c]) + (1 if rng.random() < 0.1 else 0))
        o = rng.randrange(len(s_vocab if f else t_vocab) - 2)
        side.append(code)
        skip.append(d)
        s_tok.append(o if f else c)
        t_tok.append(c if f else o)
    return (torch.tensor(side), torch.tensor(skip), torch.tensor(s_tok), torch.tensor(t_tok))


def tables(s_vocab, s_eos, t_vocab, t_eos):
    return ref.prefix_tables(s_vocab, t_vocab, s_eos, t_eos), ref.prefix_tables(t_vocab, s_vocab, t_eos, s_eos)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_fp64_reference(beta, seed):
    rng = random.Random(seed)
    s_vocab, s_eos = random_vocab(rng, "abcd", 30)
    t_vocab, t_eos = random_vocab(rng, "abcd", 41, drop="d" if seed else "")  # seed 1: unreachable pieces
    events = random_events(rng, 24, s_vocab, t_vocab)
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(4, 6, len(s_vocab), generator=gen) * 2).requires_grad_()
    t = (torch.randn(4, 6, len(t_vocab), generator=gen) * 2).requires_grad_()
    mask = torch.rand(4, 6, generator=gen) > 0.2
    shaped = [x.view(4, 6) for x in events]
    kw = dict(beta=beta, student_temperature=0.8, teacher_temperature=1.3, mask=mask)
    got = byte_prefix_jsd(s, t, *shaped, *tables(s_vocab, s_eos, t_vocab, t_eos), chunk_size=5, **kw)
    g_s, g_t = torch.autograd.grad(got, (s, t))
    s64, t64 = (x.detach().double().requires_grad_() for x in (s, t))
    want = ref.byte_prefix_jsd(s64, t64, *shaped, s_vocab, t_vocab, s_eos, t_eos, **kw)
    w_s, w_t = torch.autograd.grad(want, (s64, t64))
    assert want > 0
    close(got, want, 1e-6, "loss")
    close(g_s, w_s, 1e-5, "student gradient")
    close(g_t, w_t, 1e-5, "teacher gradient")


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_one_tokenizer_is_the_token_level_jsd(beta):
    """Same vocabulary on both sides, every row at skip 0 (groups of one token): the projection is the
    identity and the loss equals the generalized JSD over the whole vocabulary, whichever side is fine
    (0, 1, or both: 2, what the events give one tokenizer)."""
    rng = random.Random(3)
    vocab, eos = random_vocab(rng, "abc", 25)
    vocab[-2] = b"<pad>"  # a regular token here, so that every id has bytes and the support is the vocabulary
    n, v = 9, len(vocab)
    gen = torch.Generator().manual_seed(3)
    s = (torch.randn(n, v, generator=gen) * 2).requires_grad_()
    t = torch.randn(n, v, generator=gen) * 2
    fine = torch.arange(n) % 3
    tokens = torch.randint(0, v, (n,), generator=gen)
    proj = ref.prefix_tables(vocab, vocab, eos, eos)
    got = byte_prefix_jsd(s, t, fine, torch.zeros(n, dtype=torch.long), tokens, tokens, proj, proj, beta=beta,
                          reduction="sum")
    (g,) = torch.autograd.grad(got, s)
    s64 = s.detach().double().requires_grad_()
    want = ref.jsd_rows(torch.softmax(s64, -1), torch.softmax(t.double(), -1), beta, False).sum()
    (w,) = torch.autograd.grad(want, s64)
    close(got, want, 1e-6, "loss")
    close(g, w, 1e-5, "gradient")
    s2 = s.detach().requires_grad_()
    lib = generalized_jsd(s2, t, beta=beta, reduction="sum")
    close(got.detach(), lib.detach(), 1e-6, "against generalized_jsd")


# The word-vs-letters case: the teacher says "circle" in one token, the student spells it.
LETTERS = [b"c", b"i", b"r", b"l", b"e", b"a", b"t", b"d", b"o", b"g", b""]   # eos last
WORDS = [b"circle", b"cat", b"dog", b"c", b"ci", b""]                          # eos last
TEACHER_ROW = {b"circle": 0.6, b"cat": 0.3, b"dog": 0.1}


def _logits(probs: dict, vocab: list) -> torch.Tensor:
    return torch.tensor([math.log(probs[p]) if p in probs else NEVER for p in vocab], dtype=torch.float64)


def _circle(student_rows: list) -> torch.Tensor:
    """Loss per event of the student spelling c i r c l e (rows at skip 0..5, student fine) against the
    teacher's one row for ``circle`` (TEACHER_ROW)."""
    n = len(student_rows)
    s = torch.stack([_logits(r, LETTERS) for r in student_rows]).float()
    t = _logits(TEACHER_ROW, WORDS).float().expand(n, -1)
    proj = tables(LETTERS, len(LETTERS) - 1, WORDS, len(WORDS) - 1)
    letters = torch.tensor([LETTERS.index(bytes([c])) for c in b"circle"[:n]])
    return byte_prefix_jsd(s, t, torch.ones(n, dtype=torch.long), torch.arange(n), letters,
                           torch.zeros(n, dtype=torch.long), *proj, beta=0.0, reduction="sum")


def test_zero_when_byte_level_distributions_agree():
    """A student whose letters give the byte strings the teacher's tokens give (c 0.9, then i 2/3 or a
    1/3 after c, ...) has loss 0 at every event; the teacher's token ``c`` and ``ci`` carry no mass."""
    agree = [{b"c": 0.9, b"d": 0.1}, {b"i": 2 / 3, b"a": 1 / 3}, {b"r": 1.0}, {b"c": 1.0}, {b"l": 1.0},
             {b"e": 1.0}]
    loss = _circle(agree)
    assert abs(loss.item()) < 1e-6
    wrong = [dict(agree[0])] + agree[1:]
    wrong[0] = {b"c": 0.5, b"d": 0.5}
    assert _circle(wrong).item() > 0.1


def test_circle_hand_worked():
    """Forward KL (beta 0). Event 0 (nothing spelled): the teacher's next-piece distribution is c 0.9
    (circle 0.6 + cat 0.3), d 0.1, so a student with c 0.5, d 0.5 pays 0.9 ln(0.9/0.5) + 0.1
    ln(0.1/0.5). Event 1 (``c`` spelled): circle and cat (and the teacher's ``ci``, at probability 0)
    go on, i 2/3, a 1/3, and the token ``c`` (probability 0) would stop there; a student with i 0.5,
    a 0.25, o 0.25 says stop (o: no teacher token goes on with it) with 0.25: it pays
    2/3 ln((2/3)/0.5) + 1/3 ln((1/3)/0.25) = ln(4/3). Event 2 (``ci``): only circle goes on, r 1; the
    student's r 0.2, o 0.8 pays ln 5."""
    rows = [{b"c": 0.5, b"d": 0.5}, {b"i": 0.5, b"a": 0.25, b"o": 0.25}, {b"r": 0.2, b"o": 0.8}]
    s = torch.stack([_logits(r, LETTERS) for r in rows]).float()
    n = len(rows)
    t = _logits(TEACHER_ROW, WORDS).float().expand(n, -1)
    proj = tables(LETTERS, len(LETTERS) - 1, WORDS, len(WORDS) - 1)
    letters = torch.tensor([LETTERS.index(bytes([c])) for c in b"cir"])
    loss = byte_prefix_jsd(s, t, torch.ones(n, dtype=torch.long), torch.arange(n), letters,
                           torch.zeros(n, dtype=torch.long), *proj, beta=0.0, reduction="sum",
                           mask=torch.tensor([True, False, False]))
    assert abs(loss.item() - (0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5))) < 1e-6
    for row, want in ((1, math.log(4 / 3)), (2, math.log(5))):
        only = torch.zeros(n, dtype=torch.bool)
        only[row] = True
        loss = byte_prefix_jsd(s, t, torch.ones(n, dtype=torch.long), torch.arange(n), letters,
                               torch.zeros(n, dtype=torch.long), *proj, beta=0.0, reduction="sum", mask=only)
        assert abs(loss.item() - want) < 1e-6, (row, loss.item(), want)


# The number case: the teacher spells digits, the student says 13 then 9 (groups of "139").
DIGITS = [str(i).encode() for i in range(10)] + [b""]                         # teacher, eos last
MERGED = DIGITS[:10] + [b"13", b"14", b"139", b""]                             # student, eos last


def test_139_against_13_9_hand_worked():
    """Events of 139 = student 13|9, teacher 1|3|9 (see gold_ds.align.prefix): offset 0, the teacher
    fine (its 1 is shorter than 13): the student's row projected on the teacher's first digit; offset
    1, the teacher fine again, the student's same row conditioned on having spelled 1; offset 2, both
    start a 1-byte token: the student fine, the teacher's third row projected on the student's pieces.
    Forward KL (beta 0)."""
    s_row0 = {b"13": 0.5, b"14": 0.2, b"139": 0.1, b"3": 0.1, b"9": 0.1}  # the student's row for "13"
    s_row1 = {b"9": 0.7, b"3": 0.2, b"0": 0.1}                             # for "9"
    t_rows = [{b"1": 0.7, b"3": 0.2, b"9": 0.1}, {b"3": 0.5, b"4": 0.5}, {b"9": 0.9, b"0": 0.1}]
    s = torch.stack([_logits(s_row0, MERGED), _logits(s_row0, MERGED), _logits(s_row1, MERGED)]).float()
    t = torch.stack([_logits(r, DIGITS) for r in t_rows]).float()
    fine = torch.tensor([0, 0, 2])
    skip = torch.tensor([0, 1, 0])
    s_tok = torch.tensor([MERGED.index(b"13"), MERGED.index(b"13"), MERGED.index(b"9")])
    t_tok = torch.tensor([DIGITS.index(b"1"), DIGITS.index(b"3"), DIGITS.index(b"9")])
    proj = tables(MERGED, len(MERGED) - 1, DIGITS, len(DIGITS) - 1)
    s.requires_grad_()
    per_row = [byte_prefix_jsd(s, t, fine, skip, s_tok, t_tok, *proj, beta=0.0, reduction="sum",
                               mask=torch.arange(3) == i) for i in range(3)]
    # offset 0: the student's first digits: 1 <- 1, 13, 14, 139 (0.8); 3 <- 3 (0.1); 9 <- 9 (0.1)
    want0 = 0.7 * math.log(0.7 / 0.8) + 0.2 * math.log(0.2 / 0.1) + 0.1 * math.log(0.1 / 0.1)
    # offset 1: the student's tokens after "1": 13 -> 3, 139 -> 3, 14 -> 4: (0.6, 0.2) / 0.8; its
    # token "1" alone (probability 0 here) would be the stop class
    want1 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    # offset 2: the teacher's 9 0.9, 0 0.1 on the student's digits, against its 9 0.7, 0 0.1, 3 0.2;
    # the other way the student's row on the teacher's digits (13, 14, 139 -> 1, all at 0): the same
    want2 = 0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.1)
    for got, want in zip(per_row, (want0, want1, want2)):
        assert abs(got.item() - want) < 1e-6, (got.item(), want)
    # the gradient at offset 1 reaches only the tokens that continue "1" (13, 14, 139)
    (g,) = torch.autograd.grad(per_row[1], s)
    moved = set((g[1].abs() > 1e-9).nonzero().squeeze(1).tolist())
    assert moved == {MERGED.index(b"13"), MERGED.index(b"14"), MERGED.index(b"139")}
    # a student that says "1" alone where the teacher goes on (3 or 4) pays for it: its "1" is the stop
    # class (the number would end there): q = (3: 0.2, 4: 0.2, stop: 0.6) against (0.5, 0.5, 0)
    s2 = s.detach().clone()
    s2[1] = _logits({b"1": 0.6, b"13": 0.2, b"14": 0.2}, MERGED).float()
    got = byte_prefix_jsd(s2, t, fine, skip, s_tok, t_tok, *proj, beta=0.0, reduction="sum",
                          mask=torch.arange(3) == 1)
    assert abs(got.item() - math.log(2.5)) < 1e-6


def test_linear_matches_logits():
    """From hidden states and heads, the same loss and gradients as from the logits they give."""
    rng = random.Random(5)
    s_vocab, s_eos = random_vocab(rng, "abc", 20)
    t_vocab, t_eos = random_vocab(rng, "abc", 27)
    events = random_events(rng, 11, s_vocab, t_vocab)
    gen = torch.Generator().manual_seed(5)
    hs, ht = torch.randn(11, 8, generator=gen), torch.randn(11, 6, generator=gen)
    ws = torch.randn(len(s_vocab), 8, generator=gen).requires_grad_()
    wt = torch.randn(len(t_vocab), 6, generator=gen)
    hs.requires_grad_()
    proj = tables(s_vocab, s_eos, t_vocab, t_eos)
    got = linear_byte_prefix_jsd(hs, ws, ht, wt, *events, *proj, beta=0.4, chunk_size=4)
    g = torch.autograd.grad(got, (hs, ws))
    hs2, ws2 = hs.detach().requires_grad_(), ws.detach().requires_grad_()
    want = byte_prefix_jsd(hs2 @ ws2.T, ht @ wt.T, *events, *proj, beta=0.4, reduction="sum")
    w = torch.autograd.grad(want, (hs2, ws2))
    close(got, want, 1e-6, "loss")
    for a, b in zip(g, w):
        close(a, b, 1e-5, "gradient")


def test_argument_errors():
    s, t = torch.zeros(2, 5), torch.zeros(2, 4)
    ok = ((torch.zeros(1, 5, dtype=torch.long),) * 2 + (torch.zeros(5, dtype=torch.long),),
          (torch.zeros(1, 4, dtype=torch.long),) * 2 + (torch.zeros(4, dtype=torch.long),))
    rows = (torch.ones(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
            torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="student_to_teacher key must be an int64"):
        byte_prefix_jsd(s, t, *rows, ok[1], ok[1])
    with pytest.raises(ValueError, match="skip must be a tensor shaped like the rows"):
        byte_prefix_jsd(s, t, rows[0], torch.zeros(3, dtype=torch.long), *rows[2:], *ok)
    with pytest.raises(ValueError, match="teacher_token must lie in"):
        byte_prefix_jsd(s, t, *rows[:3], torch.tensor([0, 4]), *ok)
    with pytest.raises(ValueError, match="side must be 0"):
        byte_prefix_jsd(s, t, torch.tensor([1, 3]), *rows[1:], *ok)
    with pytest.raises(ValueError, match="0 where side is 2"):
        byte_prefix_jsd(s, t, torch.tensor([2, 2]), torch.tensor([0, 1]), *rows[2:], *ok)
