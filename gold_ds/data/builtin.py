"""Built-in tasks by name (``data.*.builtin`` and ``builtin:<name>`` tokenizers in presets).

``shapes``: an image task (name the shape or color in a Pillow-drawn picture) for vision-language
models; see ``gold_ds.data.vlm_tasks``.

``arithmetic``: the 8,100 additions of two two-digit numbers in one seeded order; the ``eval`` split
draws from its last 1,000 questions, the ``train`` split from the 7,100 before them, so the two never
share a question whatever their sizes. ``arithmetic-words``: the same questions, answers spelled digit
by digit in words (``eight five``).
"""
import functools

from .tasks import (arithmetic_rows, arithmetic_words_row, train_arithmetic_letters_tokenizer,
                    train_arithmetic_merged_digits_tokenizer, train_arithmetic_tokenizer,
                    train_arithmetic_unigram_tokenizer)

_SPLITS = {"train": (0, 7_100), "eval": (7_100, 8_100)}


def builtin_rows(name: str, split: str, num_examples, seed: int) -> list:
    if name == "shapes":  # images drawn with Pillow (gold_ds.data.vlm_tasks)
        from .vlm_tasks import shapes_split
        return shapes_split(split, num_examples, seed)
    if name not in ("arithmetic", "arithmetic-words"):
        raise ValueError(f"unknown builtin task {name!r}; available: 'arithmetic', 'arithmetic-words', 'shapes'")
    if split not in _SPLITS:
        raise ValueError(f"builtin task {name!r} has splits 'train' and 'eval', not {split!r}")
    start, end = _SPLITS[split]
    n = end - start if num_examples is None else num_examples
    if n > end - start:
        raise ValueError(f"builtin task {name!r}: num_examples={n} but its {split!r} split has "
                         f"{end - start} questions")
    rows = arithmetic_rows(8_100, seed)[start:start + n]
    return rows if name == "arithmetic" else [arithmetic_words_row(r) for r in rows]


_TOKENIZERS = {"arithmetic": train_arithmetic_tokenizer,  # byte-level BPE, ChatML, digits apart
               "arithmetic-unigram": train_arithmetic_unigram_tokenizer,  # Unigram + byte fallback, [INST]
               "arithmetic-merged-digits": train_arithmetic_merged_digits_tokenizer,  # GPT-2 regex BPE, [INST]
               "arithmetic-words": functools.partial(train_arithmetic_tokenizer, words=True),  # a token per word
               "arithmetic-letters": train_arithmetic_letters_tokenizer}  # byte by byte, [INST]


def builtin_tokenizer(name: str):
    if name not in _TOKENIZERS:
        raise ValueError(f"unknown builtin tokenizer 'builtin:{name}'; available: "
                         + ", ".join(f"'builtin:{k}'" for k in _TOKENIZERS))
    return _TOKENIZERS[name]()
