"""LoRA students with the real peft library, on 2 ZeRO-3 gloo ranks.

test_lora_training: with an adapter on every linear layer (and, in one case, the head trained
fully through ``modules_to_save``; in the other, the head frozen):
- the optimizer holds exactly the parameters that train (the adapter, in the first case);
- after four steps exactly those changed (adapter, and the head's trained copy in the second case),
  every base weight (the head's original included) is bit-for-bit unchanged;
- a micro-step's loss and the adapter's gradient (``safe_get_full_grad``), on the ``sharded`` and
  ``full`` logits paths, equal an fp64 reference (a plain peft model with the same weights and the
  plain generalized JSD formula) within 1e-5;
- a run interrupted by a checkpoint and resumed gives the uninterrupted run's losses exactly;
- the adapter export loads with ``PeftModel.from_pretrained`` on the base model and the merged export
  with ``from_pretrained``; both give the engine's logits within 1e-5.
test_lora_vllm_sync: after a training step and a sync, vLLM's log-probabilities equal the fp64 peft
model's (the merged model, computed as base + adapter) within 1e-4, and differ from the base model's.
The other tests: bad values and a missing peft fail at load naming the key; a target or a module to
save that matches nothing, and a layer peft cannot adapt, fail naming the key; ``all-linear`` takes
the decoder's (a vision-language model's language model's) linear layers only.
"""
import copy
import dataclasses
import json
import os

import pytest
import torch
import torch.distributed as dist

import reference_losses as ref
from conftest import assert_close, ds_section, llama_config, logged_losses, plain_model, run_ranks, tiny_raw

TOL = 1e-5
LORA = {"rank": 4, "alpha": 8.0, "target_modules": "all-linear"}


def _raw(out, modules_to_save=(), **top):
    raw = tiny_raw(out, **top)
    raw["student"]["lora"] = dict(LORA, modules_to_save=list(modules_to_save))
    raw["student"]["deepspeed"]["optimizer"]["params"]["lr"] = 1e-2
    raw["student"]["deepspeed"]["scheduler"] = {"type": "WarmupCosineLR",
                                                "params": {"total_num_steps": 8, "warmup_num_steps": 2}}
    return raw


