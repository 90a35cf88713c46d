"""Byte offsets of tokens: which bytes of a completion's UTF-8 text each token stands for.

Tokenizers fall into three families, read from the fast tokenizer's backend (model, normalizer,
pre-tokenizer, decoder):

* ``byte_level``: byte-level BPE (GPT-2, Llama-3, Qwen, Mistral's tekken). Pieces are spelled in
  GPT-2's printable byte alphabet (``Ġ`` = space); inverting ``bytes_to_unicode`` gives their bytes.
* ``metaspace``: SentencePiece-style (Llama-2, Mistral v1, Unigram/Metaspace). ``▁`` is a space and,
  with byte fallback, ``<0xNN>`` is the byte NN. A *dummy prefix* space may be put in front of a text
  (Metaspace ``prepend_scheme`` "first"/"always", or the legacy ``Prepend("▁")`` normalizer of
  ``add_dummy_prefix``); it is not part of the text (see below).
* ``offsets``: any other fast tokenizer (WordPiece, BPE without a byte alphabet, ...): its pieces do
  not map to bytes by themselves, so spans come from the offsets the tokenizer reports.

For the first two families a table id -> bytes is built once per tokenizer and cached, so spans of
ids are one gather and one cumsum. Special tokens (EOS, BOS, ``<|im_end|>``, ``</s>``, unk, ...) are
zero-width; non-special added tokens stand for their content's bytes.

The three ways to call :func:`byte_spans`:

* ``ids`` only (on-policy): spans over the concatenated bytes of the ids; a token may hold part of a
  UTF-8 character (byte fallback, byte-level pieces). With a dummy prefix (``metaspace``), one leading
  space of the first byte-carrying token is dropped when its piece starts with ``▁``, so ids-mode
  spans equal text-mode spans of the same text; ``token_bytes`` returns exactly the bytes the spans
  index (``tokenizer.decode`` can differ: the Metaspace decoder drops *every* ``▁`` of the first
  token). ``offsets`` tokenizers decode the ids, re-encode the text and require the same ids back.
* ``text`` only (off-policy): the text is tokenized without special tokens; byte-table spans tile its
  bytes exactly. When the normalizer changes the text (NFKC, NFC, lowercasing, ...) the pieces cannot
  reconstruct it, and the spans come from the tokenizer's character offsets instead (made monotone;
  byte-fallback pieces of one character collapse onto the first of them, the rest zero-width).
* ``text`` and ``ids``: the ids are a slice of a chat-template rendering, whose bytes may hold template
  bytes around the text (``"[/INST] answer</s>"`` gives ``▁answer`` with the template's separator
  space; ChatML may add a newline token). The ids' raw bytes are used (no dummy prefix is dropped: the
  slice does not start a rendering) and the text's bytes are located in them: the first occurrence
  that starts at a token boundary or inside the first byte-carrying token, else the first occurrence
  (none: ValueError). Spans are shifted to the text and clipped to it: tokens before it are zero-width
  at 0, tokens after it zero-width at ``len(text bytes)``, a token straddling an edge is cut there.
"""

import json
import re
import weakref
from dataclasses import dataclass

import torch

__all__ = ["byte_spans", "token_bytes", "UnsupportedTokenizerError", "tokenizer_family"]

SUPPORTED = ("fast (tokenizers-backed) tokenizers of the families byte-level BPE (GPT-2 byte alphabet), "
             "SentencePiece/Metaspace (with or without byte fallback), or any other fast tokenizer "
             "that reports offsets (WordPiece, ...)")


class UnsupportedTokenizerError(ValueError):
    """The tokenizer cannot be mapped to bytes (no fast backend, or a family this module lacks)."""


def _name(tokenizer) -> str:
    path = getattr(tokenizer, "name_or_path", "") or ""
    return type(tokenizer).__name__ + (f" ({path!r})" if path else "")


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other
    bytes get the code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + k): b for k, b in enumerate(others)}}


_BYTE_DECODER = _gpt2_byte_decoder()
_FALLBACK_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _walk(component):
    """Yield every dict in a (possibly nested Sequence) backend component's JSON."""
    if isinstance(component, dict):
        yield component
        for value in component.values():
            if isinstance(value, (list, dict)):
                yield from _walk(value)
    elif isinstance(component, list):
        for value in component:
            yield from _walk(value)


def _state(component):
    return None if component is None else json.loads(component.__getstate__())


