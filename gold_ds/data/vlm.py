"""Vision-language data: raw images through the dataloader, one processor run per micro-step.

Rows are conversational (or prompt/completion message lists) whose user turns hold image parts
(``{"type": "image"}``), with an ``images`` column: one image per image part, in order, each a PIL
image, a file path, raw bytes, or a ``{"bytes": ..., "path": ...}`` dict (the datasets ``Image``
feature). The dataset step never decodes or processes an image:

- the dataset step (start-up, ``gold_ds.data.dataset.encode_table`` with the student's
  ``VLMSide``) renders each row's prompt and completion with the student *processor's* chat
  template and tokenizes them (no special tokens added: the template writes them), then expands
  every image token to the number of tokens the processor gives an image of that size
  (``processor._get_num_multimodal_tokens``; the size comes from the file header). So
  ``prompt_ids`` are the exact ids the model sees, ``len(completion_ids)`` is known for the window's
  normalization, and the prompt-length limit counts image tokens. The images stay raw in the
  encoded table (a path stays the path, bytes the bytes; a PIL image in a list of rows becomes PNG
  bytes) and reach ``Example.images`` as ``{"bytes", "path"}`` dicts, still undecoded.
- ``VLMSide.batch`` (per micro-step, called only for the current gradient-accumulation micro-step)
  runs the image processor on that micro-step's images and returns ``sequence_tensors`` plus
  the pixel inputs (``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids`` as the model needs).
  ``loss_mask`` covers the completion tokens only: prompt, image and padding positions are 0.
- A ``VLMSide`` is a side of the micro-step assembler (``gold_ds.data.assembler``): same family
  (``jsd``), both models read the student side's tensors; cross family (``uld`` / ``hybrid_uld``),
  each side renders with its own processor and template and gets its own pixel inputs from the same
  raw images (``gold_ds.data.cross_tokenizer``).

Truncation keeps the start: a completion keeps its first ``max_completion_length`` tokens (it holds
no image tokens); a prompt is never cut (an image's tokens are all or nothing), a longer one is a
bad row (``prompt_too_long``, counted or an error per ``data.on_bad_row``).

Memory: every pixel tensor this module hands out is registered in ``PIXELS`` (weak references), so
tests and ``bench/vlm.py`` measure how many are alive at any time.
"""
import hashlib
import io
import json
import os
import weakref

import torch

from ..config import ConfigError
from .batch import sequence_tensors
from .dataset import BadRow, BadRowError, Example
from .render import split_completion, tokenizer_fingerprint

_PROCESSORS = {}


# ------------------------------------------------------------------------------------------- loading
def load_processor(model_cfg):
    """The model's processor: ``builtin:<name>`` (built offline, ``gold_ds.data.vlm_tasks``), or a hub
    id / local dir (``AutoProcessor``). Cached per name: both models may name the same one."""
    name = model_cfg.processor
    if name not in _PROCESSORS:
        if name.startswith("builtin:"):
            from .vlm_tasks import BUILTIN_PROCESSORS
            key = name[len("builtin:"):]
            if key not in BUILTIN_PROCESSORS:
                raise ValueError(f"unknown builtin processor {name!r}; available: "
                                 + ", ".join(f"'builtin:{k}'" for k in BUILTIN_PROCESSORS))
            proc = BUILTIN_PROCESSORS[key]()
        else:
            from transformers import AutoProcessor
            proc = AutoProcessor.from_pretrained(name, trust_remote_code=model_cfg.trust_remote_code)
        tok = proc.tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        _PROCESSORS[name] = proc
    return _PROCESSORS[name]


def _open(image):
    from PIL import Image
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict):  # datasets' Image feature, undecoded
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image))
    if isinstance(image, (str, os.PathLike)):
        return Image.open(image)
    raise TypeError(f"an image must be a PIL image, a file path, bytes or a {{'bytes', 'path'}} dict, "
                    f"not {type(image).__name__}")


def load_image(image):
    """A raw image (PIL, path, bytes, dict) as an RGB PIL image (decodes it)."""
    img = _open(image)
    return img if img.mode == "RGB" else img.convert("RGB")


def image_size(image) -> tuple:
    """(height, width) of a raw image without decoding its pixels (a file's header only)."""
    w, h = _open(image).size
    return h, w


def image_parts(messages) -> int:
    """Number of image parts in chat messages."""
    n = 0
    for m in messages if isinstance(messages, list) else []:
        content = m.get("content")
        if isinstance(content, list):
            n += sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image")
    return n


# -------------------------------------------------------------------------------------- pixel memory
class PixelTracker:
    """Weak references to every pixel tensor handed out, to measure (not assume) what is alive."""

    def __init__(self):
        self._refs = []
        self.created = 0

    def register(self, tensors):
        for t in tensors:
            self._refs.append(weakref.ref(t))
            self.created += 1

    def live(self) -> tuple:
        """(count, bytes) of the registered tensors still alive."""
        self._refs = [r for r in self._refs if r() is not None]
        alive = [r() for r in self._refs]
        return len(alive), sum(t.numel() * t.element_size() for t in alive if t is not None)


PIXELS = PixelTracker()


