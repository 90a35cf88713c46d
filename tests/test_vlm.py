"""Vision-language distillation (tiny Qwen2-VL and tiny LLaVA, built offline).

References are independent of gold_ds.data.vlm: the processors' own ``apply_chat_template`` +
``processor(text=..., images=...)`` for inputs, pixel tensors and completion tokens; UTF-8 byte
counts of the completion texts for alignment coverage; weak references to every pixel tensor for the
memory claim.
"""
import copy
import io
import json
import os
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, run_ranks
from gold_ds.config import ConfigError, load_config
from gold_ds.data import TextSide, build_assembler
from gold_ds.data.cross_tokenizer import CrossTokenizerAssembler
from gold_ds.data.dataset import BadRowError, Sample, encode_dataset
from gold_ds.data import vlm as vlm_mod
from gold_ds.data.vlm import PIXELS, VLMSide, load_processor
from gold_ds.data.vlm_tasks import shapes_rows

PRESETS = {n: os.path.join(REPO, "ds_configs", f"vlm-{n}.json") for n in ("same-family-jsd", "cross-family-uld")}


def _preset(name, **top):
    raw = json.load(open(PRESETS[name]))
    raw.update(copy.deepcopy(top))
    return raw


def _side(name, key="student.model.processor"):
    return VLMSide(load_processor(NS(processor=f"builtin:{name}", trust_remote_code=False)), key)


def _mixed_rows(tmp_path, n=4, seed=3):
    """Shapes rows whose images are a PIL image, a file path, raw bytes, a {'bytes'} dict."""
    rows = shapes_rows(n, seed)
    for i, r in enumerate(rows):
        img = r["images"][0]
        if i % 4 == 1:
            path = str(tmp_path / f"img{i}.png")
            img.save(path)
            r["images"] = [path]
        elif i % 4 >= 2:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            r["images"] = [buf.getvalue()] if i % 4 == 2 else [{"bytes": buf.getvalue(), "path": None}]
    return rows


def _reference(proc, messages, images, text=None):
    """The processor's own rendering: (prompt ids, full-conversation ids, processor outputs)."""
    from PIL import Image
    if images and isinstance(images[0], dict):  # as stored: {"bytes", "path"}
        images = [im["path"] if im["bytes"] is None else im["bytes"] for im in images]
    pil = [im if isinstance(im, Image.Image) else Image.open(io.BytesIO(im)) if isinstance(im, bytes) else Image.open(im)
           for im in images]
    prompt, answer = messages[:-1], messages[-1]
    if text is not None:
        answer = {"role": "assistant", "content": [{"type": "text", "text": text}]}
    p = proc(text=[proc.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)],
             images=pil, return_tensors="pt")
    f = proc(text=[proc.apply_chat_template(prompt + [answer], tokenize=False)], images=pil, return_tensors="pt")
    return p["input_ids"][0].tolist(), f["input_ids"][0].tolist(), f


@pytest.mark.parametrize("name", ["tiny-qwen2vl", "tiny-llava"])
def test_raw_images_inputs_and_label_masks(name, tmp_path, monkeypatch):
    side = _side(name)
    rows = _mixed_rows(tmp_path)
    raw = [r["images"][0] for r in rows]
    data = encode_dataset(side, rows, max_prompt_length=64, max_completion_length=10)
    stored = [r.example.images[0] for r in data]
    # kept raw, undecoded: a path stays the path, bytes the same bytes, a PIL image its pixels as PNG bytes
    assert stored[1] == {"path": raw[1], "bytes": None}
    assert stored[2] == {"path": None, "bytes": raw[2]} and stored[3] == {"path": None, "bytes": raw[3]["bytes"]}
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored[0]["bytes"]))), np.asarray(raw[0]))
    seen = []
    real = vlm_mod.load_image
    monkeypatch.setattr(vlm_mod, "load_image", lambda im: seen.append(im) or real(im))
    batch = side.batch(list(data))
    assert seen == stored  # the stored raw images reach the assembler: decoded only there

    eos = side.tokenizer.eos_token_id
    pixels = []
    for b, r in enumerate(rows):
        prompt, full, out = _reference(side.processor, r["messages"], r["images"])
        assert full[:len(prompt)] == prompt
        completion = full[len(prompt):]
        completion = completion[:completion.index(eos) + 1]
        n = len(prompt) + len(completion)
        assert batch["input_ids"][b, :n].tolist() == full[:n]
        assert batch["attention_mask"][b].sum() == n
        # the loss mask covers exactly the completion tokens: row t predicts token t + 1
        mask = batch["loss_mask"][b].nonzero().flatten().tolist()
        assert mask == list(range(len(prompt) - 1, n - 1))
        assert batch["input_ids"][b, 1:][batch["loss_mask"][b]].tolist() == completion
        assert side.image_token_id in prompt and side.image_token_id not in completion
        pixels.append(out)
    assert torch.equal(batch["pixel_values"], torch.cat([o["pixel_values"] for o in pixels]))
    if "image_grid_thw" in pixels[0]:
        assert torch.equal(batch["image_grid_thw"], torch.cat([o["image_grid_thw"] for o in pixels]))
        for b, o in enumerate(pixels):
            k = int(o["input_ids"].shape[1])
            assert batch["mm_token_type_ids"][b, :k].tolist() == o["mm_token_type_ids"][0].tolist()


