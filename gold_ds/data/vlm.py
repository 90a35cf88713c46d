"""Vision-language data: raw images through the dataloader, one processor run per micro-step.

Rows are conversational (or prompt/completion message lists) whose user turns hold image parts
(``{"type": "image"}``), with an ``images`` column: one image per image part, in order, each a PIL
image, a file path, raw bytes, or a ``{"bytes": ..., "path": ...}`` dict (the datasets ``Image``
feature). The dataset step never decodes or processes an image:

- ``encode_dataset`` (start-up) renders each row's prompt and completion with the student
  *processor's* chat template and tokenizes them (no special tokens added: the template writes
  them), then expands every image token to the number of tokens the processor gives an image of
  that size (``processor._get_num_multimodal_tokens``; the size comes from the file header). So
  ``prompt_ids`` are the exact ids the model sees, ``len(completion_ids)`` is known for the window's
  normalization, and the prompt-length limit counts image tokens. The images stay in
  ``Example.images`` untouched.
- ``VLMSide.batch`` (per micro-step, called only for the current gradient-accumulation micro-step)
  runs the image processor on that micro-step's images and returns ``training_batch`` tensors plus
  the pixel inputs (``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids`` as the model needs).
  ``loss_mask`` covers the completion tokens only: prompt, image and padding positions are 0.
- ``VLMCrossTokenizerAssembler`` (cross family, ``uld`` / ``hybrid_uld``) is the text
  ``CrossTokenizerAssembler`` whose renderings go through each side's processor and template, plus
  each side's pixel inputs from the same raw images (see ``gold_ds/data/cross_tokenizer.py``).

Truncation keeps the start: a completion keeps its first ``max_completion_length`` tokens (it holds
no image tokens); a prompt is never cut (an image's tokens are all or nothing), a longer one is a
bad row (``prompt_too_long``, counted or an error per ``data.on_bad_row``).

Memory: every pixel tensor this module hands out is registered in ``PIXELS`` (weak references), so
tests and ``bench/vlm.py`` measure how many are alive at any time.
"""
import io
import os
import weakref

import torch

from .batch import training_batch
from .cross_tokenizer import CrossTokenizerAssembler
from .dataset import BadRowError, EncodedDataset, Example, to_example

_PROCESSORS = {}


class VLMConfigError(ValueError):
    """A student/teacher/data combination that cannot be distilled; the message names the fix."""


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