# ------------------------------------------------------------------------------------ one model side
class MultimodalPrompt(list):
    """A prompt's token ids (image tokens expanded) that also carries its raw images. Generators
    call ``model_inputs()`` to get, for this one prompt, ``(per_token, stacked)``: per-token inputs
    (lists as long as the ids, to be padded like them) and tensors to concatenate over prompts on
    dim 0 (pixel rows / images, grids)."""

    def __init__(self, ids, images, side):
        super().__init__(ids)
        self.images, self._side = images, side

    def model_inputs(self) -> tuple:
        return self._side.prompt_inputs(self)

    def __reduce__(self):  # pickles (all_gather_object) as plain ids
        return (list, (list(self),))


class VLMSide:
    """One vision-language model's processor: a side (``gold_ds.data.render``) that renders examples
    and assembles its micro-step tensors."""

    prompt_length_note = ", image tokens included"

    def __init__(self, processor, key: str):
        self.processor, self.key = processor, key
        self.preprocessor = processor
        self.tokenizer = processor.tokenizer
        self.image_token = getattr(processor, "image_token", None)
        self.image_token_id = getattr(processor, "image_token_id", None)
        if self.image_token_id is None and self.image_token is not None:
            self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token is None or self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            raise ConfigError(f"{key}: the processor {type(processor).__name__} has no image token in its "
                              "tokenizer; use a vision-language model's processor (LLaVA, Qwen2-VL, ...)")
        self.token_types = "mm_token_type_ids" in getattr(processor, "model_input_names", [])
        video = getattr(processor, "video_token_id", None)
        self.placeholder_ids = [self.image_token_id] + ([video] if video is not None else [])
        """Tokens only the processor may place (never sampled in a completion)."""
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id

    # ---- rendering (no pixels)
    def image_tokens(self, sizes: list) -> list:
        """Tokens the processor gives each image of (height, width) ``sizes``."""
        if not sizes:
            return []
        return list(self.processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens)

    def expand(self, ids: list, images) -> list:
        counts = self.image_tokens([image_size(im) for im in images or []])
        found = ids.count(self.image_token_id)
        if found != len(counts):
            raise BadRowError(f"missing_images: the rendered prompt has {found} image token(s) "
                              f"({self.image_token!r}) but the row has {len(counts)} image(s)")
        out, k = [], 0
        for t in ids:
            if t == self.image_token_id:
                out += [t] * counts[k]
                k += 1
            else:
                out.append(t)
        return out

    def _render(self, messages, add_generation_prompt) -> list:
        text = self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_prompt(self, example: Example) -> MultimodalPrompt:
        if not isinstance(example.prompt, list):
            raise BadRowError("a vision-language row must be conversational (chat messages), not plain text")
        return MultimodalPrompt(self.expand(self._render(example.prompt, True), example.images), example.images, self)

    def encode(self, example: Example, text=None) -> tuple:
        """(prompt ids, completion ids) of ``example`` with ``text`` (default: its completion) as the
        assistant turn, in this processor's template; the completion ends at the first EOS / end of
        turn; image tokens expanded (the prompt is a ``MultimodalPrompt``)."""
        text = example.completion if text is None else text
        if not isinstance(example.prompt, list):
            raise BadRowError("a vision-language row must be conversational (chat messages), not plain text")
        prompt, completion = split_completion(
            self._render, example.prompt, {"role": "assistant", "content": [{"type": "text", "text": text}]},
            self.eos, self.key)
        return MultimodalPrompt(self.expand(prompt, example.images), example.images, self), completion

    # ---- pixels (per micro-step)
    def pixel_inputs(self, images_per_sample: list) -> dict:
        """The image processor's tensors for the images of some samples (flattened in order); {} when
        there are none. Every tensor is registered in ``PIXELS``."""
        flat = [load_image(im) for ims in images_per_sample for im in (ims or [])]
        if not flat:
            return {}
        out = self.processor.image_processor(images=flat, return_tensors="pt")
        out = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        PIXELS.register(out.values())
        return out

    def _token_types(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids == self.image_token_id).long()

    def batch(self, samples: list) -> dict:
        """One micro-step's tensors: ``sequence_tensors`` (right-padded ids, attention mask, loss mask
        over completion tokens only) plus the pixel inputs of the samples' images. The samples'
        prompt ids must be this side's rendering (image tokens expanded for these images)."""
        b = sequence_tensors([(s.prompt_ids, s.completion_ids) for s in samples], self.pad)
        for s in samples:
            if any(t in self.placeholder_ids for t in s.completion_ids):
                raise ValueError(f"{self.key}: a completion holds an image placeholder token: completions are text")
            want = sum(self.image_tokens([image_size(im) for im in s.example.images or []]))
            got = list(s.prompt_ids).count(self.image_token_id)
            if got != want:
                raise ValueError(f"{self.key}: a prompt has {got} image tokens but its images need {want}: "
                                 "prompt ids rendered by another processor?")
        b.update(self.pixel_inputs([s.example.images for s in samples]))
        if self.token_types:
            b["mm_token_type_ids"] = self._token_types(b["input_ids"])
        return b

    def prompt_inputs(self, prompt: MultimodalPrompt) -> tuple:
        per_token = {}
        if self.token_types:
            per_token["mm_token_type_ids"] = [int(t == self.image_token_id) for t in prompt]
        return per_token, self.pixel_inputs([prompt.images])

    # ---- the dataset step (start-up, no pixels; see ``gold_ds.data.dataset.encode_table``)
    def check_columns(self, dataset) -> None:
        if "images" in dataset.column_names:
            return
        probe = dataset.select(range(min(len(dataset), 64)))
        if any(image_parts(r.get("messages") or r.get("prompt")) for r in probe):
            raise ConfigError("the data's user turns hold image parts but the rows have no 'images' column: "
                              "add one (a list of PIL images, file paths or bytes per row, one per image part), "
                              "or map yours with data.*.columns")

    def encode_rows(self, examples: list) -> list:
        """``encode`` per example; bad-row reason ``missing_images``: image parts and images that do
        not pair up, or an image that cannot be opened (images are only opened for their size)."""
        out = []
        for ex in examples:
            ex.images = list(ex.images or [])
            try:
                out.append(self.encode(ex))
            except (BadRowError, FileNotFoundError, OSError, TypeError) as e:
                out.append(BadRow("missing_images", str(e)))
        return out

    def prompt_from_ids(self, ids: list, example: Example) -> MultimodalPrompt:
        return MultimodalPrompt(ids, example.images, self)

    def fingerprint(self) -> str:
        """The tokenizer's digest and the processor's configuration (image token counts follow it)."""
        parts = [tokenizer_fingerprint(self.tokenizer), type(self.processor).__name__,
                 json.dumps(getattr(self.processor, "chat_template", None), sort_keys=True, default=str)]
        for name in ("image_processor", "video_processor"):
            sub = getattr(self.processor, name, None)
            if sub is not None:
                parts += [type(sub).__name__, sub.to_json_string()]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