def test_cross_family_teacher_inputs_and_alignment(tmp_path):
    student, teacher = _side("tiny-llava"), _side("tiny-qwen2vl", "teacher.model.processor")
    rows = _mixed_rows(tmp_path)
    data = encode_dataset(student, rows, max_prompt_length=64, max_completion_length=10)
    samples = list(data)
    stok = student.tokenizer
    for r, text in zip(data[:2], ["a big blue circle!", "zweiundvierzig 42 é"]):  # on-policy-like texts
        samples.append(Sample(r.prompt_ids, stok(text, add_special_tokens=False)["input_ids"] + [stok.eos_token_id],
                                      r.example))
    last = data[-1]  # cut by the length limit: no end of turn
    samples.append(Sample(last.prompt_ids, last.completion_ids[:2], last.example))
    cb = CrossTokenizerAssembler(student, teacher, 64).assemble(samples)

    total = 0
    for b, s in enumerate(samples):
        text = stok.decode(s.completion_ids, skip_special_tokens=True)
        total += len(text.encode())
        finished = s.completion_ids[-1] == stok.eos_token_id
        msgs = [{"role": "user", "content": s.example.prompt[0]["content"]}, None]
        prompt, full, out = _reference(teacher.processor, msgs, s.example.images, text=text)
        want = full if finished else full[:-1]  # the teacher's rendering ends with its end of turn
        assert cb.teacher["input_ids"][b, :len(want)].tolist() == want
        assert cb.teacher["attention_mask"][b].sum() == len(want)
        assert cb.teacher["input_ids"][b, 1:][cb.teacher["loss_mask"][b]].tolist() == want[len(prompt):]
        ref_pixels = teacher.processor.image_processor(images=[vlm_mod.load_image(s.example.images[0])], return_tensors="pt")
        rows_per_image = cb.teacher["pixel_values"].shape[0] // len(samples)
        assert torch.equal(cb.teacher["pixel_values"][b * rows_per_image:(b + 1) * rows_per_image], ref_pixels["pixel_values"])
    c = cb.counters
    assert c["align/unaligned_samples"] == 0
    assert c["align/total_bytes"] == total and c["align/covered_bytes"] == total  # 100% of completion bytes aligned
    assert cb.student["pixel_values"].shape == (len(samples), 3, 32, 32)


def _check_message(text, *needles):
    assert all(n in text for n in needles), text


