"""Chat rendering, once for every model: how a conversation becomes (prompt ids, completion ids).

A *side* is one model's view of the data: its tokenizer (or processor), how it renders an example,
and how it turns samples into a micro-step's tensors. Two kinds share one protocol:

- ``TextSide`` (here): a tokenizer with a chat template;
- ``gold_ds.data.vlm.VLMSide``: a vision-language processor (image tokens expanded, pixel inputs).

Protocol: ``tokenizer``, ``preprocessor`` (what an export saves beside the weights),
``placeholder_ids`` (tokens a sampler must never produce, or None), ``encode_prompt(example)``,
``encode(example, text=None) -> (prompt ids, completion ids)``, ``batch(samples) -> tensors``, and
for the dataset step (``gold_ds.data.dataset``, ``gold_ds.data.cache``) ``check_columns(dataset)``,
``encode_rows(examples) -> [(prompt ids, completion ids) or BadRow]``, ``prompt_length_note``,
``prompt_from_ids(ids, example)`` (a stored prompt as the side's prompt object) and ``fingerprint()``
(a digest of everything in the side that changes an encoding).

Rendering rule (``split_completion``): prompt ids = the template rendered with
``add_generation_prompt=True``; completion ids = what the full conversation adds after them, cut
after the first EOS / end-of-turn token.
"""
import hashlib
import json

from ..config import ConfigError
from .batch import sequence_tensors
from .dataset import Example


def split_completion(render, prompt: list, assistant: dict, eos: int, who: str) -> tuple:
    """(prompt ids, completion ids) of chat messages ``prompt`` followed by the ``assistant`` message;
    ``render(messages, add_generation_prompt) -> ids`` is the side's template."""
    return split_ids(render(prompt, True), render(list(prompt) + [assistant], False), eos, who)


def split_ids(prompt_ids: list, full: list, eos: int, who: str) -> tuple:
    """(prompt ids, completion ids) from the ids of a rendered prompt and of the full conversation."""
    if full[:len(prompt_ids)] != prompt_ids:
        raise ValueError(f"{who}: the chat template does not render the prompt (add_generation_prompt=True) as a "
                         "prefix of the full conversation, so the completion cannot be split off; use a template "
                         "whose generation prompt is a prefix of the rendered assistant turn")
    completion = full[len(prompt_ids):]
    if eos in completion:
        completion = completion[:completion.index(eos) + 1]
    return prompt_ids, completion


class TextSide:
    """A text model's tokenizer. Chat prompts use its chat template; plain-text prompts (strings) are
    tokenized with its special tokens, their completions followed by EOS."""

    placeholder_ids = None
    prompt_length_note = ""

    def __init__(self, tokenizer, key: str = "student.model.tokenizer"):
        self.tokenizer = self.preprocessor = tokenizer
        self.key = key
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def _render(self, messages, add_generation_prompt) -> list:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=True, return_dict=True)
        return list(out["input_ids"])

    def encode_prompt(self, example: Example) -> list:
        if isinstance(example.prompt, str):
            return self.tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
        return self._render(example.prompt, True)

    def encode(self, example: Example, text: str = None) -> tuple:
        """(prompt ids, completion ids) of ``example`` with ``text`` (default: its completion) as the
        assistant turn; completion ids end with EOS / end of turn (before truncation)."""
        text = example.completion if text is None else text
        if isinstance(example.prompt, str):
            return (self.encode_prompt(example),
                    self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos])
        return split_completion(self._render, example.prompt, {"role": "assistant", "content": text},
                                self.eos, self.key)

    def batch(self, samples: list) -> dict:
        """A micro-step's tensors: right-padded ids, attention mask, loss mask over completion tokens."""
        return sequence_tensors([(s.prompt_ids, s.completion_ids) for s in samples], self.pad)

    # ---- the dataset step
    def check_columns(self, dataset) -> None:
        chat = "messages" in dataset.column_names or (
            "prompt" in dataset.column_names and not _is_string_column(dataset.data.column("prompt")))
        if chat and not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"config key '{self.key}': the tokenizer has no chat template, and the data is "
                              "conversational (chat messages); use a chat model's tokenizer or set its chat_template "
                              "(tokenizer_config.json), or give prompt/completion strings (plain text)")
        if "images" in dataset.column_names and _holds_lists(dataset.data.column("images")):
            raise ConfigError("the dataset has an 'images' column but the student is a text-only model: set "
                              "student.model.processor (and teacher.model.processor) to vision-language processors, "
                              "or drop the column")

    def encode_rows(self, examples: list) -> list:
        """``encode`` of many examples, with one batched tokenizer call per kind of text."""
        tok, chat = self.tokenizer, [i for i, ex in enumerate(examples) if not isinstance(ex.prompt, str)]
        plain = [i for i, ex in enumerate(examples) if isinstance(ex.prompt, str)]
        out = [None] * len(examples)
        if plain:
            prompts = tok([examples[i].prompt for i in plain], add_special_tokens=True)["input_ids"]
            completions = tok([examples[i].completion for i in plain], add_special_tokens=False)["input_ids"]
            for i, p, c in zip(plain, prompts, completions):
                out[i] = (p, c + [self.eos])
        if chat:
            convs = [examples[i].prompt for i in chat]
            texts = tok.apply_chat_template(convs, add_generation_prompt=True, tokenize=False)
            texts += tok.apply_chat_template([list(c) + [{"role": "assistant", "content": examples[i].completion}]
                                              for i, c in zip(chat, convs)], add_generation_prompt=False,
                                             tokenize=False)
            ids = tok(texts, add_special_tokens=False)["input_ids"]
            for k, i in enumerate(chat):
                out[i] = split_ids(ids[k], ids[len(chat) + k], self.eos, self.key)
        return out

    def prompt_from_ids(self, ids: list, example: Example) -> list:
        return ids

    def fingerprint(self) -> str:
        return tokenizer_fingerprint(self.tokenizer)


def _is_string_column(column) -> bool:
    import pyarrow as pa
    return pa.types.is_string(column.type) or pa.types.is_large_string(column.type)


def _holds_lists(column) -> bool:
    """Whether an Arrow list column has a non-empty entry."""
    import pyarrow as pa
    import pyarrow.compute as pc
    if not pa.types.is_list(column.type) and not pa.types.is_large_list(column.type):
        return column.null_count < len(column)
    return bool((pc.max(pc.list_value_length(column)).as_py() or 0) > 0)


def tokenizer_fingerprint(tok) -> str:
    """A digest of what a tokenizer does to text: its serialized pipeline (or vocabulary), special
    tokens and chat template."""
    core = tok.backend_tokenizer.to_str() if getattr(tok, "is_fast", False) else json.dumps(
        sorted(tok.get_vocab().items()))
    parts = [type(tok).__name__, core, json.dumps(tok.special_tokens_map, sort_keys=True, default=str),
             json.dumps(getattr(tok, "chat_template", None), sort_keys=True, default=str),
             str(tok.eos_token_id), str(tok.pad_token_id)]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()