@dataclass
class _Table:
    """Per-tokenizer facts, built once (see ``_table``)."""
    family: str                    # "byte_level" | "metaspace" | "offsets"
    name: str
    size: int                      # len(tokenizer) when built
    pieces: list                   # per id: bytes (b"" for zero-width), or None when unmappable
    lengths: torch.Tensor          # [size] int64 byte length per id, -1 when unmappable
    special: torch.Tensor          # [size] bool: zero-width control tokens
    fallback: torch.Tensor         # [size] bool: byte-fallback piece <0xNN>
    dummy_prefix: bool             # metaspace tokenizer that prepends a space to a text
    dummy_ok: torch.Tensor         # [size] bool: piece starts with the metaspace replacement
    unk_id: int                    # the model's unknown token (-1: none)


_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _backend(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "encode") or not hasattr(backend, "get_vocab"):
        raise UnsupportedTokenizerError(
            f"gold_ds.align cannot map tokens of {_name(tokenizer)} to bytes: it has no `tokenizers` "
            f"backend (a slow or custom tokenizer). Supported: {SUPPORTED}.")
    return backend


def _detect(backend, model: dict) -> tuple[str, str, bool]:
    """(family, metaspace replacement, dummy prefix) from the backend's model state and components."""
    parts = {k: _state(getattr(backend, k)) for k in ("normalizer", "pre_tokenizer", "decoder")}
    nodes = [n for p in parts.values() for n in _walk(p)]
    types = {n.get("type") for n in nodes}
    # Subword markers (WordPiece "##", CLIP "</w>") are not bytes: leave those to offsets.
    marked = bool(model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"))
    if model.get("type") == "WordPiece" or marked:
        return "offsets", "", False
    if "ByteLevel" in types:
        return "byte_level", "", False
    meta = next((n for n in nodes if n.get("type") == "Metaspace"), None)
    if meta is not None:
        scheme = meta.get("prepend_scheme")
        if scheme is None:  # older serializations
            scheme = "always" if meta.get("add_prefix_space", True) else "never"
        return "metaspace", meta.get("replacement", "▁"), scheme in ("first", "always")
    # Legacy SentencePiece conversion: normalizer Prepend("▁") + Replace(" ", "▁"), decoder
    # Replace("▁", " ") (+ ByteFallback, Fuse, Strip).
    for n in _walk(parts["decoder"]):
        if n.get("type") == "Replace" and n.get("content") == " " and \
                isinstance(n.get("pattern"), dict) and len(n["pattern"].get("String", "")) == 1:
            repl = n["pattern"]["String"]
            prepend = any(m.get("type") == "Prepend" and m.get("prepend") == repl
                          for m in _walk(parts["normalizer"]))
            return "metaspace", repl, prepend
    return "offsets", "", False


def _table(tokenizer) -> _Table:
    """The cached table of `tokenizer` (rebuilt when its length changes, e.g. added tokens)."""
    size = len(tokenizer)
    try:
        cached = _TABLES.get(tokenizer)
    except TypeError:  # not weak-referenceable / hashable
        cached = getattr(tokenizer, "_gold_ds_align_table", None)
    if cached is not None and cached.size == size:
        return cached
    backend = _backend(tokenizer)
    model = _state(backend.model)
    family, repl, dummy = _detect(backend, model)
    byte_fallback = bool(model.get("byte_fallback"))
    unk = model.get("unk_token")
    if unk is None and model.get("type") == "Unigram" and model.get("unk_id") is not None:
        unk = model["vocab"][model["unk_id"]][0]

    vocab = backend.get_vocab(with_added_tokens=True)
    added = dict(backend.get_added_tokens_decoder())
    size = max(size, max(vocab.values(), default=-1) + 1)
    special_ids = {i for i, t in added.items() if t.special}
    special_ids.update(i for i in getattr(tokenizer, "all_special_ids", []) if i is not None)
    unk_id = vocab.get(unk, -1) if unk is not None else -1
    if unk_id >= 0:
        special_ids.add(unk_id)

    pieces: list = [None] * size
    fallback, dummy_ok = [False] * size, [False] * size
    for token, i in vocab.items():
        if i in special_ids:
            pieces[i] = b""
        elif i in added:
            pieces[i] = added[i].content.encode("utf-8")
        elif family == "byte_level":
            try:
                pieces[i] = bytes(_BYTE_DECODER[c] for c in token)
            except KeyError:
                pieces[i] = None
        elif family == "metaspace":
            m = _FALLBACK_PIECE.match(token) if byte_fallback else None
            if m:
                pieces[i] = bytes([int(m.group(1), 16)])
                fallback[i] = True
            else:
                pieces[i] = token.replace(repl, " ").encode("utf-8")
                dummy_ok[i] = token.startswith(repl)
    for i in special_ids:
        if 0 <= i < size:
            pieces[i] = b""
    lengths = torch.tensor([-1 if p is None else len(p) for p in pieces], dtype=torch.long)
    special = torch.tensor([i in special_ids for i in range(size)], dtype=torch.bool)
    table = _Table(family, _name(tokenizer), len(tokenizer), pieces, lengths, special,
                   torch.tensor(fallback), dummy, torch.tensor(dummy_ok), unk_id)
    try:
        _TABLES[tokenizer] = table
    except TypeError:
        tokenizer._gold_ds_align_table = table
    return table


def tokenizer_family(tokenizer) -> str:
    """"byte_level", "metaspace" or "offsets" (raises UnsupportedTokenizerError otherwise)."""
    return _table(tokenizer).family


def _as_ids(ids) -> torch.Tensor:
    ids = torch.as_tensor(ids if not isinstance(ids, torch.Tensor) else ids.detach().cpu(), dtype=torch.long)
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D (one sequence), got shape {tuple(ids.shape)}")
    return ids


def _check_range(table: _Table, ids: torch.Tensor):
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(table.pieces)):
        raise ValueError(f"ids out of range for {table.name} (vocabulary of {len(table.pieces)}): "
                         f"min {int(ids.min())}, max {int(ids.max())}")