# ---------------------------------------------------------------------------------- the model pair
def _model_image_token_id(model_cfg):
    if model_cfg.config is not None:
        return model_cfg.config.get("image_token_id", model_cfg.config.get("image_token_index"))
    try:
        from transformers import AutoConfig
        c = AutoConfig.from_pretrained(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
    except Exception:  # noqa: BLE001 - not readable here: the model itself will complain
        return None
    return getattr(c, "image_token_id", getattr(c, "image_token_index", None))


_PROBE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Probe?"}]}]
_PROBE_SIZES = [(56, 56), (84, 140), (224, 224)]


def vlm_sides(cfg) -> tuple:
    """The student's and teacher's ``VLMSide`` (``cfg``: the ``RunConfig``), checked at start-up:
    each model's image token is its processor's, and with ``jsd`` both render alike."""
    s_cfg, t_cfg = cfg.student.model, cfg.teacher.model
    student = VLMSide(load_processor(s_cfg), "student.model.processor")
    teacher = VLMSide(load_processor(t_cfg), "teacher.model.processor")
    for side, mcfg, key in ((student, s_cfg, "student.model"), (teacher, t_cfg, "teacher.model")):
        model_id = _model_image_token_id(mcfg)
        if model_id is not None and model_id != side.image_token_id:
            raise ConfigError(
                f"mismatched image token semantics: {key} expects image token id {model_id} but its processor "
                f"({mcfg.processor!r}) writes {side.image_token!r} = id {side.image_token_id}; set "
                f"{key}.config.image_token_id to {side.image_token_id} or use the model's own processor")
    if not cfg.distill.cross_tokenizer:
        _check_same_family(student, teacher, s_cfg, t_cfg)
    return student, teacher


def _check_same_family(s, t, s_cfg, t_cfg) -> None:
    if s.tokenizer.get_vocab() != t.tokenizer.get_vocab():
        raise ConfigError(
            f"distill.loss='jsd' with a cross-family VLM pair (student processor {s_cfg.processor!r}, teacher "
            f"processor {t_cfg.processor!r} have different vocabularies): jsd compares the two models token by "
            "token; use a cross-tokenizer distill.loss ('hybrid_uld', 'byte_prefix_jsd', 'uld') for models of different families")
    s_n, t_n = s.image_tokens(_PROBE_SIZES), t.image_tokens(_PROBE_SIZES)
    s_ids, t_ids = s._render(_PROBE, True), t._render(_PROBE, True)
    if s.image_token_id != t.image_token_id or s_n != t_n or s_ids != t_ids:
        raise ConfigError(
            "mismatched image token semantics for distill.loss='jsd': the student's processor renders an "
            f"image as {s.image_token!r} (id {s.image_token_id}) x {s_n} tokens for sizes {_PROBE_SIZES}, the "
            f"teacher's as {t.image_token!r} (id {t.image_token_id}) x {t_n}"
            + ("" if s_ids == t_ids else ", and their chat templates render a prompt differently")
            + "; jsd needs identical inputs on both sides: give both models the same processor "
            "(student.model.processor = teacher.model.processor), or use a cross-tokenizer distill.loss ('hybrid_uld', 'byte_prefix_jsd', 'uld')")
