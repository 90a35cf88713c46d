"""Datasets: reading rows, turning them into (prompt, completion) examples, tokenizing them.

Two row formats (the field's usual ones):
- conversational: ``{"messages": [{"role": ..., "content": ...}, ...]}``. The final message must be an
  assistant turn: it is the completion; everything before it is the prompt. Rendered with the
  tokenizer's chat template.
- prompt/completion: ``{"prompt": ..., "completion": ...}``, either both message lists (rendered with
  the chat template, the completion being the assistant turn) or both strings (plain text: prompt
  tokens with the tokenizer's special tokens, completion tokens followed by EOS).
An optional ``answer`` column holds the exact-match target used by evaluation.

Tokenization (``encode_dataset``, with the student's side: ``gold_ds.data.render.TextSide`` or
``gold_ds.data.vlm.VLMSide``) and truncation rules:
- prompt ids = the template rendered with ``add_generation_prompt=True``; completion ids = what the
  full conversation adds after them, cut after the first EOS / end-of-turn token (so trailing
  template text such as a newline after ``<|im_end|>`` is not trained on).
- a prompt longer than ``max_prompt_length`` tokens is a bad row (never truncated: a cut prompt is a
  different task); a completion longer than ``max_completion_length`` keeps its first tokens.
- bad rows (``no_assistant_turn``, ``empty_completion``, ``prompt_too_long``; vision-language rows
  also ``missing_images``) are counted per reason
  and skipped, or raise ``BadRowError`` at the first one, per ``data.on_bad_row``.
"""
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Union

class BadRowError(ValueError):
    """A dataset row that cannot be trained on, with ``data.on_bad_row`` = ``error``."""


class BadRow(Exception):
    """Raised by a side's ``encode_row``: this row is bad for ``reason`` (one of the bad-row reasons)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Example:
    prompt: Union[list, str]
    """Chat messages before the completion, or plain prompt text."""
    completion: str
    answer: Optional[str] = None
    images: Optional[list] = None
    """Raw images of a vision-language row (PIL, paths, bytes), untouched; see ``gold_ds.data.vlm``."""


@dataclass
class Sample:
    """One sequence a micro-step trains on: prompt ids, completion ids (in one model's tokenization)
    and the example it comes from. A dataset row is a sample with the dataset's completion; rollouts
    make samples with sampled completions."""
    prompt_ids: list
    completion_ids: list
    example: Example


@dataclass
class EncodedDataset:
    rows: list
    bad_rows: Counter = field(default_factory=Counter)
    truncated_completions: int = 0

    def __len__(self):
        return len(self.rows)

    def add(self, index: int, example, prompt_ids, completion_ids, reason=None, detail: str = "", *,
            on_bad_row: str, max_completion_length: int) -> None:
        """Keep row ``index`` (its completion cut to ``max_completion_length`` tokens, counted), or,
        with a bad-row ``reason``, count it or raise ``BadRowError`` per ``on_bad_row``."""
        if reason is not None:
            if on_bad_row == "error":
                raise BadRowError(f"dataset row {index} is bad: {reason}{detail}; fix the data, or set "
                                  "data.on_bad_row=report to count and skip such rows")
            self.bad_rows[reason] += 1
            return
        if len(completion_ids) > max_completion_length:
            completion_ids = completion_ids[:max_completion_length]
            self.truncated_completions += 1
        self.rows.append(Sample(prompt_ids, completion_ids, example))

    def checked(self) -> "EncodedDataset":
        if not self.rows:
            raise BadRowError(f"no usable rows: {self.report()}")
        return self

    def report(self) -> str:
        bad = ", ".join(f"{k}={v}" for k, v in sorted(self.bad_rows.items())) or "none"
        return (f"{len(self.rows)} rows kept; bad rows skipped: {bad}; "
                f"completions truncated to max_completion_length: {self.truncated_completions}")


# ------------------------------------------------------------------------------------------ reading
def read_rows(source) -> list:
    """Rows of a ``DatasetSource`` as a list of dicts (local file, hub dataset, or a builtin task)."""
    if source.builtin is not None:
        from .builtin import builtin_rows
        return builtin_rows(source.builtin, source.split, source.num_examples, source.seed)
    import datasets
    path = source.path
    ext = os.path.splitext(path)[1].lower()
    if os.path.isfile(path):
        kind = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(ext)
        if kind is None:
            raise ValueError(f"dataset file {path!r}: unsupported extension {ext!r}; use .json, .jsonl or .parquet")
        ds = datasets.load_dataset(kind, data_files=path, split="train")
    elif ext in (".json", ".jsonl", ".parquet"):
        raise FileNotFoundError(f"dataset file {path!r} does not exist")
    else:
        ds = datasets.load_dataset(path, source.name, split=source.split)
    if source.num_examples is not None:
        ds = ds.select(range(min(source.num_examples, len(ds))))
    return list(ds)


def to_example(row: dict) -> Union[Example, str]:
    """A row as an ``Example``, or the reason it is bad."""
    answer = row.get("answer")
    answer = None if answer is None else str(answer)
    if "messages" in row:
        msgs = list(row["messages"] or [])
        if not msgs or msgs[-1].get("role") != "assistant":
            return "no_assistant_turn"
        return _checked(Example(msgs[:-1], _text(msgs[-1]["content"]), answer))
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return _checked(Example(prompt, completion, answer))
        if isinstance(prompt, list) and isinstance(completion, list):
            if not completion or completion[-1].get("role") != "assistant":
                return "no_assistant_turn"
            return _checked(Example(list(prompt) + list(completion[:-1]), _text(completion[-1]["content"]), answer))
        raise ValueError(f"row has prompt of type {type(prompt).__name__} and completion of type "
                         f"{type(completion).__name__}: both must be strings or both message lists")
    raise ValueError(f"row with columns {sorted(row)}: expected a 'messages' column (conversational) "
                     "or 'prompt' and 'completion' columns")


def _text(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def _checked(ex: Example):
    return ex if ex.completion.strip() else "empty_completion"


# --------------------------------------------------------------------------------------- encoding
def encode_dataset(side, rows: list, max_prompt_length: int, max_completion_length: int,
                   on_bad_row: str = "report") -> EncodedDataset:
    """Tokenize every row once with ``side`` (a ``TextSide`` or a ``VLMSide``: the student's); bad rows
    are counted (or raise ``BadRowError``), never silently dropped."""
    side.check_rows(rows)
    out = EncodedDataset(rows=[])
    for i, row in enumerate(rows):
        ex = to_example(row)
        reason, detail, prompt_ids, completion_ids = (ex if isinstance(ex, str) else None), "", None, None
        if reason is None:
            try:
                prompt_ids, completion_ids = side.encode_row(ex, row)
            except BadRow as e:
                reason, detail = e.reason, f" ({e.detail})"
            else:
                if len(prompt_ids) > max_prompt_length:
                    reason = "prompt_too_long"
                    detail = (f" ({len(prompt_ids)} tokens{side.prompt_length_note} > data.max_prompt_length="
                              f"{max_prompt_length})")
        out.add(i, ex, prompt_ids, completion_ids, reason, detail, on_bad_row=on_bad_row,
                max_completion_length=max_completion_length)
    return out.checked()
