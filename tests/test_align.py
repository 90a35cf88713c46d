"""gold_ds.align against independent references: tokenizers' own offsets, sentencepiece's and
mistral-common's own piece tables, hand-worked examples, plain-Python grouping, fp64 autograd."""
import importlib.util
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizer, PreTrainedTokenizerFast

from gold_ds.align import (UnsupportedTokenizerError, byte_spans, group_spans, merge_log_scales, token_bytes,
                           tokenizer_family, vocabulary_map)
from gold_ds.align import merge as merge_module

from tokenizer_helpers import mistral_data, mistral_v1

HAVE_MISTRAL = importlib.util.find_spec("mistral_common") is not None
needs_mistral = pytest.mark.skipif(not HAVE_MISTRAL, reason="mistral-common (in the test extra) is not installed")

TEXTS = [
    "Hello world, the answer is 42.",
    "Café crème, naïve façade; Zürich and São Paulo.",
    "日本語のテキストと中文文本。",
    "Emoji: 😀 🦜 🧪 and 👩‍💻 too",
    "Digits 1234567890 and 3.14159, -7e10",
    "spaces   inside    and\n\n\nnewlines\n\tand tabs",
    " leading space",
    "   three leading spaces",
    "\nleading newline",
    "x",
]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Hello world, the answer is 42 and not 41.",
    "Distillation moves knowledge from a teacher model into a student model.",
    "The student learns from the teacher's probabilities, token by token.",
    "Cafe, creme, naive, facade: words borrowed into English.", "Numbers like 2024, 3.14 and 1000000 appear.",
    "def add(a, b):\n    return a + b\n", "A list:\n- one\n- two\n- three\n",
] * 3 + [f"User {i}: what is {i} plus {i + 1}? Assistant: it is {2 * i + 1}." for i in range(60)]


