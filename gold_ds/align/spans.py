"""Byte offsets of tokens: which bytes of a completion's UTF-8 text each token stands for.

Tokenizers are sorted into three families, read from the fast tokenizer's backend (its model,
normalizer, pre-tokenizer and decoder):

* ``byte_level``: byte-level BPE (GPT-2, Llama-3, Qwen, Mistral's tekken). A piece is spelled in
  GPT-2's printable byte alphabet (``Ġ`` = space); inverting ``bytes_to_unicode`` gives its bytes.
* ``metaspace``: SentencePiece-style (Llama-2, Mistral v1, Unigram/Metaspace). ``▁`` is a space and,
  with byte fallback, ``<0xNN>`` is the byte NN. These tokenizers put a *dummy prefix* space in front
  of a text (Metaspace ``prepend_scheme`` "first"/"always", or the legacy ``Prepend("▁")``
  normalizer of ``add_dummy_prefix``); that space is not part of the text (see below).
* ``offsets``: any other fast tokenizer (WordPiece, BPE without a byte alphabet, ...). Its pieces
  cannot be mapped to bytes by themselves, so spans come from the offsets the tokenizer reports.

For the first two families a per-tokenizer table id -> bytes is built once and cached, so spans of
ids are one gather and one cumsum. Special tokens (EOS, BOS, ``<|im_end|>``, ``</s>``, unk, ...) are
zero-width. Non-special added tokens stand for their content's bytes.

The three ways to call :func:`byte_spans`:

* ``ids`` only (on-policy): spans over the concatenated bytes of the ids. A token may hold part of a
  UTF-8 character (byte fallback, byte-level pieces). For ``metaspace`` tokenizers with a dummy
  prefix, one leading space of the first byte-carrying token is dropped when that token's piece
  starts with ``▁``: this is the dummy prefix, so ids-mode spans equal text-mode spans of the same
  text (``token_bytes`` returns exactly the bytes the spans index; note that
  ``tokenizer.decode`` can differ: the Metaspace decoder drops *every* ``▁`` of the first token).
  ``offsets`` tokenizers decode the ids, re-encode the text and require the same ids back.
* ``text`` only (off-policy): the text is tokenized without special tokens; the spans tile the
  text's bytes exactly (checked). When the tokenizer's normalizer changes the text (NFKC, NFC,
  lowercasing, ...) the pieces cannot reconstruct it, and the spans come from the tokenizer's
  character offsets instead (made monotone; byte-fallback pieces of one character then collapse
  onto the first of them, the rest being zero-width).
* ``text`` and ``ids``: the ids are a slice of a chat-template rendering, whose bytes may hold
  template bytes around the text (``"[/INST] answer</s>"`` gives ``▁answer`` with the template's
  separator space; ChatML may add a newline token). The ids' raw bytes are used (no dummy prefix is
  dropped: the slice does not start a rendering) and the text's bytes are located in them: the first
  occurrence that starts at a token boundary or inside the first byte-carrying token, else the first
  occurrence. Spans are then shifted to the text and clipped to it: tokens before it are zero-width
  at 0, tokens after it zero-width at ``len(text bytes)``, a token straddling an edge is cut there.
  If the text's bytes do not occur, a ValueError says so.
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
    return f"{type(tokenizer).__name__}" + (f" ({path!r})" if path else "")


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other
    bytes get the code points 256, 257, ... in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


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


def _detect(backend, tokenizer) -> tuple[str, str, bool]:
    """(family, metaspace replacement, dummy prefix) from the backend's components."""
    model = _state(backend.model)
    model.pop("vocab", None)
    model.pop("merges", None)
    parts = {k: _state(getattr(backend, k)) for k in ("normalizer", "pre_tokenizer", "decoder")}
    nodes = [n for p in parts.values() for n in _walk(p)]
    types = {n.get("type") for n in nodes}
    # Subword markers (WordPiece "##", CLIP "</w>") are not bytes: leave those to offsets.
    marked = bool(model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"))
    if model.get("type") == "WordPiece" or marked:
        return "offsets", "", False
    if "ByteLevel" in types:
        return "byte_level", "", False
    metas = [n for n in nodes if n.get("type") == "Metaspace"]
    if metas:
        meta = metas[0]
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
    family, repl, dummy = _detect(backend, tokenizer)
    model = _state(backend.model)
    byte_fallback = bool(model.get("byte_fallback"))
    unk = model.get("unk_token")
    if unk is None and model.get("type") == "Unigram" and model.get("unk_id") is not None:
        unk = model["vocab"][model["unk_id"]][0]

    vocab = backend.get_vocab(with_added_tokens=True)
    added = {i: t for i, t in backend.get_added_tokens_decoder().items()}
    size = max(size, max(vocab.values(), default=-1) + 1)
    special_ids = {i for i, t in added.items() if t.special}
    special_ids.update(i for i in getattr(tokenizer, "all_special_ids", []) if i is not None)
    unk_id = vocab.get(unk, -1) if unk is not None else -1
    if unk_id >= 0:
        special_ids.add(unk_id)

    pieces: list = [None] * size
    fallback = [False] * size
    dummy_ok = [False] * size
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
    special = torch.zeros(size, dtype=torch.bool)
    if special_ids:
        special[torch.tensor(sorted(i for i in special_ids if 0 <= i < size), dtype=torch.long)] = True
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
            joined = b"".join(pieces)
            lengths = table.lengths[ids]
            if joined == target:
                return _spans_of_lengths(lengths)
            if table.family == "metaspace" and joined == b" " + target:
                # The dummy prefix: the first byte-carrying token's leading space.
                spans = _spans_of_lengths(lengths) - 1
                return spans.clamp_(min=0)
    # Offsets: `offsets` family, or a normalizer that changed the text. An unknown token stands for
    # the text it replaced here (in ids mode it has no bytes).
    zero = table.special[ids] & (ids != table.unk_id) if ids.numel() else torch.zeros(0, dtype=torch.bool)
    if table.family == "metaspace" and ids.numel() and table.pieces[enc.ids[0]] == b" " \
            and not text.startswith(" "):
        # A lone dummy-prefix piece is reported on the first character: it stands for no text byte.
        zero = zero.clone()
        zero[0] = True
    spans = _spans_from_offsets(text, enc.offsets, zero)
    covered = int((spans[:, 1] - spans[:, 0]).sum()) if spans.numel() else 0
    if table.family == "offsets":
        return spans
    if covered == 0 and target:
        raise ValueError(f"{table.name} tokenized {text[:60]!r} into pieces that neither reconstruct "
                         f"its bytes nor report offsets")
    return spans


def _ids_bytes_and_spans(tokenizer, table: _Table, ids: torch.Tensor, strip_dummy: bool):
    """(bytes, spans) of ids: the concatenated bytes the ids stand for, and spans over them."""
    if table.family != "offsets":
        lengths = _table_lengths(table, ids, strip_dummy)
        spans = _spans_of_lengths(lengths)
        return None, spans
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
    table = _table(tokenizer)
    ids = _as_ids(ids)
    data, spans = _ids_bytes_and_spans(tokenizer, table, ids, strip_dummy=True)
    if data is not None:
        return data
    joined = b"".join(table.pieces[i] for i in ids.tolist())
    return joined[len(joined) - int(spans[-1, 1]):] if spans.numel() else b""


def _locate(data: bytes, target: bytes, spans: torch.Tensor) -> int:
    """Offset of `target` in `data` (the rule in the module docstring), or -1."""
    first = data.find(target)
    if first < 0 or not target:
        return max(first, 0) if target == b"" else first
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
    """[n_tokens, 2] int64 (start, end) byte offsets of each token in the completion's UTF-8 bytes.

    ids only: spans over the ids' bytes (on-policy); text only: the text is tokenized without
    special tokens (off-policy); both: ids of a chat-template rendering, spans relative to `text`'s
    bytes. See the module docstring for each rule. Zero-width tokens have start == end.
    """
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
    """Text-mode spans are ordered, inside the text and (for byte tables) tile it."""
    if spans.numel() == 0:
        return
    n = len(text.encode("utf-8"))
    ok = bool((spans[:, 0] <= spans[:, 1]).all()) and int(spans.min()) >= 0 and int(spans.max()) <= n
    ok = ok and bool((spans[1:, 0] >= spans[:-1, 1]).all())
    if not ok:
        raise AssertionError(f"gold_ds.align internal error: bad spans for {table.name} on {text[:60]!r}: "
                             f"{spans.tolist()[:20]}")