def _plain_peft(cfg, state, dtype="float64"):
    """A plain (unpartitioned) peft model of the student's config and adapter, with ``state`` (the
    engine's consolidated state dict, peft's names)."""
    from gold_ds.engine.lora import apply_lora
    model = apply_lora(plain_model(cfg.student.model.config, dtype=dtype), cfg.student.lora, 0)
    missing, unexpected = model.load_state_dict({k: v.to(getattr(torch, dtype)) for k, v in state.items()}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model.eval()


def _gradients(tr, cfg, name):
    """Loss and adapter gradient of one micro-step per rank (uneven rows), sharded and full, against fp64."""
    from deepspeed.utils import safe_get_full_grad
    from gold_ds.data import Sample
    from gold_ds.trainer.collective import global_sum
    from gold_ds.trainer.objective import build_objective
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = tr.train_data
    samples = [Sample(r.prompt_ids, r.completion_ids, r.example) for r in rows[rank * 3:rank * 3 + 2 + rank]]
    sharded, full = (build_objective(dataclasses.replace(cfg.distill, logits=mode), tr.student, tr.teacher,
                                     tr.assembler, lambda _: None) for mode in ("sharded", "full"))
    trainable = [(n, p) for n, p in tr.student.module.named_parameters() if p.requires_grad]
    got = {}
    for mode, objective in (("sharded", sharded), ("full", full)):
        mb = tr.assembler.assemble(samples)
        loss, share = objective.loss(mb, objective.teacher_targets([mb])[0])
        tr.student.backward(loss * world, scale_wrt_gas=False)  # DeepSpeed averages: the sum's gradient
        got[mode] = (global_sum([share], tr.student.device)[0],
                     {n: safe_get_full_grad(p).double().clone() for n, p in trainable})
        frozen = [n for n, p in tr.student.module.named_parameters() if not p.requires_grad
                  and safe_get_full_grad(p) is not None]
        assert not frozen, f"{name} {mode}: frozen parameters got gradients: {frozen[:3]}"
        tr.student.optimizer.zero_grad()
    everyone = [None] * world
    dist.all_gather_object(everyone, samples)
    s_state = tr.student._zero3_consolidated_16bit_state_dict()
    t_state = tr.teacher._zero3_consolidated_16bit_state_dict()
    if rank == 0:
        student = _plain_peft(cfg, s_state)
        teacher = plain_model(cfg.teacher.model.config, t_state)
        vocab, total = len(tr.assembler.student.tokenizer), 0.0
        for s in everyone:
            mb = tr.assembler.assemble(s)
            mask = mb.student["loss_mask"]
            s_logits = student(input_ids=mb.student["input_ids"], attention_mask=mb.student["attention_mask"]).logits
            with torch.no_grad():
                t_logits = teacher(input_ids=mb.teacher["input_ids"], attention_mask=mb.teacher["attention_mask"]).logits
            total = total + ref.generalized_jsd(s_logits[:, :-1][mask][:, :vocab], t_logits[:, :-1][mask][:, :vocab],
                                                cfg.distill.beta, cfg.distill.temperature, reduction="sum")
        total.backward()
        want = dict(student.named_parameters())
        floor = max(p.grad.abs().max().item() for n, p in want.items() if p.requires_grad)
        assert floor > 0
        for mode, (loss, grads) in got.items():
            assert_close(torch.tensor(loss, dtype=torch.float64), total.detach(), f"{name} {mode} loss", TOL)
            assert sorted(grads) == sorted(n for n, p in want.items() if p.requires_grad)
            for n, g in grads.items():
                assert_close(g, want[n].grad, f"{name} {mode} grad {n}", TOL, floor)


def _lora_training(tmp):
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    from gold_ds.config import load_config
    from gold_ds.engine.weights import checkpoint_name
    from gold_ds.trainer import build_trainer
    rank = int(os.environ["RANK"])

    # the head frozen: only the adapters train
    cfg = load_config(raw=_raw(f"{tmp}/frozen-head", max_steps=4))
    tr = build_trainer(cfg)
    names = {n for n, p in tr.student.module.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names), sorted(names)[:5]
    assert len(names) == 2 * 7 * 2  # A and B of 7 linear layers in each of 2 decoder layers
    optimized = {id(p) for group in tr.student.optimizer.fp16_groups for p in group}
    assert optimized == {id(p) for n, p in tr.student.module.named_parameters() if n in names}
    before = {k: v.clone() for k, v in (tr.student._zero3_consolidated_16bit_state_dict() or {}).items()}  # rank 0's
    for _ in range(4):  # the warm-up's learning rates are 0, 0, then B leaves zero, then A moves too
        tr.train_step()
    after = tr.student._zero3_consolidated_16bit_state_dict()
    if rank == 0:
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == names, (sorted(changed - names)[:3], sorted(names - changed)[:3])
    _gradients(tr, cfg, "frozen head")
    tr.student.destroy()
    tr.teacher.destroy()

    # the head trained fully too: resume, exports, gradients
    interrupted, whole = f"{tmp}/interrupted", f"{tmp}/whole"
    build_trainer(load_config(raw=_raw(interrupted, ["lm_head"], max_steps=2,
                                       checkpoint={"every": 2, "keep_last": 1}))).train()
    build_trainer(load_config(raw=_raw(interrupted, ["lm_head"], max_steps=4)), resume=True).train()
    cfg = load_config(raw=_raw(whole, ["lm_head"], max_steps=4, export={"enabled": True, "merge_lora": True}))
    tr = build_trainer(cfg)
    names = {n for n, p in tr.student.module.named_parameters() if p.requires_grad}
    assert {n for n in names if ".lora_" not in n} == {"base_model.model.lm_head.modules_to_save.default.weight"}
    before = {k: v.clone() for k, v in (tr.student._zero3_consolidated_16bit_state_dict() or {}).items()}
    tr.train()
    probe = torch.tensor([tr.train_data[0].prompt_ids + tr.train_data[0].completion_ids])
    tr.student.eval()
    with torch.no_grad():
        engine_logits = tr.student(input_ids=probe).logits
    state = tr.student._zero3_consolidated_16bit_state_dict()
    if rank == 0:
        changed = {k for k in before if not torch.equal(before[k], state[k])}
        assert changed == names, (sorted(changed - names)[:3], sorted(names - changed)[:3])
        resumed, uninterrupted = logged_losses(interrupted), logged_losses(whole)
        assert sorted(resumed) == [1, 2, 3, 4] and resumed == uninterrupted, (resumed, uninterrupted)

        base_state = {checkpoint_name(k).replace(".original_module.", "."): v for k, v in state.items()
                      if ".lora_" not in k and ".modules_to_save." not in k}
        base = plain_model(cfg.student.model.config, base_state, dtype="float32")
        with torch.no_grad():
            moved = (base(input_ids=probe).logits - engine_logits).abs().max().item()
        assert moved > 1e-2, f"the adapter barely moved the model ({moved:.2e}): the test could not fail"
        adapter = PeftModel.from_pretrained(base, f"{whole}/export").eval()  # wraps base in place
        assert not any(f.startswith("model") for f in os.listdir(f"{whole}/export"))  # the adapter only
        merged = AutoModelForCausalLM.from_pretrained(f"{whole}/export-merged").eval()
        with torch.no_grad():
            for what, model in (("adapter export", adapter), ("merged export", merged)):
                diff = (model(input_ids=probe).logits - engine_logits).abs().max().item()
                assert diff <= TOL * engine_logits.abs().max().item(), f"{what}: logits off by {diff:.2e}"
    tr.student.train()
    _gradients(tr, cfg, "trained head")
    tr.student.destroy()
    tr.teacher.destroy()


def test_lora_training(tmp_path):
    run_ranks(_lora_training, 2, str(tmp_path), err_dir=str(tmp_path / "errors"))


# ----------------------------------------------------------------------------------------------------
def _lora_vllm_sync(tmp):
    import deepspeed
    from gold_ds.config import ModelConfig
    from gold_ds.config.schema import LoraConfig
    from gold_ds.data.tasks import train_arithmetic_tokenizer
    from gold_ds.engine.models import build_training_engine
    from gold_ds.engine.weights import gathered_weight_buckets
    from gold_ds.rollout.vllm_colocate import VLLMColocateGenerator
    from vllm_helpers import max_diff, model_logprobs, student_cfg, vllm_logprobs

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tok = train_arithmetic_tokenizer()
    lora = LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])
    engine = build_training_engine(ModelConfig(**student_cfg()), ds_section(2, 1, lr=5e-2), world, lora)
    gen = VLLMColocateGenerator(engine.module.config, tok, workdir=os.path.join(tmp, "vllm"), dtype="float32",
                                max_new_tokens=4, max_model_len=64, sleep_level=1, enforce_eager=True,
                                kv_cache_memory_bytes=32 << 20, seed=0, temperature=1.0)
    seqs = [tok.apply_chat_template([{"role": "user", "content": f"{10 + i}+{20 + 3 * i}="},
                                     {"role": "assistant", "content": str(30 + 4 * i)}], tokenize=True, return_dict=False)
            for i in range(2 * rank, 2 * rank + 2)]
    plen = [len(s) - 3 for s in seqs]
    ids = torch.tensor(seqs)
    for _ in range(2):  # two steps: B leaves zero, then A moves too
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    gen.generate([s[:n] for s, n in zip(seqs, plen)], 1, weights=gathered_weight_buckets(engine.module, 1 << 20))
    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        state = {n: p.data.clone() for n, p in engine.module.named_parameters()}
    cfg = type("Cfg", (), {"student": type("S", (), {"model": ModelConfig(**student_cfg()), "lora": lora})})
    adapted = _plain_peft(cfg, state)
    want = model_logprobs(adapted, seqs, plen)
    with adapted.disable_adapter():
        base = model_logprobs(adapted, seqs, plen)
    assert max_diff(want, base) > 1e-3, "the adapter barely moved the model: the test could not fail"
    diff = max_diff(vllm_logprobs(gen, seqs, plen), want)
    assert diff <= 1e-4, f"after a sync vLLM and the fp64 peft model differ by {diff:.2e}"