def _spans_of_lengths(lengths: torch.Tensor) -> torch.Tensor:
    ends = torch.cumsum(lengths, 0)
    return torch.stack([ends - lengths, ends], 1)


def _table_lengths(table: _Table, ids: torch.Tensor, strip_dummy: bool) -> torch.Tensor:
    _check_range(table, ids)
    lengths = table.lengths[ids]
    bad = (lengths < 0).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"token id {int(ids[i])} (position {i}) of {table.name} has no known bytes "
                         f"({table.family} family); cannot compute byte spans")
    if strip_dummy and table.dummy_prefix:
        carrying = (lengths > 0).nonzero()
        if carrying.numel():
            first = int(carrying[0, 0])
            if bool(table.dummy_ok[ids[first]]):
                lengths = lengths.clone()
                lengths[first] -= 1
    return lengths


def _char_to_byte(text: str) -> torch.Tensor:
    """[len(text) + 1] byte offset of every character boundary."""
    if not text:
        return torch.zeros(1, dtype=torch.long)
    cp = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()
    width = 1 + (cp >= 0x80).long() + (cp >= 0x800).long() + (cp >= 0x10000).long()
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(width, 0)])


def _spans_from_offsets(text: str, offsets, zero_width: torch.Tensor) -> torch.Tensor:
    """Byte spans from character offsets: zero-width where `zero_width`; made monotone and
    non-overlapping (a token overlapping its predecessor keeps only the bytes after it)."""
    n = len(offsets)
    if n == 0:
        return torch.zeros(0, 2, dtype=torch.long)
    c2b = _char_to_byte(text)
    off = torch.tensor(offsets, dtype=torch.long).view(n, 2).clamp(0, len(text))
    start, end = c2b[off[:, 0]], c2b[off[:, 1]]
    end = torch.where(zero_width, torch.zeros_like(end), end)
    end = torch.cummax(end, 0).values
    prev = torch.cat([torch.zeros(1, dtype=torch.long), end[:-1]])
    start = torch.where(zero_width, end, torch.maximum(start, prev))
    start = torch.minimum(start, end)
    return torch.stack([start, end], 1)


def _text_spans(tokenizer, table: _Table, text: str) -> torch.Tensor:
    backend = _backend(tokenizer)
    enc = backend.encode(text, add_special_tokens=False)
    ids = torch.tensor(enc.ids, dtype=torch.long)
    target = text.encode("utf-8")
    if table.family != "offsets":
        _check_range(table, ids)
        pieces = [table.pieces[i] for i in enc.ids]
        if all(p is not None for p in pieces):
            joined, spans = b"".join(pieces), _spans_of_lengths(table.lengths[ids])
            if joined == target:
                return spans
            if table.family == "metaspace" and joined == b" " + target:  # the first piece's dummy prefix
                return (spans - 1).clamp_(min=0)
    # Offsets: `offsets` family, or a normalizer that changed the text. An unknown token stands for
    # the text it replaced here (in ids mode it has no bytes).
    zero = table.special[ids] & (ids != table.unk_id)
    if table.family == "metaspace" and ids.numel() and table.pieces[enc.ids[0]] == b" " \
            and not text.startswith(" "):
        zero[0] = True  # a lone dummy-prefix piece, reported on the first character: no text byte
    spans = _spans_from_offsets(text, enc.offsets, zero)
    if table.family != "offsets" and target and not bool((spans[:, 1] > spans[:, 0]).any()):
        raise ValueError(f"{table.name} tokenized {text[:60]!r} into pieces that neither reconstruct "
                         f"its bytes nor report offsets")
    return spans