def test_validation_errors(tmp_path):
    same, cross = "same-family-jsd", "cross-family-uld"
    text_model = {"config": {"model_type": "llama", "vocab_size": 274, "hidden_size": 32, "num_hidden_layers": 1,
                             "num_attention_heads": 2}, "tokenizer": "builtin:arithmetic"}
    # a VLM student with a text-only teacher, and the reverse
    raw = _preset(same)
    raw["teacher"]["model"] = text_model
    with pytest.raises(ConfigError) as e:
        load_config(raw=raw)
    _check_message(str(e.value), "teacher.model.processor", "the student is a vision-language model")
    raw = _preset(same)
    raw["student"]["model"] = text_model
    with pytest.raises(ConfigError) as e:
        load_config(raw=raw)
    _check_message(str(e.value), "student.model.processor", "the teacher is a vision-language model")
    # image data with a text-only student: the builtin image task, and a file's images column
    raw = _preset(same)
    raw["student"]["model"] = raw["teacher"]["model"] = text_model
    raw["teacher"]["sft"]["max_steps"] = 0
    with pytest.raises(ConfigError) as e:
        load_config(raw=raw)
    _check_message(str(e.value), "data.train.builtin", "set student.model.processor")
    from gold_ds.data.tasks import train_arithmetic_tokenizer
    with pytest.raises(ValueError) as e:
        encode_dataset(TextSide(train_arithmetic_tokenizer()), shapes_rows(2, 0), 64, 8)
    _check_message(str(e.value), "text-only model", "student.model.processor")
    # cross family with jsd
    with pytest.raises(ConfigError) as e:
        build_assembler(load_config(raw=_preset(cross, distill={"loss": "jsd"})))
    _check_message(str(e.value), "cross-family", "cross-tokenizer distill.loss ('hybrid_uld', 'byte_prefix_jsd', 'uld')")
    # mismatched image token semantics: jsd with a processor that gives an image another token count
    from gold_ds.data import vlm_tasks

    def other():
        p = vlm_tasks.tiny_qwen2vl_processor()
        p.image_processor.max_pixels = p.image_processor.size["longest_edge"] = 224 * 224
        return p
    vlm_tasks.BUILTIN_PROCESSORS["tiny-qwen2vl-big"] = other
    try:
        raw = _preset(same)
        raw["teacher"]["model"]["processor"] = "builtin:tiny-qwen2vl-big"
        with pytest.raises(ConfigError) as e:
            build_assembler(load_config(raw=raw))
        _check_message(str(e.value), "mismatched image token semantics", "same processor")
    finally:
        del vlm_tasks.BUILTIN_PROCESSORS["tiny-qwen2vl-big"]
    # ... and a model whose image token id is not its processor's
    raw = _preset(cross)
    raw["student"]["model"]["config"]["image_token_id"] = 7
    with pytest.raises(ConfigError) as e:
        build_assembler(load_config(raw=raw))
    _check_message(str(e.value), "mismatched image token semantics", "student.model.config.image_token_id to 4")
    # missing images: no images column at all; an image part without its image; an unreadable file
    side = _side("tiny-qwen2vl")
    rows = shapes_rows(3, 0)
    with pytest.raises(ConfigError) as e:
        encode_dataset(side, [{k: v for k, v in r.items() if k != "images"} for r in rows], 64, 10)
    _check_message(str(e.value), "no 'images' column", "add one")
    rows[1]["images"] = []
    rows[2]["images"] = [str(tmp_path / "missing.png")]
    data = encode_dataset(side, rows, 64, 10)
    assert data.bad_rows == {"missing_images": 2} and len(data) == 1
    with pytest.raises(BadRowError) as e:
        encode_dataset(side, rows, 64, 10, on_bad_row="error")
    _check_message(str(e.value), "row 1 is bad: missing_images", "0 image(s)", "data.on_bad_row=report")
    # over-long prompts (image tokens count): counted and skipped, or an error naming the limit
    rows = shapes_rows(3, 0)
    assert not encode_dataset(side, rows, 20, 10).bad_rows  # 20 prompt tokens, 4 of them the image's
    with pytest.raises(BadRowError) as e:
        encode_dataset(side, rows, 8, 10)
    _check_message(str(e.value), "no usable rows", "prompt_too_long=3")
    with pytest.raises(BadRowError) as e:
        encode_dataset(side, rows, 8, 10, on_bad_row="error")
    _check_message(str(e.value), "prompt_too_long", "image tokens included", "data.max_prompt_length=8")
    # vLLM rollouts are not wired for vision-language models
    raw = _preset(same)
    raw["rollout"]["backend"] = "vllm_colocate"
    with pytest.raises(ConfigError) as e:
        load_config(raw=raw)
    _check_message(str(e.value), "rollout.backend", "vision-language rollouts run on 'transformers'")


