"""Chat rendering, once for every model: how a conversation becomes (prompt ids, completion ids).

A *side* is one model's view of the data: its tokenizer (or processor), how it renders an example,
and how it turns samples into a micro-step's tensors. Two kinds share one protocol:

- ``TextSide`` (here): a tokenizer with a chat template;
- ``gold_ds.data.vlm.VLMSide``: a vision-language processor (image tokens expanded, pixel inputs).

Protocol: ``tokenizer``, ``preprocessor`` (what an export saves beside the weights),
``placeholder_ids`` (tokens a sampler must never produce, or None), ``encode_prompt(example)``,
``encode(example, text=None) -> (prompt ids, completion ids)``, ``batch(samples) -> tensors``, and
for the dataset step ``check_rows(rows)``, ``encode_row(example, row)`` and ``prompt_length_note``.

Rendering rule (``split_completion``): prompt ids = the template rendered with
``add_generation_prompt=True``; completion ids = what the full conversation adds after them, cut
after the first EOS / end-of-turn token.
"""
from .batch import sequence_tensors
from .dataset import Example


def split_completion(render, prompt: list, assistant: dict, eos: int, who: str) -> tuple:
    """(prompt ids, completion ids) of chat messages ``prompt`` followed by the ``assistant`` message;
    ``render(messages, add_generation_prompt) -> ids`` is the side's template."""
    prompt_ids = render(prompt, True)
    full = render(list(prompt) + [assistant], False)
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
    def check_rows(self, rows: list) -> None:
        for i, row in enumerate(rows):
            if row.get("images"):
                raise ValueError(f"dataset row {i} has images but the student is a text-only model: set "
                                 "student.model.processor (and teacher.model.processor) to vision-language "
                                 "processors, or drop the 'images' column")

    def encode_row(self, example: Example, row: dict) -> tuple:
        return self.encode(example)