def test_lora_vllm_sync(tmp_path):
    from vllm_helpers import require_vllm
    require_vllm()
    run_ranks(_lora_vllm_sync, 2, str(tmp_path), err_dir=str(tmp_path / "errors"))


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora, needle", [
    ({"rank": 0}, "'student.lora.rank'"),
    ({"alpha": 0}, "'student.lora.alpha'"),
    ({"dropout": 1.0}, "'student.lora.dropout'"),
    ({"target_modules": "q_proj"}, "'student.lora.target_modules'"),
    ({"target_modules": []}, "'student.lora.target_modules'"),
    ({"modules_to_save": [""]}, "'student.lora.modules_to_save'"),
    ({"ranks": 4}, "'student.lora.ranks' is unknown"),
])
def test_bad_lora_values_fail_at_load(tmp_path, lora, needle):
    from gold_ds.config import ConfigError, load_config
    raw = tiny_raw(tmp_path)
    raw["student"]["lora"] = lora
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(raw=raw)


def test_merge_without_adapter_and_missing_peft_fail_at_load(tmp_path, monkeypatch):
    import importlib.util
    from gold_ds.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"'export\.merge_lora'"):
        load_config(raw=tiny_raw(tmp_path, export={"merge_lora": True}))
    raw = tiny_raw(tmp_path)
    raw["student"]["lora"] = {}
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(ConfigError, match=r"'student\.lora'.*pip install -e '\.\[lora\]'"):
        load_config(raw=raw)


