"""gold_ds.align.prefix: the projection tables of real tokenizers against their definition written out
by brute force (tests/reference_losses.py, from the tokens' bytes), and the events of aligned groups
against hand-worked cases (``139`` as ``13 9`` against ``1 3 9``; ``eight five`` in words against
letters), through the cross-tokenizer assembler."""

import pytest
import torch

import reference_losses as ref
from gold_ds.align import prefix_projection
from gold_ds.data.builtin import builtin_tokenizer
from gold_ds.data.cross_tokenizer import CrossTokenizerAssembler
from gold_ds.data.dataset import Example, Sample
from gold_ds.data.render import TextSide


def _gpt2_bytes():
    """GPT-2's printable character -> byte map (the byte-level alphabet), written out."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _vocab_bytes(tokenizer):
    """Per id, the bytes of a byte-level token (empty for special tokens: the named ones and the added
    tokens marked special, such as ``[INST]``)."""
    table = _gpt2_bytes()
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    out = [b""] * len(tokenizer)
    for token, i in tokenizer.get_vocab().items():
        if i not in special:
            out[i] = bytes(table[c] for c in token)
    return out


@pytest.mark.parametrize("a_name,b_name", [("arithmetic-merged-digits", "arithmetic"),
                                           ("arithmetic", "arithmetic-merged-digits"),
                                           ("arithmetic-words", "arithmetic-letters"),
                                           ("arithmetic-letters", "arithmetic-words")])
def test_projection_tables_match_their_definition(a_name, b_name):
    a, b = builtin_tokenizer(a_name), builtin_tokenizer(b_name)
    got = prefix_projection(a, b, a.eos_token_id, b.eos_token_id)
    key, piece, whole = ref.prefix_tables(_vocab_bytes(a), _vocab_bytes(b), a.eos_token_id, b.eos_token_id)
    assert torch.equal(got.piece, piece)
    # keys and wholes name byte strings: equal where the strings are equal, whatever the numbering
    assert torch.equal(got.key >= 0, key >= 0) and torch.equal(got.whole >= 0, whole >= 0)
    want = torch.cat([key[key >= 0], whole[whole >= 0]])
    have = torch.cat([got.key[key >= 0], got.whole[whole >= 0]])
    assert torch.equal(want[:, None] == want[None, :], have[:, None] == have[None, :])


def test_words_project_onto_letters():
    words, letters = builtin_tokenizer("arithmetic-words"), builtin_tokenizer("arithmetic-letters")
    proj = prefix_projection(words, letters, words.eos_token_id, letters.eos_token_id)
    eight, seven = (words.convert_tokens_to_ids(t) for t in ("eight", "seven"))
    spelled = [letters.decode([int(proj.piece[d, eight])]) for d in range(5)]
    assert spelled == list("eight")
    assert proj.key[1, eight] != proj.key[1, seven] and proj.key[0, eight] == proj.key[0, seven] == 0
    assert int(proj.piece[0, words.eos_token_id]) == letters.eos_token_id


def _events(student, teacher, question, answer):
    asm = CrossTokenizerAssembler(TextSide(student), TextSide(teacher, "teacher.model.tokenizer"), 64)
    example = Example([{"role": "user", "content": question}], answer, answer)
    prompt, completion = TextSide(student).encode(example)
    mb = asm.assemble([Sample(prompt, completion, example)])
    a = mb.alignment
    e = a.events
    rows = []
    for s_row, t_row, side, skip in zip(e.student_row.tolist(), e.teacher_row.tolist(), e.side.tolist(),
                                        e.skip.tolist()):
        rows.append((student.decode([a.student_tokens[s_row]]), teacher.decode([a.teacher_tokens[t_row]]),
                     ("teacher", "student", "both")[side], skip))
    return rows


def test_events_of_139_against_13_9():
    """Student 13|9, teacher 1|3|9: the teacher is finer at bytes 0 and 1 (the student's 13 projected,
    then conditioned on 1), both start a 1-byte token at byte 2 (compared both ways), then the
    end-of-turn pair (both ways)."""
    merged, digits = builtin_tokenizer("arithmetic-merged-digits"), builtin_tokenizer("arithmetic")
    assert _events(merged, digits, "86+53=", "139") == [
        ("13", "1", "teacher", 0), ("13", "3", "teacher", 1), ("9", "9", "both", 0),
        ("</s>", "<|im_end|>", "both", 0)]


def test_events_of_words_against_letters():
    """``eight five``: the student spells every byte; each of its rows is compared with the teacher's
    row of the word it is in, skip = the letters already spelled."""
    letters, words = builtin_tokenizer("arithmetic-letters"), builtin_tokenizer("arithmetic-words")
    got = _events(letters, words, "40+45=", "eight five")
    want = [(c, "eight", "student", i) for i, c in enumerate("eight")]
    want += [(c, " five", "student", i) for i, c in enumerate(" five")]
    assert got == want + [("</s>", "<|im_end|>", "both", 0)]