# ------------------------------------------------------------------------------------ 2 ranks
def _tiny(name, out, data_path, lmbda, micro=2, ga=3):
    raw = _preset(name, output_dir=out, max_steps=1)
    raw["student"]["deepspeed"].update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=ga)
    raw["student"]["deepspeed"].pop("scheduler")
    raw["teacher"]["sft"]["max_steps"] = 0
    raw["data"] = {"train": {"path": data_path}, "max_prompt_length": 64, "max_completion_length": 10}
    raw["distill"]["lmbda"] = lmbda
    raw["rollout"]["max_new_tokens"] = 4
    raw["export"]["enabled"] = False
    raw["logging"]["progress_bar"] = False
    return load_config(raw=raw)


def _per_sample_bytes(side, images):
    out = side.pixel_inputs([images])
    return sum(t.numel() * t.element_size() for t in out.values())


def _two_ranks(tmp, data_path):
    import functools
    import torch.distributed as dist
    from gold_ds.engine.weights import gathered_weight_buckets
    from gold_ds.trainer import build_trainer
    paths = {json.loads(l)["images"][0] for l in open(data_path)}
    seen, live_at_exit, live_at_microstep = [], [], []
    real_load, real_pixels = vlm_mod.load_image, VLMSide.pixel_inputs
    vlm_mod.load_image = lambda im: seen.append(im) or real_load(im)

    def pixel_inputs(self, images):
        out = real_pixels(self, images)
        live_at_exit.append(PIXELS.live()[1])
        return out
    VLMSide.pixel_inputs = pixel_inputs
    micro, ga = 2, 3
    for name, lmbda in (("same-family-jsd", 0.5), ("cross-family-uld", 0.0)):
        tr = build_trainer(_tiny(name, os.path.join(tmp, name), data_path, lmbda, micro, ga))
        student, teacher = tr.assembler.student, tr.assembler.teacher
        cross = isinstance(tr.assembler, CrossTokenizerAssembler)
        assert isinstance(student, VLMSide) and cross == (name != "same-family-jsd")
        assemble = tr.assembler.assemble

        def probe(samples, counted=None):
            live_at_microstep.append(PIXELS.live())
            return assemble(samples, counted)
        tr.assembler.assemble = probe
        seen.clear(), live_at_exit.clear(), live_at_microstep.clear()
        m = tr.train_step()
        assert torch.isfinite(torch.tensor(m["loss"])) and m["loss"] > 0
        # raw images (the file's paths) reach the assembler unchanged: nothing decoded them before
        assert seen and all(p["bytes"] is None and p["path"] in paths for p in seen)
        # at the start of every micro-step no pixel tensor of an earlier one is alive (weakrefs) ...
        assert len(live_at_microstep) == ga and all(c == 0 for c, _ in live_at_microstep), live_at_microstep
        # ... and at no point more than one micro-step's (or one rollout chunk's) pixel bytes exist
        row = tr.train_data[0].example.images
        one = _per_sample_bytes(student, row) + (_per_sample_bytes(teacher, row) if cross else 0)
        assert 0 < max(live_at_exit) <= micro * one < ga * micro * one, (live_at_exit, one)
        if cross:
            assert m["align/coverage"] == 1.0 and m["align/unaligned_samples"] == 0
        else:
            assert 0 < m["on_policy_share"] < 1  # this seed draws both kinds of micro-step
        # on-policy rollouts with images, for the student and (its own rendering) the teacher
        rows = tr.train_data[:2]
        weights = functools.partial(gathered_weight_buckets, tr.student.module)  # the student's rollout syncs them
        for sample, prompts, side in ((lambda p, g: tr.rollout.sample(p, g, step=tr.step, weights=weights)[0],
                                       [r.prompt_ids for r in rows], student),
                                      (tr.teacher_generator.generate,
                                       [tr.assembler.teacher_prompt_ids(r) for r in rows], teacher)):
            out = sample(prompts, 2)
            assert len(out) == 4 and all(1 <= len(c) <= 4 for c in out)
            assert not any(t in side.placeholder_ids for c in out for t in c)
        tr.student.destroy()
        tr.teacher.destroy()
    dist.barrier()


def test_two_ranks_zero3(tmp_path):
    rows = shapes_rows(8, 5)
    data_path = tmp_path / "shapes.jsonl"
    with open(data_path, "w") as f:
        for i, r in enumerate(rows):
            path = str(tmp_path / f"img{i}.png")
            r["images"][0].save(path)
            f.write(json.dumps({**r, "images": [path]}) + "\n")
    run_ranks(_two_ranks, 2, str(tmp_path), str(data_path), err_dir=str(tmp_path / "errors"))
