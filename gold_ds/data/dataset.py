"""Datasets: reading a source, encoding it once into an Arrow table, reading its rows lazily.

Two row formats (the field's usual ones):
- conversational: ``{"messages": [{"role": ..., "content": ...}, ...]}``. The final message must be an
  assistant turn: it is the completion; everything before it is the prompt. Rendered with the
  tokenizer's chat template.
- prompt/completion: ``{"prompt": ..., "completion": ...}``, either both message lists (rendered with
  the chat template, the completion being the assistant turn) or both strings (plain text: prompt
  tokens with the tokenizer's special tokens, completion tokens followed by EOS).
An optional ``answer`` column holds the exact-match target used by evaluation; vision-language rows
have an ``images`` column (``gold_ds.data.vlm``). Columns named otherwise are mapped by
``data.*.columns``. Message keys whose value is null are dropped (Arrow gives every message the
union of all messages' keys, null where a message has none).

Encoding (``encode_table``, with the student's side: ``gold_ds.data.render.TextSide`` or
``gold_ds.data.vlm.VLMSide``) is one batched ``datasets.Dataset.map`` (``num_proc`` workers) that
adds int32 id columns next to the raw columns the later stages read; rules:
- prompt ids = the template rendered with ``add_generation_prompt=True``; completion ids = what the
  full conversation adds after them, cut after the first EOS / end-of-turn token (so trailing
  template text such as a newline after ``<|im_end|>`` is not trained on).
- a prompt longer than ``max_prompt_length`` tokens is a bad row (never truncated: a cut prompt is a
  different task); a completion longer than ``max_completion_length`` keeps its first tokens.
- bad rows (``no_assistant_turn``, ``empty_completion``, ``prompt_too_long``; vision-language rows
  also ``missing_images``) are counted per reason (the first few named by row index) and left out of
  the table; with ``data.on_bad_row`` = ``error`` the first one stops the run (``EncodedDataset.check``).
The table is cached on disk by ``gold_ds.data.cache``; ``EncodedDataset`` reads a micro-step's rows
from it when they are needed, so no rank holds the dataset's ids as Python objects.
"""
import glob
import os
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Union

from ..config import ConfigError, missing_local_path
from ..config.schema import DATA_COLUMNS as COLUMNS
PROMPT_IDS, COMPLETION_IDS = "gold_ds_prompt_ids", "gold_ds_completion_ids"
_REASON, _DETAIL, _TRUNCATED = "gold_ds_bad_reason", "gold_ds_bad_detail", "gold_ds_truncated"
_FILE_KINDS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
FIRST_BAD_ROWS = 5
"""Bad rows named (index, reason, detail) in the start-up report."""


class BadRowError(ValueError):
    """Data that stops the run: a bad row with ``data.on_bad_row`` = ``error``, a row of no known
    format, or no usable rows at all. The launcher reports it as one message, exit code 2."""


class BadRow(Exception):
    """Returned by a side's ``encode_rows`` for a row that is bad for ``reason`` (one of the bad-row reasons)."""

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


# ------------------------------------------------------------------------------------------ reading
def source_files(source, where: str) -> Optional[list]:
    """The local data files of ``source`` (a file, a glob, or a directory of shards), sorted; None for
    a builtin task or a hub dataset. ``where``: the config key of the source (``data.train``)."""
    path = source.path
    if source.builtin is not None:
        return None
    if glob.has_magic(path):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise ConfigError(f"config key '{where}.path': the pattern {path!r} matches no file")
    elif os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                       if os.path.splitext(f)[1].lower() in _FILE_KINDS and not f.startswith("."))
        if not files:
            raise ConfigError(f"config key '{where}.path': the directory {path!r} holds no .json, .jsonl or "
                              ".parquet file")
        if any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_info.json", "state.json")):
            raise ConfigError(f"config key '{where}.path': {path!r} is a dataset saved with save_to_disk; "
                              "export it with to_json or to_parquet and point the key at those files")
    elif os.path.splitext(path)[1].lower() in _FILE_KINDS or missing_local_path(path):
        raise ConfigError(f"config key '{where}.path': the dataset file {path!r} does not exist")
    else:
        return None  # a hub dataset id
    kinds = {os.path.splitext(f)[1].lower() for f in files}
    if not kinds <= set(_FILE_KINDS):
        bad = sorted(kinds - set(_FILE_KINDS))
        raise ConfigError(f"config key '{where}.path': unsupported file type(s) {bad} in {path!r}; use .json, "
                          ".jsonl or .parquet")
    if len({_FILE_KINDS[k] for k in kinds}) > 1:
        raise ConfigError(f"config key '{where}.path': {path!r} mixes JSON and Parquet files; use one format")
    return files