@pytest.mark.parametrize("lora, needle", [
    ({"target_modules": ["q_proj", "qkv"]}, r"'student\.lora\.target_modules': 'qkv' matches no module.*q_proj, up_proj"),
    ({"target_modules": ["norm"]}, r"'student\.lora\.target_modules': peft cannot put a LoRA adapter.*model\.norm"),
    ({"modules_to_save": ["head"]}, r"'student\.lora\.modules_to_save': 'head' matches no module"),
])
def test_layers_peft_cannot_adapt_fail_naming_the_key(lora, needle):
    from gold_ds.config import ConfigError
    from gold_ds.config.schema import LoraConfig
    from gold_ds.engine.lora import apply_lora
    with pytest.raises(ConfigError, match=needle):
        apply_lora(plain_model(llama_config(), dtype="float32"), LoraConfig(**lora), 0)


def test_all_linear_skips_the_head_and_a_vision_tower():
    """``all-linear`` adapts the decoder's (a VLM's language model's) linear layers only."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from gold_ds.config.schema import LoraConfig
    from gold_ds.engine.lora import apply_lora
    with open(os.path.join(os.path.dirname(__file__), "..", "ds_configs", "vlm-same-family-jsd.json")) as f:
        kw = copy.deepcopy(json.load(f)["student"]["model"]["config"])
    vlm = AutoModelForImageTextToText.from_config(AutoConfig.for_model(kw.pop("model_type"), **kw))
    for model in (plain_model(llama_config(), dtype="float32"), vlm):
        linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        wrapped = apply_lora(model, LoraConfig(), 0)
        adapted = {n.removeprefix("base_model.model.") for n, m in wrapped.named_modules() if hasattr(m, "lora_A")}
        decoder = [n for n in linear if n.startswith("model.language_model." if model is vlm else "model.layers.")]
        assert adapted == set(decoder) and "lm_head" not in adapted
        assert len(decoder) < len(linear)


def test_adapter_is_checked_at_start_before_any_model_is_built(tmp_path):
    """build_trainer refuses a bad adapter from the model's meta-device skeleton, before the process
    group, the teacher SFT or any engine exists."""
    from gold_ds.config import ConfigError, load_config
    from gold_ds.trainer import build_trainer
    raw = tiny_raw(tmp_path)
    raw["teacher"]["sft"] = {"max_steps": 5, "deepspeed": ds_section(2, 1)}
    raw["student"]["lora"] = {"target_modules": ["q_proj", "qkv"]}
    with pytest.raises(ConfigError, match=r"'student\.lora\.target_modules': 'qkv' matches no module"):
        build_trainer(load_config(raw=raw))
    assert not dist.is_initialized()
