"""Built-in tasks by name (``data.*.builtin`` and ``builtin:<name>`` tokenizers in presets).

``shapes``: an image task (name the shape or color in a Pillow-drawn picture) for vision-language
models; see ``gold_ds.data.vlm_tasks``.

``arithmetic``: the 8,100 additions of two two-digit numbers in one seeded order; the ``eval`` split
draws from its last 1,000 questions, the ``train`` split from the 7,100 before them, so the two never
share a question whatever their sizes.
"""
from .tasks import arithmetic_rows, train_arithmetic_tokenizer, train_arithmetic_unigram_tokenizer

_SPLITS = {"train": (0, 7_100), "eval": (7_100, 8_100)}


def builtin_rows(name: str, split: str, num_examples, seed: int) -> list:
    if name == "shapes":  # images drawn with Pillow (gold_ds.data.vlm_tasks)
        from .vlm_tasks import shapes_split
        return shapes_split(split, num_examples, seed)
    if name != "arithmetic":
        raise ValueError(f"unknown builtin task {name!r}; available: 'arithmetic', 'shapes'")
    if split not in _SPLITS:
        raise ValueError(f"builtin task 'arithmetic' has splits 'train' and 'eval', not {split!r}")
    start, end = _SPLITS[split]
    n = end - start if num_examples is None else num_examples
    if n > end - start:
        raise ValueError(f"builtin task 'arithmetic': num_examples={n} but its {split!r} split has "
                         f"{end - start} questions")
    return arithmetic_rows(8_100, seed)[start:start + n]


_TOKENIZERS = {"arithmetic": train_arithmetic_tokenizer,  # byte-level BPE, ChatML
               "arithmetic-unigram": train_arithmetic_unigram_tokenizer}  # Unigram + byte fallback, [INST]


def builtin_tokenizer(name: str):
    if name not in _TOKENIZERS:
        raise ValueError(f"unknown builtin tokenizer 'builtin:{name}'; available: "
                         + ", ".join(f"'builtin:{k}'" for k in _TOKENIZERS))
    return _TOKENIZERS[name]()
