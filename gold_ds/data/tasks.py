"""The built-in demo task: multi-digit addition with exact-match answers, and its tokenizer.

Rows use the conversational format the rest of gold_ds reads:
    {"messages": [{"role": "user", "content": "37+48="},
                  {"role": "assistant", "content": "85"}],
     "answer": "85"}

Both operands have exactly `digits` digits (default 2: 10-99, 8,100 questions), so digits line up by
position, which tiny models learn much faster than ragged widths. Questions are drawn without
replacement from the space of operand pairs, so one seeded draw can be cut into a training split and a
held-out split that share no question.

Two tokenizers of different families are trained here, offline, so that cross-tokenizer distillation
can be shown without downloads: ``train_arithmetic_tokenizer`` (byte-level BPE, ChatML: the teacher's
and the default student's) and ``train_arithmetic_unigram_tokenizer`` (SentencePiece-style Unigram
with Metaspace and byte fallback, a Llama-2-style template: the cross-tokenizer demo's student).

The byte-level BPE is trained here, offline. Its pre-tokenizer puts
every digit and every punctuation/operator character in a token of its own, so numbers are spelled
digit by digit. Its ChatML template puts no newline after the last message, so a rendered
conversation ends with `<|im_end|>`: the tokens after the `add_generation_prompt=True` rendering of a
prompt are exactly the answer's tokens followed by `<|im_end|>`.
"""
import json
import math
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
TURN_START_TOKEN = "<|im_start|>"
TURN_END_TOKEN = "<|im_end|>"

# ChatML, with turns separated (not terminated) by a newline: the rendering of a full conversation
# ends in <|im_end|>, and the generation prompt adds "\n<|im_start|>assistant\n".
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "<|im_start|>{{ message['role'] }}{{ '\\n' }}{{ message['content'] }}<|im_end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n' }}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)


def _addition_row(a: int, b: int) -> dict:
    question, answer = f"{a}+{b}=", str(a + b)
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        "answer": answer,
    }