def _ids_bytes_and_spans(tokenizer, table: _Table, ids: torch.Tensor, strip_dummy: bool):
    """(bytes, spans) of ids: the concatenated bytes the ids stand for, and spans over them."""
    if table.family != "offsets":
        return None, _spans_of_lengths(_table_lengths(table, ids, strip_dummy))
    _check_range(table, ids)
    keep = ~table.special[ids]
    kept = ids[keep].tolist()
    text = tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    again = _backend(tokenizer).encode(text, add_special_tokens=False)
    if again.ids != kept:
        raise ValueError(
            f"{table.name} ({table.family} family: no byte table) cannot give byte spans for these ids: "
            f"decoding them gives {text[:80]!r}, which re-encodes to different ids "
            f"({again.ids[:12]}... vs {kept[:12]}...)")
    inner = _spans_from_offsets(text, again.offsets, torch.zeros(len(kept), dtype=torch.bool))
    spans = torch.zeros(ids.numel(), 2, dtype=torch.long)
    spans[keep] = inner
    if (~keep).any():
        # specials: zero-width at the end of the bytes before them
        ends = torch.zeros(ids.numel(), dtype=torch.long)
        ends[keep] = inner[:, 1]
        ends = torch.cummax(ends, 0).values
        spans[~keep] = ends[~keep].unsqueeze(1).expand(-1, 2)
    return text.encode("utf-8"), spans


def token_bytes(tokenizer, ids) -> bytes:
    """The bytes that ``byte_spans(tokenizer, ids=ids)`` indexes (dummy prefix dropped)."""
    table, ids = _table(tokenizer), _as_ids(ids)
    data, spans = _ids_bytes_and_spans(tokenizer, table, ids, strip_dummy=True)
    if data is not None:
        return data
    joined = b"".join(table.pieces[i] for i in ids.tolist())
    return joined[len(joined) - int(spans[-1, 1]):] if spans.numel() else b""


def _locate(data: bytes, target: bytes, spans: torch.Tensor) -> int:
    """Offset of `target` in `data` (the rule in the module docstring), or -1."""
    first = data.find(target)
    if first < 0 or not target:  # an empty target is found at 0
        return first
    starts = set(spans[:, 0].tolist())
    carrying = (spans[:, 1] > spans[:, 0]).nonzero()
    first_end = int(spans[int(carrying[0, 0]), 1]) if carrying.numel() else 0
    pos = first
    while pos >= 0:
        if pos in starts or pos < first_end:
            return pos
        pos = data.find(target, pos + 1)
    return first


def byte_spans(tokenizer, text: str | None = None, ids=None) -> torch.Tensor:
    """[n_tokens, 2] int64 (start, end) byte offsets of each token in the completion's UTF-8 bytes:
    from ids (on-policy), text (off-policy) or both (a chat-template slice); rules in the module
    docstring. Zero-width tokens have start == end."""
    if text is None and ids is None:
        raise ValueError("byte_spans needs text, ids, or both")
    table = _table(tokenizer)
    if ids is None:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        spans = _text_spans(tokenizer, table, text)
        _self_check(table, text, spans)
        return spans
    ids = _as_ids(ids)
    if text is None:
        return _ids_bytes_and_spans(tokenizer, table, ids, strip_dummy=True)[1]
    data, spans = _ids_bytes_and_spans(tokenizer, table, ids, strip_dummy=False)
    if data is None:
        data = b"".join(table.pieces[i] for i in ids.tolist())
    target = text.encode("utf-8")
    at = _locate(data, target, spans)
    if at < 0:
        raise ValueError(f"the text's bytes do not occur in the bytes of the ids ({table.name}): "
                         f"text {text[:60]!r}..., ids decode to {data[:80]!r}...")
    return (spans - at).clamp_(0, len(target))


def _self_check(table: _Table, text: str, spans: torch.Tensor):
    """Text-mode spans are ordered, non-overlapping and inside the text."""
    if spans.numel() == 0:
        return
    n = len(text.encode("utf-8"))
    ok = bool((spans[:, 0] <= spans[:, 1]).all()) and int(spans.min()) >= 0 and int(spans.max()) <= n
    ok = ok and bool((spans[1:, 0] >= spans[:-1, 1]).all())
    if not ok:
        raise AssertionError(f"gold_ds.align internal error: bad spans for {table.name} on {text[:60]!r}: "
                             f"{spans.tolist()[:20]}")