def open_source(source, where: str = "data.train"):
    """The rows of a ``DatasetSource`` as a ``datasets.Dataset`` (a builtin task, local files, or a hub
    dataset), with its columns mapped onto ``COLUMNS`` and only those kept, cut to ``num_examples``."""
    import datasets
    if source.builtin is not None:
        from .builtin import builtin_rows
        ds = datasets.Dataset.from_list(builtin_rows(source.builtin, source.split, source.num_examples, source.seed))
    else:
        files = source_files(source, where)
        if files is not None:
            if source.revision is not None:
                raise ConfigError(f"config key '{where}.revision': got {source.revision!r}, but {source.path!r} is "
                                  "local data; a revision names a commit of a hub dataset")
            kind = _FILE_KINDS[os.path.splitext(files[0])[1].lower()]
            if all(os.path.getsize(f) == 0 for f in files):
                raise ConfigError(f"config key '{where}.path': {source.path!r} is empty: no rows to train on")
            try:  # a directory: datasets picks the split's files by name (train-*, test.jsonl, ...)
                ds = (datasets.load_dataset(source.path, source.name, split=source.split) if os.path.isdir(source.path)
                      else datasets.load_dataset(kind, data_files=files, split="train"))
                ds.data.table.validate(full=True)  # e.g. strings that are not UTF-8 (read as they are)
            except Exception as e:  # noqa: BLE001 - a malformed file: name it and keep the cause
                inner = _reason(e)
                raise ConfigError(f"config key '{where}.path': cannot read {source.path!r} as {kind} "
                                  f"(one JSON object per line, UTF-8): {type(inner).__name__}: {_cause(inner)}") from e
        else:
            try:
                ds = datasets.load_dataset(source.path, source.name, split=source.split, revision=source.revision)
            except Exception as e:  # noqa: BLE001 - not found, offline, a bad name/split/revision
                what = ", ".join(f"{k}={v!r}" for k, v in (("name", source.name), ("split", source.split),
                                                            ("revision", source.revision)) if v is not None)
                raise ConfigError(f"config key '{where}.path': {source.path!r} is no local file or directory, and "
                                  f"cannot be loaded as a hub dataset ({what}; keys {where}.name/.split/.revision): "
                                  f"{type(e).__name__}: {_cause(e)}") from e
    ds = _map_columns(ds, source.columns or {}, where)
    if source.num_examples is not None and source.builtin is None:
        ds = ds.select(range(min(source.num_examples, len(ds))))
    return ds


def _reason(e: BaseException) -> BaseException:
    """The first error of a chain that is not one of ``datasets``' wrappers (the reader's own)."""
    chain = [e]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    return next((c for c in chain if not type(c).__module__.startswith("datasets")), e)