# ---------------------------------------------------------------- tokenizers
def _train_byte_level_bpe():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}{{ '\\n' }}{{ m['content'] }}<|im_end|>{{ '\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=chatml)


def _unigram_model():
    """A Unigram model trained here, with the 256 byte-fallback pieces added (as SentencePiece has)."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>", show_progress=False))
    import json
    vocab = [tuple(p) for p in json.loads(tok.to_str())["model"]["vocab"]]
    have = {p for p, _ in vocab}
    low = min(s for _, s in vocab[3:])
    vocab += [(f"<0x{b:02X}>", low - 10.0) for b in range(256) if f"<0x{b:02X}>" not in have]
    return vocab


def _metaspace_tokenizer(vocab, scheme):
    """scheme: "first" | "always" | "never" (Metaspace pre-tokenizer) or "legacy" (SentencePiece's
    add_dummy_prefix as a Prepend normalizer, as older Llama conversions have)."""
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    if scheme == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme, split=scheme == "always")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1 if scheme != "never" else 0, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _train_wordpiece():
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[UNK]", "[SEP]"],
                                                              show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[SEP]")


@pytest.fixture(scope="module")
def bpe():
    return _train_byte_level_bpe()


@pytest.fixture(scope="module")
def unigram_vocab():
    return _unigram_model()


@pytest.fixture(scope="module")
def unigram(unigram_vocab):
    return _metaspace_tokenizer(unigram_vocab, "first")


@pytest.fixture(scope="module")
def wordpiece():
    return _train_wordpiece()


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    tok = mistral_v1(tmp_path_factory.mktemp("mistral_v1"), chat_template=True)
    assert len(tok) == 32000 and tok("Hello world")["input_ids"] == [1, 22557, 1526]
    return tok


@pytest.fixture(scope="module")
def tekken():
    if not HAVE_MISTRAL:
        pytest.skip("mistral-common is not installed")
    from transformers.integrations.mistral.tokenizer import MistralConverter
    tok = PreTrainedTokenizerFast(tokenizer_object=MistralConverter(mistral_data("tekken_240911.json")).converted())
    assert len(tok) == 131072 and tok("Hello world", add_special_tokens=False)["input_ids"] == [22177, 4304]
    return tok


FAMILIES = ["bpe", "unigram", "mistral", "tekken", "wordpiece"]


@pytest.fixture
def tok(request):
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------- byte spans
def _offset_reference(tokenizer, text):
    """Independent reference: the tokenizer's own character offsets, in bytes, for runs of tokens whose
    offsets overlap (byte pieces of one character all report that whole character)."""
    enc = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    runs = []
    for k, (a, b) in enumerate(enc.offsets):
        if runs and a < runs[-1][3]:
            runs[-1][1], runs[-1][3] = k + 1, max(b, runs[-1][3])
        else:
            runs.append([k, k + 1, a, b])
    return [(k0, k1, len(text[:a].encode()), len(text[:b].encode())) for k0, k1, a, b in runs]


@pytest.mark.parametrize("tok", ["bpe", "unigram", "mistral", "tekken"], indirect=True)
@pytest.mark.parametrize("text", TEXTS)
def test_text_spans_tile_the_text_and_follow_offsets(tok, text):
    """Text mode: spans tile the completion's bytes exactly, and every run of tokens sharing one
    character offset covers exactly that character range's bytes (the tokenizer's own offsets)."""
    spans = byte_spans(tok, text=text)
    data = text.encode()
    assert spans.dtype == torch.long and spans.shape[1] == 2
    assert b"".join(data[a:b] for a, b in spans.tolist()) == data
    assert spans[0, 0] == 0 and spans[-1, 1] == len(data) and torch.equal(spans[1:, 0], spans[:-1, 1])
    dummy_lone = []
    for a, b, s, e in _offset_reference(tok, text):
        got = (int(spans[a:b, 0].min()), int(spans[a:b, 1].max()))
        if got != (s, e):
            # the only allowed difference: a lone dummy-prefix ▁ reported on the first character
            dummy_lone.append((a, b, got, (s, e)))
    assert all(a == 0 and got[0] == got[1] == 0 for a, b, got, _ in dummy_lone[:1]) and len(dummy_lone) <= 1, dummy_lone


@needs_mistral
@pytest.mark.parametrize("text", TEXTS)
def test_spans_match_independent_piece_tables(mistral, tekken, text):
    """Each token's bytes equal its piece in sentencepiece's own model (Mistral v1) and in mistral-common's
    own tekken table, in both text and ids mode."""
    import sentencepiece as spm
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    data = text.encode()
    sp = spm.SentencePieceProcessor(model_file=mistral_data("tokenizer.model.v1"))
    ids = mistral(text, add_special_tokens=False)["input_ids"]
    pieces = [bytes([int(p[3:5], 16)]) if sp.is_byte(i) else p.replace("▁", " ").encode()
              for i, p in zip(ids, map(sp.id_to_piece, ids))]
    if not text.startswith(" "):               # the dummy prefix space is not part of the text
        assert pieces[0].startswith(b" ")
        pieces[0] = pieces[0][1:]
    spans = byte_spans(mistral, text=text)
    assert [data[a:b] for a, b in spans.tolist()] == pieces
    tk = Tekkenizer.from_file(mistral_data("tekken_240911.json")) if not hasattr(tekken, "_tk") else tekken._tk
    tekken._tk = tk
    ids = tekken(text, add_special_tokens=False)["input_ids"]
    spans = byte_spans(tekken, ids=ids)
    assert [data[a:b] for a, b in spans.tolist()] == [tk.id_to_byte_piece(i, "keep") for i in ids]


def _ids_mode_expected(tokenizer, text):
    """The ids carry no trace of one leading space for Metaspace tokenizers with a dummy prefix (the
    text " x" and "x" tokenize alike): ids mode then treats that space as the dummy prefix."""
    family_drops = tokenizer_family(tokenizer) == "metaspace" and text.startswith(" ")
    spans = byte_spans(tokenizer, text=text)
    return (spans - 1).clamp(min=0) if family_drops else spans, text.encode()[1 if family_drops else 0:]


@pytest.mark.parametrize("tok", ["bpe", "unigram", "mistral", "tekken"], indirect=True)
@pytest.mark.parametrize("text", TEXTS)
def test_ids_mode_equals_text_mode(tok, text):
    """On-policy spans from ids equal off-policy spans from the text; an EOS is zero-width at the end."""
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.convert_tokens_to_ids("</s>")
    ids = tok(text, add_special_tokens=False)["input_ids"] + [eos]
    spans = byte_spans(tok, ids=torch.tensor(ids))
    expected, data = _ids_mode_expected(tok, text)
    assert spans[:-1].tolist() == expected.tolist()
    assert spans[-1].tolist() == [len(data), len(data)]
    assert token_bytes(tok, ids) == data
    if not text.startswith(" "):   # tokenizer.decode agrees (it also drops the dummy prefix)
        assert tok.decode(ids, skip_special_tokens=True).encode() == data


@needs_mistral
def test_hand_worked_spans(mistral, tekken):
    """Byte-level 'Ġ' pieces and a two-byte 'ö'; SentencePiece byte fallback splits one emoji into 4
    single-byte tokens, and ids may end inside a character."""
    ids = tekken("Hello wörld", add_special_tokens=False)["input_ids"]
    assert tekken.convert_ids_to_tokens(ids) == ["Hello", "Ġw", "Ã¶r", "ld"]
    assert byte_spans(tekken, ids=ids).tolist() == [[0, 5], [5, 7], [7, 10], [10, 12]]
    ids = mistral("🦜", add_special_tokens=False)["input_ids"]
    assert mistral.convert_ids_to_tokens(ids) == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x9C>"]
    assert byte_spans(mistral, ids=ids).tolist() == [[0, 0], [0, 1], [1, 2], [2, 3], [3, 4]]
    assert byte_spans(mistral, ids=ids[:3]).tolist() == [[0, 0], [0, 1], [1, 2]]   # half an emoji
    assert token_bytes(mistral, ids[:3]) == "🦜".encode()[:2]
    # a lone ▁ that is not the dummy prefix: "a   b" = ▁a ▁▁ ▁b
    ids = mistral("a   b", add_special_tokens=False)["input_ids"]
    assert byte_spans(mistral, ids=ids).tolist() == [[0, 1], [1, 3], [3, 5]]
    # special tokens are zero-width wherever they are
    assert byte_spans(mistral, ids=[1, 22557, 2, 1526]).tolist() == [[0, 0], [0, 5], [5, 5], [5, 11]]


@pytest.mark.parametrize("scheme", ["first", "always", "never", "legacy"])
@pytest.mark.parametrize("text", TEXTS + ["  two", "a  b", " "])
def test_metaspace_dummy_prefix_schemes(unigram_vocab, scheme, text):
    """Each way of adding (or not) SentencePiece's dummy prefix: text mode tiles the text; ids mode
    drops exactly the dummy prefix (so never for "never"; for Metaspace, a text's own leading space
    is indistinguishable from it; the legacy normalizer always prepends, so nothing is lost)."""
    tok = _metaspace_tokenizer(unigram_vocab, scheme)
    assert tokenizer_family(tok) == "metaspace"
    data = text.encode()
    spans = byte_spans(tok, text=text)
    assert b"".join(data[a:b] for a, b in spans.tolist()) == data and int(spans[-1, 1]) == len(data)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    lost = scheme in ("first", "always") and text.startswith(" ")
    assert token_bytes(tok, ids) == data[1 if lost else 0:]
    expected = (spans - 1).clamp(min=0) if lost else spans
    assert byte_spans(tok, ids=ids).tolist() == expected.tolist()
    if scheme in ("legacy", "never"):
        assert tok.decode(ids).encode() == data


def _completion_ids(tokenizer, messages):
    """The ids a chat template renders for the last message: the full rendering's ids after the
    longest common prefix with the prompt's rendering."""
    full = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    prompt = tokenizer(tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]
    k = 0
    while k < min(len(full), len(prompt)) and full[k] == prompt[k]:
        k += 1
    return full[k:]


@needs_mistral
@pytest.mark.parametrize("answer", ["Four.", "The answer is 4, naïvely 😀.", "日本語です"])
def test_text_and_ids_from_a_chat_template(mistral, bpe, answer):
    """Completion ids cut from a rendered conversation (Llama-2 style "[/INST] answer</s>", whose first
    token carries the template's space; ChatML "answer<|im_end|>\\n") give text-mode spans, with the
    template's tokens zero-width at the text's end."""
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": answer}]
    n = len(answer.encode())
    positive = lambda spans: [x for x in spans.tolist() if x[0] < x[1]]  # noqa: E731
    ids = _completion_ids(mistral, msgs)
    assert ids[-1] == mistral.eos_token_id
    spans = byte_spans(mistral, text=answer, ids=ids)
    assert spans[-1].tolist() == [n, n] and positive(spans) == positive(byte_spans(mistral, text=answer))
    if ids[:-1] == mistral(answer, add_special_tokens=False)["input_ids"]:   # "▁Four": the template's space
        assert spans.tolist() == byte_spans(mistral, text=answer).tolist() + [[n, n]]
    ids = _completion_ids(bpe, msgs)
    assert bpe.convert_ids_to_tokens(ids)[-2:] == ["<|im_end|>", "Ċ"]
    spans = byte_spans(bpe, text=answer, ids=ids)
    assert spans.tolist() == byte_spans(bpe, text=answer).tolist() + [[n, n], [n, n]]


@needs_mistral
def test_text_and_ids_hand_worked_clipping(mistral, bpe):
    """Hand-worked: "▁Hello ▁world </s>" hold b" Hello world"; the text "Hello world" starts 1 byte in,
    so the first token is clipped to (0, 5). Template tokens before the text end at 0."""
    ids = mistral.convert_tokens_to_ids(["]", "▁Hello", "▁world", "</s>"])
    assert byte_spans(mistral, text="Hello world", ids=ids).tolist() == [[0, 0], [0, 5], [5, 11], [11, 11]]
    with pytest.raises(ValueError, match="do not occur"):
        byte_spans(mistral, text="Goodbye", ids=ids)
    # the arithmetic task's tokenizer (digits apart, ChatML ending in <|im_end|>)
    from gold_ds.data.tasks import train_arithmetic_tokenizer
    arith = train_arithmetic_tokenizer()
    msgs = [{"role": "user", "content": "37+48="}, {"role": "assistant", "content": "85"}]
    ids = _completion_ids(arith, msgs)
    assert byte_spans(arith, text="85", ids=ids).tolist() == [[0, 1], [1, 2], [2, 2]]
    assert byte_spans(arith, ids=ids).tolist() == [[0, 1], [1, 2], [2, 2]]


def test_wordpiece_offsets_family(wordpiece):
    """WordPiece: text spans come from offsets (with gaps at spaces); ids decode and re-encode; ids
    that do not round-trip raise."""
    assert tokenizer_family(wordpiece) == "offsets"
    text = "Hello world, café 42"
    enc = wordpiece.backend_tokenizer.encode(text, add_special_tokens=False)
    expected = [[len(text[:a].encode()), len(text[:b].encode())] for a, b in enc.offsets]
    assert byte_spans(wordpiece, text=text).tolist() == expected
    ids = enc.ids + [wordpiece.eos_token_id]
    assert "[UNK]" in enc.tokens                      # é: in ids mode, an unknown token has no bytes
    decoded = wordpiece.decode(enc.ids, skip_special_tokens=True)
    spans = byte_spans(wordpiece, ids=ids)
    assert [decoded.encode()[a:b] for a, b in spans[:-1].tolist()] == \
        [b"" if t == "[UNK]" else t.removeprefix("##").encode() for t in enc.tokens]
    assert spans[-1, 0] == spans[-1, 1] == len(decoded.encode())
    vocab = wordpiece.get_vocab()
    whole = next(w for w in vocab if len(w) == 2 and w.isalpha() and f"##{w[1]}" in vocab and w[0] in vocab)
    with pytest.raises(ValueError, match="re-encodes"):
        byte_spans(wordpiece, ids=[vocab[whole[0]], vocab["##" + whole[1]]])
    with pytest.raises(UnsupportedTokenizerError, match=type(wordpiece).__name__ + ".*offsets family"):
        vocabulary_map(wordpiece, wordpiece)


class CharTokenizer(PreTrainedTokenizer):
    """A slow (python) tokenizer: no tokenizers backend."""

    def __init__(self, **kwargs):
        self._vocab = {chr(i): i for i in range(32, 127)}
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return len(self._vocab)

    def get_vocab(self):
        return dict(self._vocab)

    def _tokenize(self, text):
        return list(text)

    def _convert_token_to_id(self, token):
        return self._vocab.get(token, 32)

    def _convert_id_to_token(self, index):
        return chr(index)


def test_unsupported_tokenizer_raises_with_its_name(bpe):
    slow = CharTokenizer()
    for call in (lambda: byte_spans(slow, text="hi"), lambda: byte_spans(slow, ids=[104, 105]),
                 lambda: vocabulary_map(slow, bpe)):
        with pytest.raises(UnsupportedTokenizerError, match="CharTokenizer.*Supported"):
            call()


def test_normalizing_tokenizer_falls_back_to_offsets(bpe):
    """A Unigram with an NFKC normalizer cannot spell 'ﬁ' (it becomes 'fi'), '２' or '…': spans come from
    the tokenizer's offsets (runs of overlapping offsets cover their characters' bytes), an unknown
    token keeps the bytes it replaced, and ids mode gives the normalized bytes."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=200, special_tokens=["<unk>"],
                                                            unk_token="<unk>", show_progress=False))
    nfkc = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    text = "the ﬁne fox ２ café…"
    spans = byte_spans(nfkc, text=text)
    assert (spans[1:, 0] >= spans[:-1, 1]).all() and (spans[:, 0] <= spans[:, 1]).all()
    for a, b, s, e in _offset_reference(nfkc, text):
        assert (int(spans[a:b, 0].min()), int(spans[a:b, 1].max())) == (s, e)
    ids = nfkc(text, add_special_tokens=False)["input_ids"]
    assert nfkc.unk_token_id in ids                                       # é
    # ids mode: the NFKC-normalized text (ﬁ -> fi, ２ -> 2, … -> ...), but the unknown é has no bytes there
    assert token_bytes(nfkc, ids) == b"the fine fox 2 caf..."


# ---------------------------------------------------------------- groups
def reference_groups(s, t):
    """Plain-Python grouping of one sequence, straight from the definition."""
    pos_s = [(i, a, b) for i, (a, b) in enumerate(s) if b > a]
    pos_t = [(i, a, b) for i, (a, b) in enumerate(t) if b > a]
    shared = sorted({b for _, _, b in pos_s} & {b for _, _, b in pos_t})

    def tiles(toks, lo, hi):
        if not toks or toks[0][1] != lo or toks[-1][2] != hi:
            return False
        return all(toks[k + 1][1] == toks[k][2] for k in range(len(toks) - 1))

    groups, prev = [], 0
    for b in shared:
        in_s = [x for x in pos_s if prev < x[2] <= b]
        in_t = [x for x in pos_t if prev < x[2] <= b]
        if tiles(in_s, prev, b) and tiles(in_t, prev, b):
            groups.append((in_s[0][0], in_s[-1][0] + 1, in_t[0][0], in_t[-1][0] + 1, prev, b))
        prev = b
    covered = sum(b - a for *_, a, b in groups)
    union = set()
    for _, a, b in pos_s + pos_t:
        union.update(range(a, b))
    return groups, covered, len(union)


def _as_rows(g, seq=None):
    keep = torch.ones(len(g), dtype=torch.bool) if seq is None else g.sequence == seq
    cols = [g.student_start, g.student_end, g.teacher_start, g.teacher_end, g.byte_start, g.byte_end]
    return [tuple(r) for r in torch.stack([c[keep] for c in cols], 1).tolist()]


def test_group_spans_hand_worked():
    s = torch.tensor([[0, 1], [1, 3], [3, 3], [3, 6], [6, 8]])
    t = torch.tensor([[0, 3], [3, 4], [4, 6], [6, 8], [8, 8]])
    g = group_spans(s, t)
    # shared ends {3, 6, 8}; the zero-width student token 2 and teacher token 4 belong to no group
    assert _as_rows(g) == [(0, 2, 0, 1, 0, 3), (3, 4, 1, 3, 3, 6), (4, 5, 3, 4, 6, 8)]
    assert g.covered_bytes.tolist() == [8] and g.total_bytes.tolist() == [8] and g.coverage == 1.0


def test_group_spans_gap_and_batch():
    """Student skips byte 2: the group [2, 5) does not tile on the student side and is dropped:
    covered 2 + 4 = 6 of the 9 bytes either side covers."""
    s_gap = torch.tensor([[0, 2], [3, 5], [5, 9]])
    t_gap = torch.tensor([[0, 2], [2, 5], [5, 7], [7, 9]])
    s_full = torch.tensor([[0, 1], [1, 3], [3, 3], [3, 6], [6, 8]])
    t_full = torch.tensor([[0, 3], [3, 4], [4, 6], [6, 8], [8, 8]])
    g = group_spans([s_gap, torch.zeros(0, 2, dtype=torch.long), s_full], [t_gap, torch.zeros(0, 2), t_full])
    assert _as_rows(g, 0) == [(0, 1, 0, 1, 0, 2), (2, 3, 2, 4, 5, 9)]
    assert _as_rows(g, 2) == [(0, 2, 0, 1, 0, 3), (3, 4, 1, 3, 3, 6), (4, 5, 3, 4, 6, 8)]
    assert g.covered_bytes.tolist() == [6, 0, 8] and g.total_bytes.tolist() == [9, 0, 8]
    assert g.coverage == pytest.approx(14 / 17, abs=0)
    with pytest.raises(ValueError, match="non-overlapping"):
        group_spans(torch.tensor([[0, 3], [2, 4]]), torch.tensor([[0, 4]]))


@needs_mistral
def test_group_spans_full_coverage_across_families(mistral, tekken, bpe, unigram):
    """Two tokenizers of different families on the same text: every byte is in a group, and each group's
    student and teacher tokens spell the same bytes."""
    for student, teacher in ((mistral, tekken), (unigram, bpe), (bpe, mistral), (unigram, tekken)):
        s = [byte_spans(student, text=x) for x in TEXTS]
        t = [byte_spans(teacher, text=x) for x in TEXTS]
        g = group_spans(s, t)
        assert g.coverage == 1.0 and g.covered_bytes.tolist() == [len(x.encode()) for x in TEXTS]
        for seq, a, b, c, d in zip(*(x.tolist() for x in (g.sequence, g.student_start, g.student_end,
                                                           g.teacher_start, g.teacher_end))):
            data = TEXTS[seq].encode()
            assert data[s[seq][a, 0]:s[seq][b - 1, 1]] == data[t[seq][c, 0]:t[seq][d - 1, 1]]


def _random_spans(draw, n_bytes):
    """Ordered, non-overlapping spans over [0, n_bytes) with random cuts, gaps and zero-width tokens."""
    cuts = sorted(draw(st.sets(st.integers(1, max(n_bytes - 1, 1)), max_size=n_bytes)) | {n_bytes})
    spans, prev = [], 0
    for c in cuts:
        if c <= prev:
            continue
        if draw(st.integers(0, 9)) == 0:
            spans.append((prev, prev))                   # zero-width
        if draw(st.integers(0, 7)) != 0:                 # else: a gap
            spans.append((prev, c))
        prev = c
    return spans


@st.composite
def span_batches(draw):
    batch = []
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.integers(0, 24))
        batch.append((_random_spans(draw, n), _random_spans(draw, n)))
    return batch


def _check_against_reference(batch):
    to_t = lambda x: torch.tensor(x, dtype=torch.long).reshape(-1, 2)  # noqa: E731
    g = group_spans([to_t(s) for s, _ in batch], [to_t(t) for _, t in batch])
    for b, (s, t) in enumerate(batch):
        groups, covered, total = reference_groups(s, t)
        assert _as_rows(g, b) == groups
        assert int(g.covered_bytes[b]) == covered and int(g.total_bytes[b]) == total
    rows = _as_rows(g)
    seq = g.sequence.tolist()
    for k in range(len(rows) - 1):   # disjoint and ordered within a sequence
        if seq[k] == seq[k + 1]:
            assert rows[k][1] <= rows[k + 1][0] and rows[k][3] <= rows[k + 1][2] and rows[k][5] <= rows[k + 1][4]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(span_batches())
def test_group_spans_matches_plain_reference_on_random_spans(batch):
    _check_against_reference(batch)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(list("ab cdé日本😀🦜\n 0123") + ["the", " fox", "  "]), max_size=20).map("".join))
def test_group_spans_on_random_texts(bpe, unigram, text):
    """Random texts through two real tokenizers: the plain reference agrees, and coverage is 100%."""
    s, t = byte_spans(unigram, text=text).tolist(), byte_spans(bpe, text=text).tolist()
    _check_against_reference([(s, t)])
    assert group_spans(torch.tensor(s).reshape(-1, 2), torch.tensor(t).reshape(-1, 2)).coverage == 1.0


# ---------------------------------------------------------------- merge
def test_merge_hand_worked():
    """V = 3. Row 0 [0,0,0] -> 1/3 each; row 1 [ln2,0,0] -> (1/2, 1/4, 1/4); row 2 [ln3,0,ln1] ->
    (3/5, 1/5, 1/5); row 3 [0, ln4, 0] -> (1/6, 4/6, 1/6)."""
    ln = math.log
    logits = torch.tensor([[0, 0, 0], [ln(2), 0, 0], [ln(3), 0, 0], [0, ln(4), 0]], dtype=torch.float32)
    tokens = torch.tensor([2, 1, 0, 1])
    start, end = torch.tensor([0, 1, 0]), torch.tensor([1, 4, 4])
    out = merge_log_scales(logits, tokens, start, end)
    expected = [0.0, ln(3 / 5) + ln(4 / 6), ln(1 / 4) + ln(3 / 5) + ln(4 / 6)]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor(expected), rtol=0, atol=1e-6)
    # temperature 2: row 3 becomes [0, ln2, 0] -> 2/4; row 2 [ln3/2, 0, 0] -> sqrt3/(sqrt3+2)
    out = merge_log_scales(logits, tokens, start[1:2], end[1:2], temperature=2.0)
    torch.testing.assert_close(out, torch.tensor([ln(3 ** 0.5 / (3 ** 0.5 + 2)) + ln(2 / 4)]), rtol=0, atol=1e-6)


class TinyCausalLM(torch.nn.Module):
    def __init__(self, vocab=11, width=8):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, width)
        self.rnn = torch.nn.GRU(width, width, batch_first=True)
        self.out = torch.nn.Linear(width, vocab)

    def forward(self, ids):
        return self.out(self.rnn(self.emb(ids))[0])


def test_merge_chain_rule_against_a_causal_model():
    """The merged probability of the actual span (first row's softmax at the first token, times
    exp(log_scale)) equals the span's joint probability, computed in fp64 one prefix at a time."""
    model = TinyCausalLM().double()
    seq = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
    with torch.no_grad():
        rows = model(seq)[0, :-1].float()      # row j-1 predicts token j
    tokens = seq[0, 1:]
    start, end = torch.tensor([0, 2, 3, 7]), torch.tensor([2, 3, 7, 9])
    scale = merge_log_scales(rows, tokens, start, end)
    merged = torch.softmax(rows[start], -1).gather(1, tokens[start, None]).squeeze(1) * scale.exp()
    with torch.no_grad():
        def joint(a, b):
            p = 1.0
            for j in range(a, b):               # p(token j | tokens before j), fresh forward per prefix
                p *= torch.softmax(model(seq[:, :j + 1])[0, -1], -1)[seq[0, j + 1]].item()
            return p
        expected = torch.tensor([joint(a, b) for a, b in zip(start.tolist(), end.tolist())], dtype=torch.float64)
    torch.testing.assert_close(merged.double(), expected, rtol=2e-5, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_elements", [1 << 23, 40])
def test_merge_matches_fp64_autograd(monkeypatch, temperature, chunk_elements):
    """Values and gradients against the plain formula in fp64 autograd (also with tiny row chunks and
    overlapping groups)."""
    monkeypatch.setattr(merge_module, "_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(1)
    n, v = 37, 13
    logits = (3 * torch.randn(n, v)).requires_grad_()
    tokens = torch.randint(0, v, (n,))
    start = torch.tensor([0, 1, 4, 10, 11, 20, 30, 2])
    end = torch.tensor([1, 4, 10, 11, 20, 30, 37, 15])
    upstream = torch.randn(start.numel())
    out = merge_log_scales(logits, tokens, start, end, temperature)
    (out * upstream).sum().backward()
    ref_logits = logits.detach().double().requires_grad_()
    logp = torch.log_softmax(ref_logits / temperature, -1).gather(1, tokens[:, None]).squeeze(1)
    ref = torch.stack([logp[a + 1:b].sum() for a, b in zip(start.tolist(), end.tolist())])
    (ref * upstream.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-5, atol=1e-6)


def test_merge_bf16_and_validation():
    torch.manual_seed(2)
    logits = torch.randn(6, 5, dtype=torch.bfloat16, requires_grad=True)
    tokens = torch.tensor([0, 1, 2, 3, 4, 0])
    out = merge_log_scales(logits, tokens, torch.tensor([0, 3]), torch.tensor([3, 6]))
    ref = torch.log_softmax(logits.detach().double(), -1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(out.double(), torch.stack([ref[1:3].sum(), ref[4:6].sum()]), rtol=1e-6, atol=1e-5)
    out.sum().backward()
    assert out.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16 and logits.grad[[0, 3]].abs().sum() == 0
    with pytest.raises(ValueError, match="start < end"):
        merge_log_scales(logits, tokens, torch.tensor([2]), torch.tensor([2]))
    with pytest.raises(ValueError, match="temperature"):
        merge_log_scales(logits, tokens, torch.tensor([0]), torch.tensor([2]), temperature=0.0)


# ---------------------------------------------------------------- vocabulary map
def test_vocabulary_map_hand_worked():
    """Ġthe ~ ▁the (b" the"), the ~ the, A ~ A (the regular A preferred to <0x41>), Ġ ~ ▁ (b" "),
    x ~ <0x78> (only a byte piece has it); specials never match; 'zz' has no partner."""
    bl = Tokenizer(models.BPE(vocab={"Ġthe": 0, "the": 1, "A": 2, "Ġ": 3, "x": 4, "zz": 5}, merges=[]))
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bl.decoder = decoders.ByteLevel()
    bl.add_special_tokens(["</s>"])                                     # id 6
    student = PreTrainedTokenizerFast(tokenizer_object=bl, eos_token="</s>")
    pieces = ["<unk>", "</s>", "<0x41>", "▁the", "the", "A", "▁", "<0x78>", "<0x41>x"]
    ms = Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=0, byte_fallback=True))
    ms.pre_tokenizer = pre_tokenizers.Metaspace()
    ms.decoder = decoders.Metaspace()
    ms.add_special_tokens(["<unk>", "</s>"])
    teacher = PreTrainedTokenizerFast(tokenizer_object=ms, unk_token="<unk>", eos_token="</s>")
    vm = vocabulary_map(student, teacher)
    assert list(zip(vm.student_ids.tolist(), vm.teacher_ids.tolist())) == [(0, 3), (1, 4), (2, 5), (3, 6), (4, 7)]
    assert vm.num_matched == vm.K == 5 and vm.teacher_vocab_size == 9 and vm.student_vocab_size == 7
    assert vm.match_rate == pytest.approx(5 / 9, abs=0)
    assert vocabulary_map(student, teacher) is vm                        # cached


@needs_mistral
def test_vocabulary_map_real_pair(mistral, tekken):
    """Mistral v1 (SentencePiece) vs tekken (byte-level): the exact pairs computed from sentencepiece's
    and mistral-common's own tables."""
    import sentencepiece as spm
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    sp = spm.SentencePieceProcessor(model_file=mistral_data("tokenizer.model.v1"))
    student = {}
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i):
            continue
        piece = bytes([int(sp.id_to_piece(i)[3:5], 16)]) if sp.is_byte(i) else sp.id_to_piece(i).replace("▁", " ").encode()
        rank = (sp.is_byte(i), i)
        if piece not in student or rank < student[piece]:
            student[piece] = rank
    tk = Tekkenizer.from_file(mistral_data("tekken_240911.json"))
    teacher = {}
    for i in range(tk.num_special_tokens, tk.n_words):
        teacher.setdefault(tk.id_to_byte_piece(i, "keep"), i)
    expected = sorted((t, student[p][1]) for p, t in teacher.items() if p in student)
    vm = vocabulary_map(mistral, tekken)
    assert list(zip(vm.teacher_ids.tolist(), vm.student_ids.tolist())) == expected
    assert vm.match_rate == pytest.approx(len(expected) / 131072, abs=0) and 0.1 < vm.match_rate < 0.25
    for ids, size in ((vm.student_ids, 32000), (vm.teacher_ids, 131072)):
        assert ids.dtype == torch.long and ids.unique().numel() == ids.numel() and int(ids.max()) < size