def row_has_images(row: dict) -> bool:
    if row.get("images"):
        return True
    return any(image_parts(row.get(k)) for k in ("messages", "prompt", "completion"))


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
    """One model's processor: renders examples and assembles its micro-step tensors."""

    def __init__(self, processor, key: str):
        self.processor, self.key = processor, key
        self.tokenizer = processor.tokenizer
        self.image_token = getattr(processor, "image_token", None)
        self.image_token_id = getattr(processor, "image_token_id", None)
        if self.image_token_id is None and self.image_token is not None:
            self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token is None or self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            raise VLMConfigError(f"{key}: the processor {type(processor).__name__} has no image token in its "
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
        prompt = self._render(example.prompt, True)
        full = self._render(list(example.prompt) + [{"role": "assistant", "content": [{"type": "text", "text": text}]}],
                            False)
        if full[:len(prompt)] != prompt:
            raise ValueError(f"{self.key}: the chat template does not render the prompt (add_generation_prompt="
                             "True) as a prefix of the full conversation, so the completion cannot be split off")
        completion = full[len(prompt):]
        if self.eos in completion:
            completion = completion[:completion.index(self.eos) + 1]
        ids = self.expand(prompt, example.images)
        return MultimodalPrompt(ids, example.images, self), completion

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
        """One micro-step's tensors: ``training_batch`` (right-padded ids, attention mask, loss mask
        over completion tokens only) plus the pixel inputs of the samples' images. The samples'
        prompt ids must be this side's rendering (image tokens expanded for these images)."""
        b = training_batch([(s.prompt_ids, s.completion_ids) for s in samples], self.pad)
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

    # ---- the dataset (start-up, no pixels)
    def encode_dataset(self, rows: list, max_prompt_length: int, max_completion_length: int,
                       on_bad_row: str = "report") -> EncodedDataset:
        """Like ``gold_ds.data.dataset.encode_dataset`` for image rows (bad-row reasons plus
        ``missing_images``: image parts and images that do not pair up, or an image that cannot be
        opened). Images are only opened for their size."""
        if any(image_parts(r.get("messages") or r.get("prompt")) for r in rows) and not any("images" in r for r in rows):
            raise VLMConfigError("the data's user turns hold image parts but the rows have no 'images' column: "
                                 "add one (a list of PIL images, file paths or bytes per row, one per image part)")
        out = EncodedDataset(rows=[])
        for i, row in enumerate(rows):
            ex = to_example(row)
            reason, detail, prompt_ids, completion_ids = (ex if isinstance(ex, str) else None), "", None, None
            if reason is None:
                ex.images = list(row.get("images") or [])
                try:
                    prompt_ids, completion_ids = self.encode(ex)
                except (BadRowError, FileNotFoundError, OSError, TypeError) as e:
                    reason, detail = "missing_images", f" ({e})"
                else:
                    if len(prompt_ids) > max_prompt_length:
                        reason = "prompt_too_long"
                        detail = (f" ({len(prompt_ids)} tokens, image tokens included, > data.max_prompt_length="
                                  f"{max_prompt_length})")
            out.add(i, ex, prompt_ids, completion_ids, reason, detail, on_bad_row=on_bad_row,
                    max_completion_length=max_completion_length)
        return out.checked()


# ------------------------------------------------------------------------------------- cross family
class VLMCrossTokenizerAssembler(CrossTokenizerAssembler):
    """``CrossTokenizerAssembler`` for two vision-language models: each side renders with its own
    processor's template (image tokens expanded its own way), and each side's batch carries its own
    pixel inputs from the same raw images. Alignment covers the completion text only (images hold
    no completion bytes)."""

    def __init__(self, student: VLMSide, teacher: VLMSide):
        super().__init__(student.tokenizer, teacher.tokenizer)
        self.student_side, self.teacher_side = student, teacher

    def _side(self, tokenizer):
        return self.teacher_side if tokenizer is self.teacher_tokenizer else self.student_side

    def teacher_prompt_ids(self, example: Example) -> list:
        return self.teacher_side.encode_prompt(example)

    def render(self, tokenizer, example: Example, text: str, finished: bool) -> tuple:
        prompt_ids, completion_ids = self._side(tokenizer).encode(example, text)
        if not finished and completion_ids and completion_ids[-1] == tokenizer.eos_token_id:
            completion_ids = completion_ids[:-1]
        return prompt_ids, completion_ids

    def assemble(self, samples: list):
        cb = super().assemble(samples)
        images = [s.example.images for s in samples]
        for side, b in ((self.student_side, cb.student), (self.teacher_side, cb.teacher)):
            b.update(side.pixel_inputs(images))
            if side.token_types:
                b["mm_token_type_ids"] = side._token_types(b["input_ids"])
        return cb


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


class VLMPair:
    """The student's and teacher's processors, checked at start-up (``cfg``: the ``RunConfig``)."""

    def __init__(self, cfg):
        s_cfg, t_cfg = cfg.student.model, cfg.teacher.model
        self.student = VLMSide(load_processor(s_cfg), "student.model.processor")
        self.teacher = VLMSide(load_processor(t_cfg), "teacher.model.processor")
        for side, mcfg, key in ((self.student, s_cfg, "student.model"), (self.teacher, t_cfg, "teacher.model")):
            model_id = _model_image_token_id(mcfg)
            if model_id is not None and model_id != side.image_token_id:
                raise VLMConfigError(
                    f"mismatched image token semantics: {key} expects image token id {model_id} but its processor "
                    f"({mcfg.processor!r}) writes {side.image_token!r} = id {side.image_token_id}; set "
                    f"{key}.config.image_token_id to {side.image_token_id} or use the model's own processor")
        self.cross = cfg.distill.loss != "jsd"
        if not self.cross:
            self._check_same_family(s_cfg, t_cfg)

    def _check_same_family(self, s_cfg, t_cfg):
        s, t = self.student, self.teacher
        if s.tokenizer.get_vocab() != t.tokenizer.get_vocab():
            raise VLMConfigError(
                f"distill.loss='jsd' with a cross-family VLM pair (student processor {s_cfg.processor!r}, teacher "
                f"processor {t_cfg.processor!r} have different vocabularies): jsd compares the two models token by "
                "token; use distill.loss='uld' or 'hybrid_uld' for models of different families")
        s_n, t_n = s.image_tokens(_PROBE_SIZES), t.image_tokens(_PROBE_SIZES)
        s_ids, t_ids = s._render(_PROBE, True), t._render(_PROBE, True)
        if s.image_token_id != t.image_token_id or s_n != t_n or s_ids != t_ids:
            raise VLMConfigError(
                "mismatched image token semantics for distill.loss='jsd': the student's processor renders an "
                f"image as {s.image_token!r} (id {s.image_token_id}) x {s_n} tokens for sizes {_PROBE_SIZES}, the "
                f"teacher's as {t.image_token!r} (id {t.image_token_id}) x {t_n}"
                + ("" if s_ids == t_ids else ", and their chat templates render a prompt differently")
                + "; jsd needs identical inputs on both sides: give both models the same processor "
                "(student.model.processor = teacher.model.processor), or use distill.loss='uld' / 'hybrid_uld'")

    def encode_dataset(self, rows, **kw):
        return self.student.encode_dataset(rows, **kw)

    def cross_assembler(self) -> VLMCrossTokenizerAssembler:
        return VLMCrossTokenizerAssembler(self.student, self.teacher)