def _draw_pairs(count: int, seed: int, digits: int) -> list[tuple[int, int]]:
    """`count` distinct operand pairs (a, b) of `digits`-digit numbers (0-9 for one digit), in seeded
    order."""
    low = 10 ** (digits - 1) if digits > 1 else 0
    width = 10**digits - low
    if count > width * width:
        raise ValueError(f"asked for {count} distinct questions, but {digits}-digit addition has only "
                         f"{width * width}")
    codes = random.Random(seed).sample(range(width * width), count)
    return [(low + code // width, low + code % width) for code in codes]


def arithmetic_splits(num_train: int, num_eval: int, seed: int, digits: int = 2) -> tuple[list[dict], list[dict]]:
    """(train_rows, eval_rows) of addition questions "a+b=" with two `digits`-digit operands (0-9 when
    `digits` is 1); the answer is the decimal sum. One seeded draw of distinct questions, cut in two,
    so no question is in both splits. Deterministic given (seed, digits)."""
    rows = [_addition_row(a, b) for a, b in _draw_pairs(num_train + num_eval, seed, digits)]
    return rows[:num_train], rows[num_train:]


def arithmetic_rows(num_examples: int, seed: int, digits: int = 2) -> list[dict]:
    """`num_examples` distinct addition rows: the training split of
    `arithmetic_splits(num_examples, 0, seed, digits)`."""
    return arithmetic_splits(num_examples, 0, seed, digits)[0]


def exact_match(prediction: str, answer: str) -> bool:
    """True when the prediction equals the answer after stripping surrounding whitespace."""
    return prediction.strip() == answer.strip()


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def spell_digits(number: str) -> str:
    """``"139"`` -> ``"one three nine"``: the answers of the ``arithmetic-words`` task."""
    return " ".join(DIGIT_WORDS[int(d)] for d in number)


def arithmetic_words_row(row: dict) -> dict:
    """An arithmetic row whose answer is spelled digit by digit in words (``37+48=`` -> ``eight
    five``), so that a tokenizer with a token per word and one that spells letters cut it differently."""
    answer = spell_digits(row["answer"])
    return {"messages": [row["messages"][0], {"role": "assistant", "content": answer}], "answer": answer}


def train_arithmetic_tokenizer(words: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE, deterministic. Ids 0, 1, 2 are `<|endoftext|>` (pad), `<|im_start|>`,
    `<|im_end|>` (eos: the end of a turn), then the 256 bytes, then the merges learned from the corpus.
    Digits and operators are pre-tokenized apart, so they never merge: the corpus is the chat role
    names, which become single tokens (274 tokens in all). With ``words`` the corpus also holds the
    digit words, so that ``eight`` and `` five`` are single tokens too (the ``arithmetic-words``
    teacher's tokenizer). No BOS is added. Carries `CHATML_TEMPLATE`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Punctuation(behavior="isolated"),  # ASCII operators such as + - * = included
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,  # a ceiling the corpus never reaches
        special_tokens=[PAD_TOKEN, TURN_START_TOKEN, TURN_END_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    corpus = ["system", "user", "assistant"]
    if words:
        corpus += list(DIGIT_WORDS) + [" ".join(DIGIT_WORDS)] * 2
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=TURN_END_TOKEN,
        bos_token=None,
        unk_token=None,
        chat_template=CHATML_TEMPLATE,
    )


def _inst_byte_level(vocab_size: int, corpus: list) -> PreTrainedTokenizerFast:
    """A byte-level BPE with GPT-2's pre-tokenizer regex (digit runs stay together), merges learned
    from ``corpus`` (pairs seen at least twice, up to ``vocab_size``), the special tokens ``<pad>``
    ``<s>`` ``</s>`` (eos) ``[INST]`` ``[/INST]`` ``[SYS]`` ``[/SYS]`` and ``INST_TEMPLATE``."""
    specials = ["<pad>", "<s>", "</s>", "[INST]", "[/INST]", "[SYS]", "[/SYS]"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=2,
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   chat_template=INST_TEMPLATE)


def train_arithmetic_merged_digits_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE whose merges, learned from the arithmetic task's questions and answers with
    GPT-2's pre-tokenizer regex, join digit runs: ``85`` is one token, ``139`` is ``13`` ``9``,
    ``198`` is ``1`` ``98`` (320 tokens, ``[INST]`` template). Against the digit-by-digit teacher
    (``builtin:arithmetic``) the two cut numbers differently, as Llama-3's and Qwen's do."""
    rows = arithmetic_rows(8_100, 0)[:2_000]  # the first questions of the built-in task's training split
    return _inst_byte_level(320, [m["content"] for r in rows for m in r["messages"]])


def train_arithmetic_letters_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer without merges: every text is spelled byte by byte (letter by letter),
    ``[INST]`` template (263 tokens). Against the ``arithmetic-words`` teacher, which says ``eight``
    in one token, it is the ``circle`` against ``c i r c l e`` case."""
    return _inst_byte_level(0, [])


# Llama-2 style: "<s>[INST] question [/INST]answer</s>" (no space before the answer, so the
# completion's first token carries no word-boundary marker).
INST_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ bos_token }}[INST] {{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ bos_token }}[SYS] {{ message['content'] }} [/SYS]{% endif %}"
    "{% endfor %}"
)


def stable_unigram_vocab(tokenizer: Tokenizer, corpus: list, num_special: int) -> list:
    """A trained Unigram tokenizer's (piece, score) list, made the same in every process.

    ``UnigramTrainer`` finds the same pieces in every process, but their scores and their order (the
    ids) follow the iteration order of its hash maps, which differs from process to process: ranks
    would build different tokenizers. Here the special tokens keep their ids (the first
    ``num_special``), every other piece is scored by its add-one smoothed log frequency as a substring
    of the pre-tokenized ``corpus`` (higher: kept whole more readily), and ordered by score, then
    piece."""
    vocab = [tuple(v) for v in json.loads(tokenizer.to_str())["model"]["vocab"]]
    words = [w for text in corpus for w, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text)]
    counts = {}
    for piece, _ in vocab[num_special:]:
        counts[piece] = sum(sum(w.startswith(piece, i) for i in range(len(w))) for w in words)
    total = sum(counts.values()) + len(counts)
    scored = sorted(((p, math.log((c + 1) / total)) for p, c in counts.items()), key=lambda x: (-x[1], x[0]))
    return vocab[:num_special] + scored


def train_arithmetic_unigram_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style Unigram tokenizer, deterministic: Metaspace (``▁`` for a space, prepended
    only at the start of a text), byte fallback (``<0x00>``..``<0xFF>``, so any text encodes), digits
    and punctuation pre-tokenized apart (numbers are spelled digit by digit, as the teacher's are, so
    the two can learn the same task; their vocabularies, templates and special tokens all differ).
    Special tokens ``<pad>`` (0), ``<s>``, ``</s>`` (eos: the end of a turn), ``<unk>``, ``[INST]``,
    ``[/INST]``, ``[SYS]``, ``[/SYS]``. Carries ``INST_TEMPLATE``."""
    specials = ["<pad>", "<s>", "</s>", "<unk>", "[INST]", "[/INST]", "[SYS]", "[/SYS]"]
    meta = dict(replacement="\u2581", prepend_scheme="first")
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Metaspace(**meta),
    ])
    trainer = trainers.UnigramTrainer(vocab_size=64, special_tokens=specials, unk_token="<unk>",
                                      initial_alphabet=list("0123456789+=-*/\u2581"), show_progress=False)
    corpus = ["system user assistant question answer the sum of"]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    vocab = stable_unigram_vocab(tokenizer, corpus, len(specials)) + [(f"<0x{b:02X}>", -100.0) for b in range(256)]
    tokenizer.model = models.Unigram(vocab, unk_id=specials.index("<unk>"), byte_fallback=True)
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(**meta)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", chat_template=INST_TEMPLATE)
