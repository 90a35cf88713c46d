"""The built-in image task and the tiny processors of the VLM presets, all built offline.

``shapes``: one filled shape (circle, square or triangle) in one of four colors (red, green, blue,
yellow) at a random size and place on a light 56x56 background, drawn with Pillow. Each row asks
either "What shape is this?" or "What color is the shape?"; the answer is one word (exact match).
Rows are conversational with an image part in the user turn and the PIL image in ``images``:

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "circle"}]}],
     "images": [<PIL.Image 56x56>], "answer": "circle"}

The ``train`` and ``eval`` splits are drawn from different seeds (``seed`` and ``seed + 1_000_003``).

Processors (``builtin:tiny-qwen2vl``, ``builtin:tiny-llava`` as ``*.model.processor``): each pairs
a PIL image processor (no torchvision) with a tokenizer trained here on the task's words:

- ``tiny-qwen2vl``: byte-level BPE, ChatML with ``<|vision_start|><|image_pad|><|vision_end|>`` for an
  image, ``Qwen2VLImageProcessorPil`` (56x56 -> 4x4 patches of 14 -> 4 image tokens after the 2x2
  merge). Ids: 0 ``<|endoftext|>`` (pad), 1 ``<|im_start|>``, 2 ``<|im_end|>`` (eos), 3
  ``<|vision_start|>``, 4 ``<|vision_end|>``, 5 ``<|image_pad|>``, 6 ``<|video_pad|>``.
- ``tiny-llava``: SentencePiece-style Unigram (Metaspace, byte fallback), a Llama-2 ``[INST]``
  template with ``<image>\\n`` for an image, ``CLIPImageProcessorPil`` (resize + crop to 32x32 ->
  4x4 patches of 8 -> 16 image tokens). Ids: 0 ``<pad>``, 1 ``<s>``, 2 ``</s>`` (eos), 3 ``<unk>``,
  4 ``<image>``, 5 ``[INST]``, 6 ``[/INST]``.

Both are deterministic (the presets' model configs name their vocabulary sizes and special ids).
"""
import random

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 30)}
QUESTIONS = {"shape": "What shape is this?", "color": "What color is the shape?"}
IMAGE_SIZE = 56
_EVAL_SEED_OFFSET = 1_000_003


def draw_shape(shape: str, color: str, rng: random.Random, size: int = IMAGE_SIZE):
    """A PIL RGB image with one filled ``shape`` of ``color`` (size and place from ``rng``)."""
    from PIL import Image, ImageDraw
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.randint(size // 5, size // 3)  # half extent
    cx, cy = rng.randint(r + 2, size - r - 3), rng.randint(r + 2, size - r - 3)
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def shapes_rows(num_examples: int, seed: int) -> list:
    """``num_examples`` rows of the shapes task (see the module docstring), deterministic in ``seed``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_examples):
        shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
        kind = rng.choice(sorted(QUESTIONS))
        answer = shape if kind == "shape" else color
        rows.append({
            "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[kind]}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "images": [draw_shape(shape, color, rng)],
            "answer": answer,
        })
    return rows


def shapes_split(split: str, num_examples, seed: int) -> list:
    if split not in ("train", "eval"):
        raise ValueError(f"builtin task 'shapes' has splits 'train' and 'eval', not {split!r}")
    n = {"train": 2000, "eval": 200}[split] if num_examples is None else num_examples
    return shapes_rows(n, seed if split == "train" else seed + _EVAL_SEED_OFFSET)


def _corpus() -> list:
    words = list(QUESTIONS.values()) + list(SHAPES) + sorted(COLORS) + ["system", "user", "assistant"]
    return words * 4 + [" ".join(words)]


QWEN_VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>"]

# ChatML with turns separated (not terminated) by a newline, so a rendered conversation ends with
# <|im_end|>; an image part is <|vision_start|><|image_pad|><|vision_end|>.
QWEN_VL_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "<|im_start|>{{ message['role'] }}{{ '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n' }}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)

LLAVA_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "[INST]", "[/INST]"]

# Llama-2 style: "<s>[INST] <image>\nWhat shape is this? [/INST]circle</s>"
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ bos_token }}[INST] "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{{ '\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} [/INST]"
    "{% elif message['role'] == 'assistant' %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ eos_token }}{% endif %}{% endfor %}"
)


def qwen_vl_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=QWEN_VL_SPECIALS, min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>", bos_token=None, unk_token=None,
        chat_template=QWEN_VL_TEMPLATE,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})


def llava_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    meta = dict(replacement="\u2581", prepend_scheme="first")
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Punctuation(behavior="isolated"),
                                                 pre_tokenizers.Metaspace(**meta)])
    from .tasks import stable_unigram_vocab
    corpus = _corpus()
    tok.train_from_iterator(corpus, trainer=trainers.UnigramTrainer(
        vocab_size=120, special_tokens=LLAVA_SPECIALS, unk_token="<unk>", show_progress=False))
    vocab = stable_unigram_vocab(tok, corpus, len(LLAVA_SPECIALS))
    # the answers follow "[/INST]" with no space: give each answer word a piece of its own (it would
    # otherwise be spelled letter by letter, and a teacher that says the word in one token would be
    # compared, row for row, with the student's first letter)
    pieces = {p for p, _ in vocab}
    vocab += [(w, 0.0) for w in list(SHAPES) + sorted(COLORS) if w not in pieces]
    vocab += [(f"<0x{b:02X}>", -100.0) for b in range(256)]
    tok.model = models.Unigram(vocab, unk_id=LLAVA_SPECIALS.index("<unk>"), byte_fallback=True)
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(**meta)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", chat_template=LLAVA_TEMPLATE,
                                   extra_special_tokens={"image_token": "<image>"})


def _qwen2vl_processor_class():
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class Qwen2VLImageProcessor(Qwen2VLProcessor):
        """Qwen2VLProcessor without its video processor: the stock __init__ requires one, and video
        processors need torchvision (not installable as a CPU build here)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return Qwen2VLImageProcessor


def tiny_qwen2vl_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    tok = qwen_vl_tokenizer()
    ip = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    return _qwen2vl_processor_class()(image_processor=ip, tokenizer=tok, chat_template=QWEN_VL_TEMPLATE)


def tiny_llava_processor():
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    tok = llava_tokenizer()
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)


BUILTIN_PROCESSORS = {"tiny-qwen2vl": tiny_qwen2vl_processor, "tiny-llava": tiny_llava_processor}