def _cause(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else "(no message)"


def _map_columns(ds, columns: dict, where: str):
    have = set(ds.column_names)
    missing = {ours: theirs for ours, theirs in columns.items() if theirs not in have}
    if missing:
        raise ConfigError(f"config key '{where}.columns': the dataset has no column "
                          + ", ".join(f"{theirs!r} (mapped to {ours!r})" for ours, theirs in missing.items())
                          + f"; its columns are {sorted(have)}")
    renames = {theirs: ours for ours, theirs in columns.items() if theirs != ours}
    shadowed = [ours for ours in renames.values() if ours in have and ours not in renames]
    ds = ds.remove_columns(shadowed).rename_columns(renames) if renames else ds
    names = set(ds.column_names)
    if "messages" not in names and not {"prompt", "completion"} <= names:
        raise ConfigError(f"config key '{where}': rows need a 'messages' column (conversational) or 'prompt' and "
                          f"'completion' columns; the dataset has {sorted(have)}: map yours with {where}.columns, "
                          'e.g. {"prompt": "question", "completion": "response"}')
    return ds.remove_columns([c for c in ds.column_names if c not in COLUMNS])


def _clean(messages: list) -> list:
    """Chat messages without the null-valued keys Arrow adds (also inside content parts)."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        if isinstance(m.get("content"), list):
            m["content"] = [{k: v for k, v in part.items() if v is not None} if isinstance(part, dict) else part
                            for part in m["content"]]
        out.append(m)
    return out


def to_example(row: dict) -> Union[Example, str]:
    """A row as an ``Example`` (with its ``images``, if any), or the reason it is bad."""
    answer = row.get("answer")
    answer = None if answer is None else str(answer)
    images = row.get("images")
    images = None if images is None else list(images)
    if row.get("messages") is not None or "prompt" not in row:
        if "messages" not in row:
            raise ValueError(f"row with columns {sorted(row)}: expected a 'messages' column (conversational) "
                             "or 'prompt' and 'completion' columns")
        msgs = _clean(row["messages"] or [])
        if not msgs or msgs[-1].get("role") != "assistant":
            return "no_assistant_turn"
        return _checked(Example(msgs[:-1], _text(msgs[-1].get("content")), answer, images))
    prompt, completion = row["prompt"], row.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return _checked(Example(prompt, completion, answer, images))
    if isinstance(prompt, list) and isinstance(completion, list):
        completion = _clean(completion)
        if not completion or completion[-1].get("role") != "assistant":
            return "no_assistant_turn"
        return _checked(Example(_clean(prompt) + completion[:-1], _text(completion[-1].get("content")), answer,
                                images))
    raise ValueError(f"row has prompt of type {type(prompt).__name__} and completion of type "
                     f"{type(completion).__name__}: both must be strings or both message lists, in every row "
                     "(a file that mixes the two is read column by column, and its values may change type)")


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content if part.get("type") == "text")


def _checked(ex: Example):
    return ex if ex.completion.strip() else "empty_completion"


# --------------------------------------------------------------------------------------- encoding
def _encode_batch(batch: dict, indices: list, *, side, max_prompt_length: int, max_completion_length: int) -> dict:
    """The map function: a batch of raw rows -> its id columns and bad-row reasons."""
    names = list(batch)
    rows = [{k: batch[k][j] for k in names} for j in range(len(indices))]
    examples, reasons, details = [], [None] * len(rows), [""] * len(rows)
    for j, row in enumerate(rows):
        try:
            ex = to_example(row)
        except ValueError as e:
            raise BadRowError(f"dataset row {indices[j]}: {e}") from None
        if isinstance(ex, str):
            reasons[j] = ex
        examples.append(ex)
    todo = [j for j in range(len(rows)) if reasons[j] is None]
    encoded = dict(zip(todo, side.encode_rows([examples[j] for j in todo])))
    prompt_ids, completion_ids, truncated = [], [], []
    for j in range(len(rows)):
        p = c = []
        got = encoded.get(j)
        if isinstance(got, BadRow):
            reasons[j], details[j] = got.reason, got.detail
        elif got is not None:
            p, c = got
            if len(p) > max_prompt_length:
                reasons[j] = "prompt_too_long"
                details[j] = f"{len(p)} tokens{side.prompt_length_note} > data.max_prompt_length={max_prompt_length}"
                p = c = []
        truncated.append(len(c) > max_completion_length)
        prompt_ids.append(list(p))
        completion_ids.append(list(c[:max_completion_length]))
    out = {PROMPT_IDS: prompt_ids, COMPLETION_IDS: completion_ids, _REASON: reasons, _DETAIL: details,
           _TRUNCATED: truncated}
    if "images" in batch:
        out["images"] = [None if ims is None else [_raw_image(im) for im in ims] for ims in batch["images"]]
    return out


def _raw_image(image) -> dict:
    """An image as stored: ``{"bytes", "path"}`` (a path is kept as the path, not read)."""
    if isinstance(image, dict):
        return {"bytes": image.get("bytes"), "path": image.get("path")}
    if isinstance(image, (bytes, bytearray)):
        return {"bytes": bytes(image), "path": None}
    if isinstance(image, (str, os.PathLike)):
        return {"bytes": None, "path": os.fspath(image)}
    import io
    buf = io.BytesIO()  # a PIL image (a list given to encode_dataset): its pixels as PNG
    image.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def encode_table(side, raw, max_prompt_length: int, max_completion_length: int, num_proc: int = 1,
                 work_dir: Optional[str] = None, desc: str = "[gold_ds] encoding"):
    """Encode ``raw`` (a ``datasets.Dataset`` from ``open_source``) with ``side``: (the kept rows as a
    ``datasets.Dataset`` with the id columns, the report's ``info`` dict). ``work_dir``: where the map
    writes its Arrow files (None: in memory)."""
    import datasets
    import numpy as np
    import pyarrow.compute as pc
    side.check_columns(raw)
    images = raw.features.get("images")
    if isinstance(images, datasets.List) and isinstance(images.feature, datasets.Image):
        raw = raw.cast_column("images", datasets.List(datasets.Image(decode=False)))  # never decoded here
    features = raw.features.copy()
    if images is not None:  # a plain struct, not the Image feature: save_to_disk would copy the files in
        features["images"] = datasets.List({"bytes": datasets.Value("binary"), "path": datasets.Value("string")})
    features.update({PROMPT_IDS: datasets.List(datasets.Value("int32")),
                     COMPLETION_IDS: datasets.List(datasets.Value("int32")),
                     _REASON: datasets.Value("string"), _DETAIL: datasets.Value("string"),
                     _TRUNCATED: datasets.Value("bool")})
    kw = dict(keep_in_memory=True) if work_dir is None else dict(cache_file_name=os.path.join(work_dir, "map.arrow"))
    mapped = raw.map(_encode_batch, batched=True, batch_size=256, with_indices=True, features=features,
                     num_proc=num_proc if num_proc > 1 and len(raw) > 1 else None, desc=desc,
                     load_from_cache_file=False, new_fingerprint=f"gold_ds-{os.getpid()}-{id(raw)}",
                     fn_kwargs=dict(side=side, max_prompt_length=max_prompt_length,
                                    max_completion_length=max_completion_length), **kw)
    reason = mapped.data.column(_REASON)
    ok = pc.is_null(reason)
    kept = np.flatnonzero(ok.to_numpy(zero_copy_only=False))
    first_bad = np.flatnonzero(pc.invert(ok).to_numpy(zero_copy_only=False))[:FIRST_BAD_ROWS]
    shown = mapped.select(first_bad) if len(first_bad) else None
    total = lambda values: int(pc.sum(pc.filter(values, ok)).as_py() or 0) if len(kept) else 0  # noqa: E731
    counts = pc.value_counts(pc.drop_null(reason)).to_pylist()
    info = {"source_rows": len(raw), "rows": len(kept),
            "bad_rows": dict(sorted((c["values"], c["counts"]) for c in counts)),
            "first_bad_rows": [] if shown is None else [[int(i), r, d] for i, r, d in
                                                        zip(first_bad, shown[_REASON], shown[_DETAIL])],
            "truncated_completions": total(mapped.data.column(_TRUNCATED).cast("int64")),
            "prompt_tokens": total(pc.list_value_length(mapped.data.column(PROMPT_IDS))),
            "completion_tokens": total(pc.list_value_length(mapped.data.column(COMPLETION_IDS)))}
    table = mapped.select(kept).remove_columns([_REASON, _DETAIL, _TRUNCATED])
    if work_dir is None:
        table = table.flatten_indices(keep_in_memory=True)
    return table, info


class EncodedDataset:
    """The kept rows of an encoded dataset: an Arrow table (memory-mapped when read from the cache)
    with the id columns beside the raw ones, read a micro-step at a time, and the encoding's report.

    ``info``: ``source_rows``, ``rows``, ``bad_rows`` (reason -> count), ``first_bad_rows`` ([index,
    reason, detail], the first ``FIRST_BAD_ROWS``), ``truncated_completions``, ``prompt_tokens``,
    ``completion_tokens``."""

    def __init__(self, table, info: dict, side, where: str = "data.train"):
        self.table, self.info, self.side, self.where = table, info, side, where

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i):
        """Row ``i`` as a ``Sample`` (a slice: a list of them)."""
        if isinstance(i, slice):
            return self.samples(range(*i.indices(len(self))))
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.samples([i % len(self)])[0]

    def samples(self, indices) -> list:
        """Rows ``indices`` (positions among the kept rows) as ``Sample``s, read from the table."""
        indices = [int(i) for i in indices]
        if not indices:
            return []
        cols = self.table[indices]
        out = []
        for j in range(len(indices)):
            row = {k: v[j] for k, v in cols.items() if k not in (PROMPT_IDS, COMPLETION_IDS)}
            ex = to_example(row)
            out.append(Sample(self.side.prompt_from_ids(cols[PROMPT_IDS][j], ex), cols[COMPLETION_IDS][j], ex))
        return out

    def head(self, n: int) -> "EncodedDataset":
        """The first ``n`` rows (evaluation's ``eval.num_examples``)."""
        return EncodedDataset(self.table.select(range(min(n, len(self)))), self.info, self.side, self.where)

    def has_answers(self) -> bool:
        if "answer" not in self.table.column_names:
            return False
        return all(a is not None for a in self.table["answer"])

    @property
    def bad_rows(self) -> Counter:
        return Counter(self.info["bad_rows"])

    @property
    def truncated_completions(self) -> int:
        return self.info["truncated_completions"]

    def check(self, on_bad_row: str) -> "EncodedDataset":
        """Raise ``BadRowError`` at the first bad row (``on_bad_row`` = ``error``) or with no rows left."""
        if on_bad_row == "error" and self.info["first_bad_rows"]:
            i, reason, detail = self.info["first_bad_rows"][0]
            raise BadRowError(f"{self.where}: dataset row {i} is bad: {reason}{f' ({detail})' if detail else ''}; "
                              "fix the data, or set data.on_bad_row=report to count and skip such rows")
        if not len(self):
            raise BadRowError(f"{self.where}: no usable rows: {self.report()}")
        return self

    def report(self) -> str:
        i = self.info
        bad = ", ".join(f"{k}={v}" for k, v in i["bad_rows"].items()) or "none"
        if i["first_bad_rows"]:
            bad += " (first: " + "; ".join(f"row {n} {r}" + (f" ({d})" if d else "")
                                           for n, r, d in i["first_bad_rows"]) + ")"
        tokens = f"; tokens: {i['prompt_tokens']:,} in prompts, {i['completion_tokens']:,} in completions"
        return (f"{i['rows']} rows kept of {i['source_rows']}; bad rows skipped: {bad}; "
                f"completions truncated to max_completion_length: {i['truncated_completions']}{tokens}")


def encode_dataset(side, rows, max_prompt_length: int, max_completion_length: int, on_bad_row: str = "report",
                   num_proc: int = 1) -> EncodedDataset:
    """Encode ``rows`` (a list of dicts or a ``datasets.Dataset``) in memory, without a cache: tests,
    benchmarks and library use (training goes through ``gold_ds.data.cache``)."""
    import datasets
    raw = rows if isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(list(rows))
    table, info = encode_table(side, raw, max_prompt_length, max_completion_length, num_proc)
    return EncodedDataset(table, info, side).check(on_bad_row)
