"""Real pretrained tokenizers for the tests, from the files the mistral-common package (in the test
extra) ships, so nothing is downloaded. A test that needs one is skipped without mistral-common."""
import os
import shutil

import pytest

# Llama-2 style: "<s>[INST] question [/INST] answer</s>", the answer after a space (its first piece
# starts with ▁); the generation prompt adds nothing, so the prompt renders as a prefix of the turn.
LLAMA2_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
                   " [/INST]{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


def mistral_data(name: str) -> str:
    """The path of a file in mistral-common's data folder (``tokenizer.model.v1``, ``tekken_240911.json``)."""
    mistral_common = pytest.importorskip("mistral_common")
    return os.path.join(os.path.dirname(mistral_common.__file__), "data", name)


def mistral_v1(directory, chat_template: bool = False):
    """Mistral's real v1 SentencePiece tokenizer (32000 pieces, Metaspace, byte fallback) as a
    ``LlamaTokenizer`` adding BOS, loaded from a copy of its model in `directory`, with EOS as pad
    token (as ``gold_ds.data`` sets it). ``chat_template=True`` adds ``LLAMA2_TEMPLATE``."""
    from transformers import LlamaTokenizer
    shutil.copy(mistral_data("tokenizer.model.v1"), os.path.join(directory, "tokenizer.model"))
    tok = LlamaTokenizer.from_pretrained(str(directory), add_bos_token=True)
    tok.pad_token = tok.eos_token
    if chat_template:
        tok.chat_template = LLAMA2_TEMPLATE
    return tok
