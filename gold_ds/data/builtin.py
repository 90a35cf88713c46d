"""Built-in tasks by name (``data.*.builtin`` and ``builtin:<name>`` tokenizers in presets).

``arithmetic``: all 10,000 two-digit additions in one seeded order; the ``train`` split is its first
``num_examples`` questions, the ``eval`` split its last ``num_examples``, so the two share no
question while their sizes add up to at most 10,000.
"""
from .tasks import arithmetic_rows, train_arithmetic_tokenizer

_ALL_ARITHMETIC = 10_000


def builtin_rows(name: str, split: str, num_examples, seed: int) -> list:
    if name != "arithmetic":
        raise ValueError(f"unknown builtin task {name!r}; available: 'arithmetic'")
    n = num_examples or 1000
    if split not in ("train", "eval"):
        raise ValueError(f"builtin task 'arithmetic' has splits 'train' and 'eval', not {split!r}")
    rows = arithmetic_rows(_ALL_ARITHMETIC, seed)
    return rows[:n] if split == "train" else rows[-n:]


def builtin_tokenizer(name: str):
    if name != "arithmetic":
        raise ValueError(f"unknown builtin tokenizer 'builtin:{name}'; available: 'builtin:arithmetic'")
    return train_arithmetic_tokenizer()
