"""The engine on 2 DeepSpeed ranks (gloo, CPU), spawned from pytest, each test a run of its own.

test_step_gradient: the step's gradient is equal for GA=2 x micro 2 and GA=1 x micro 4, and equal to
an fp64 reference of the mean per-token generalized JSD over the whole window of both ranks
(``reference_losses``, the plain formula), on both logits paths (the GA=2 window's teacher targets
come from one teacher forward of both micro-steps).
test_partitioning: ZeRO-3 partitioning of both models, at construction and in the engines; a frozen
teacher, its decoder layers gathered as ZeRO-3 leaves (test_layer_leaves_config: when).
test_schedule: identical on/off-policy flags on all ranks. test_uneven_generation: generation with
uneven lengths. test_student_copy_generation: the default rollout on a plain copy of the student
(its sync cadence and weights, greedy parity with the ZeRO-3 model). test_rollouts: num_generations=2
and seq_kd, one rollout call each.

test_resume_export_wandb: a run resumed from a checkpoint reproduces the uninterrupted run's next
losses exactly; the export reloads with from_pretrained and gives the engine's logits; W&B offline
files hold the metrics.
"""
import glob
import json
import os

import pytest
import torch

import reference_losses as ref
from conftest import logged_losses, plain_model, run_ranks, tiny_raw

WORLD = 2


def _trainer(tmp, name, **top):
    from gold_ds.config import load_config
    from gold_ds.trainer import build_trainer
    cfg = load_config(raw=tiny_raw(os.path.join(tmp, name), **top))
    return build_trainer(cfg)


def _step_gradient(tmp, logits):
    import torch.distributed as dist
    from gold_ds.data import RankSampler

    grads_of, reference = {}, None
    for name, micro, ga in (("ga2x2", 2, 2), ("ga1x4", 4, 1)):
        tr = _trainer(tmp, name, micro=micro, ga=ga,
                      distill={"beta": 0.3, "temperature": 1.5, "lmbda": 0.0, "logits": logits})
        cfg, rank = tr.cfg, dist.get_rank()
        grads = _capture_step_gradients(tr.student)
        before = tr.student._zero3_consolidated_16bit_state_dict()
        teacher_state = tr.teacher._zero3_consolidated_16bit_state_dict()
        rows = tr.train_data
        idx = RankSampler(len(rows), rank, WORLD, cfg.seed, True).take(micro * ga)
        window = [None] * WORLD
        dist.all_gather_object(window, [(rows[i].prompt_ids, rows[i].completion_ids) for i in idx])
        tr.train_step()
        grads_of[name] = dict(grads)
        if name == "ga2x2" and rank == 0:
            reference = _reference_gradient(cfg, before, teacher_state, [s for w in window for s in w])
        tr.student.destroy()
        tr.teacher.destroy()

    if dist.get_rank() == 0:
        scale = max(g.abs().max().item() for g in reference.values())
        for k, g in reference.items():
            ga_diff = (grads_of["ga2x2"][k] - grads_of["ga1x4"][k]).abs().max().item()
            assert ga_diff <= 1e-5 * scale, f"{k}: GA=2x2 vs GA=1x4 gradients differ by {ga_diff:.2e}"
            ref_diff = (grads_of["ga2x2"][k] - g).abs().max().item()
            assert ref_diff <= 1e-5 * scale, f"{k}: gradient differs from the fp64 reference by {ref_diff:.2e}"


def _capture_step_gradients(engine):
    """Record the full (all-rank) gradient of every parameter just before the optimizer applies it."""
    from deepspeed.utils import safe_get_full_grad
    grads, step = {}, engine.step

    def recording_step():
        if engine.is_gradient_accumulation_boundary():
            for n, p in engine.module.named_parameters():
                grads[n] = safe_get_full_grad(p).double().clone()  # collective: every rank calls it
        step()
    engine.step = recording_step
    return grads


def _reference_gradient(cfg, student_state, teacher_state, sequences):
    """d/dW of (sum over all completion tokens of both ranks of the JSD) / (their number), fp64."""
    student = plain_model(cfg.student.model.config, student_state)
    teacher = plain_model(cfg.teacher.model.config, teacher_state)
    total, n = 0.0, 0
    for prompt, completion in sequences:
        ids = torch.tensor([list(prompt) + list(completion)])
        rows = slice(len(prompt) - 1, ids.shape[1] - 1)  # rows predicting the completion tokens
        with torch.no_grad():
            t = teacher(input_ids=ids).logits[0, rows]
        s = student(input_ids=ids).logits[0, rows]
        total = total + ref.generalized_jsd(s, t, cfg.distill.beta, cfg.distill.temperature, reduction="sum")
        n += len(completion)
    (total / n).backward()
    return {k: p.grad.detach() for k, p in student.named_parameters()}


@pytest.mark.parametrize("logits", ["full", "sharded"])
def test_step_gradient(tmp_path, logits):
    run_ranks(_step_gradient, WORLD, str(tmp_path), logits, err_dir=str(tmp_path / "errors"))


def _partitioning(tmp):
    """Models are built partitioned (zero.Init): before deepspeed.initialize, each rank's parameters
    are already placeholders holding ~1/world of the values, never a full copy; in the engines each
    rank holds ~1/world of each model; the teacher is frozen and never gets a gradient."""
    from gold_ds.engine import local_parameter_share
    from gold_ds.engine.models import build_model, training_ds_config
    from deepspeed.utils import z3_leaf_module
    tr = _trainer(tmp, "run")
    tr.train_step()
    for engine in (tr.student, tr.teacher):
        assert abs(local_parameter_share(engine) - 1 / WORLD) < 0.02, local_parameter_share(engine)
        leaves = {type(m).__name__ for m in engine.module.modules() if z3_leaf_module(m)}
        assert leaves == {"LlamaDecoderLayer"}, leaves  # gathered a layer at a time (with_layer_leaves)
    assert all(not p.requires_grad and p.grad is None for p in tr.teacher.module.parameters())
    model = build_model(tr.cfg.student.model, training_ds_config(tr.cfg.student.deepspeed, WORLD))
    params = list(model.parameters())
    assert all(p.numel() == 0 for p in params)  # no full tensor anywhere
    local = sum(p.ds_tensor.numel() for p in params)
    full = sum(p.ds_numel for p in params)
    assert abs(local / full - 1 / WORLD) < 0.02


def test_partitioning(tmp_path):
    run_ranks(_partitioning, WORLD, str(tmp_path), err_dir=str(tmp_path / "errors"))


def test_layer_leaves_config():
    """with_layer_leaves: a text model's decoder layers become ZeRO-3 leaves (DeepSpeed's default leaf
    classes kept), unless a layer has more than stage3_max_live_parameters parameters, the preset
    names its own leaf modules, or the stage is not 3."""
    from deepspeed.runtime.zero.leaf_module_config import DEFAULT_LEAF_MODULE_CLASSES
    from gold_ds.engine.models import with_layer_leaves
    from conftest import llama_config
    model = plain_model(llama_config(32), dtype="float32")
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    got = with_layer_leaves({"zero_optimization": zero}, model)
    assert got["zero_optimization"]["leaf_module"] == {"classes": list(DEFAULT_LEAF_MODULE_CLASSES) + ["LlamaDecoderLayer"]}
    assert "leaf_module" not in zero  # the caller's config is not changed
    fits = {"zero_optimization": dict(zero, stage3_max_live_parameters=layer)}
    assert "leaf_module" in with_layer_leaves(fits, model)["zero_optimization"]
    too_big = {"zero_optimization": dict(zero, stage3_max_live_parameters=layer - 1)}
    assert with_layer_leaves(too_big, model) == too_big
    own = {"zero_optimization": dict(zero, leaf_module={"classes": []})}
    assert with_layer_leaves(own, model) == own
    stage2 = {"zero_optimization": {"stage": 2}}
    assert with_layer_leaves(stage2, model) == stage2


def _student_copy(tmp):
    """rollout.student_copy: the copy's weights are the ZeRO-3 student's after a sync and stay those
    of the last sync in between (sync_every=2); its greedy completions equal the ZeRO-3 model's own;
    ranks whose samples end at different lengths generate independently (no collective per token)."""
    import functools
    import torch.distributed as dist
    from gold_ds.engine.weights import gathered_weight_buckets
    from gold_ds.rollout.factory import transformers_generator
    from gold_ds.rollout.transformers_generator import StudentCopyGenerator
    tr = _trainer(tmp, "run", max_steps=3, distill={"lmbda": 0.0},
                  rollout={"max_new_tokens": 4, "temperature": 1.0, "sync_every": 2})
    gen, rank = tr.rollout, dist.get_rank()
    assert isinstance(gen, StudentCopyGenerator) and gen.model is None  # built at the first sync
    zero3 = transformers_generator(tr.cfg, tr.student, tr.assembler.student, tr.micro_batch_size)
    weights = functools.partial(gathered_weight_buckets, tr.student.module)
    prompts = [r.prompt_ids for r in tr.train_data[rank * 3:rank * 3 + 2 + rank]]  # 2 vs 3 prompts

    def copy_equals_student():
        full = tr.student._zero3_consolidated_16bit_state_dict()  # collective; rank 0's holds the weights
        same = torch.tensor([float(rank != 0 or all(torch.equal(full[n], p) for n, p in gen.model.state_dict().items()))])
        dist.broadcast(same, src=0)
        return bool(same.item())

    for step, synced in ((0, True), (1, False), (2, True)):
        _, metrics = gen.sample(prompts, 2, step=step, weights=weights)
        assert not any(hasattr(p, "ds_id") for p in gen.model.parameters())  # a plain model, not partitioned
        assert ("time/weight_sync" in metrics) == synced, (step, metrics)
        assert copy_equals_student() == synced, step
        if synced:
            assert gen.generate(prompts, 1, greedy=True) == zero3.generate(prompts, 1, greedy=True)
        tr.train_step()  # off-policy: the student's weights move, the copy's wait for the next sync
    assert not copy_equals_student()

    first = gen.generate(prompts, 1, greedy=True, max_new_tokens=6)
    if rank == 0:
        gen.generator.eos_id = first[0][0]  # prompt 0 now ends after its first token
    else:
        unused = set(range(len(tr.assembler.student.tokenizer))) - {t for c in first for t in c}
        gen.generator.eos_id = min(unused)  # never produced greedily: every completion runs to the limit
    out = gen.generate(prompts, 1, greedy=True, max_new_tokens=6)
    assert len(out[0]) == 1 if rank == 0 else [len(c) for c in out] == [6, 6, 6]


def test_student_copy_generation(tmp_path):
    run_ranks(_student_copy, WORLD, str(tmp_path), err_dir=str(tmp_path / "errors"))


def _schedule(tmp):
    """Flags are drawn on rank 0 and broadcast: identical on every rank although the ranks' own RNGs
    differ; with lmbda=0.5 over many steps both kinds occur."""
    import torch.distributed as dist
    tr = _trainer(tmp, "run", distill={"lmbda": 0.5})
    flags = [tr._draw_policy(step) for step in range(40)]
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, flags)
    assert everyone[0] == everyone[1]
    drawn = [f for step in flags for f in step]
    assert 0 < sum(drawn) < len(drawn)
    local_rng = [None] * WORLD
    dist.all_gather_object(local_rng, torch.rand(1).item())
    assert local_rng[0] != local_rng[1]


def test_schedule(tmp_path):
    run_ranks(_schedule, WORLD, str(tmp_path), err_dir=str(tmp_path / "errors"))


def _uneven_generation(tmp):
    """Rank 0 stops after one token, rank 1 runs to the limit: synced generation (on the ZeRO-3
    model itself) neither hangs nor crashes."""
    import torch.distributed as dist
    tr = _trainer(tmp, "run", rollout={"max_new_tokens": 4, "student_copy": False})
    gen = tr.rollout
    rank = dist.get_rank()
    prompts = [r.prompt_ids for r in tr.train_data[rank * 3:rank * 3 + 2 + rank]]  # 2 vs 3 prompts
    first = gen.generate(prompts, 1, greedy=True, max_new_tokens=6)
    if rank == 0:
        gen.eos_id = first[0][0]  # the first greedy token of prompt 0 now ends it at once
    else:
        unused = set(range(len(tr.assembler.student.tokenizer))) - {t for c in first for t in c}
        gen.eos_id = min(unused)  # never produced greedily: every completion runs to the limit
    out = gen.generate(prompts, 1, greedy=True, max_new_tokens=6)
    if rank == 0:
        assert len(out[0]) == 1
    else:
        assert [len(c) for c in out] == [6, 6, 6]


def test_uneven_generation(tmp_path):
    run_ranks(_uneven_generation, WORLD, str(tmp_path), err_dir=str(tmp_path / "errors"))


def _rollouts(tmp):
    """num_generations=2 and seq_kd: one student call per window with every on-policy prompt (micro/2
    per on-policy micro-step, 2 completions each), one teacher call with every off-policy prompt; the
    window trains exactly the sampled tokens."""
    import torch.distributed as dist
    tr = _trainer(tmp, "run", distill={"lmbda": 0.5, "num_generations": 2, "seq_kd": True})
    calls = []

    def recording(who, generate):
        def call(prompts, g, **kw):
            out = generate(prompts, g, **kw)
            calls.append((who, len(prompts), g, sum(len(c) for c in out)))
            return out
        return call
    tr.rollout.generate = recording("student", tr.rollout.generate)
    tr.teacher_generator.generate = recording("teacher", tr.teacher_generator.generate)
    kinds = set()
    for _ in range(6):
        flags = tr._draw_policy(tr.step)
        calls.clear()
        metrics = tr.train_step()
        n_on = sum(flags)
        expected = ([("student", n_on * tr.micro_batch_size // 2, 2)] if n_on else []) + \
                   ([("teacher", (tr.ga - n_on) * tr.micro_batch_size, 1)] if n_on < tr.ga else [])
        assert [c[:3] for c in calls] == expected, (calls, expected)
        sampled = torch.tensor([float(sum(c[3] for c in calls))])
        dist.all_reduce(sampled)
        assert metrics["tokens"] == int(sampled.item())
        assert metrics["on_policy_share"] == n_on / tr.ga
        kinds.add(n_on)
    assert len(kinds) > 1


def test_rollouts(tmp_path):
    run_ranks(_rollouts, WORLD, str(tmp_path), err_dir=str(tmp_path / "errors"))


# ----------------------------------------------------------------------------------------------------
def _resume_export_wandb(tmp):
    import torch.distributed as dist
    from gold_ds.config import ConfigError, load_config
    from gold_ds.trainer import build_trainer

    def preset(out, **kw):
        raw = tiny_raw(out, **kw)
        raw["student"]["deepspeed"]["scheduler"] = {"type": "WarmupCosineLR",
                                                    "params": {"total_num_steps": 8, "warmup_num_steps": 2}}
        raw["distill"] = {"beta": 0.5, "lmbda": 0.5}
        raw["rollout"] = {"max_new_tokens": 4, "temperature": 1.0}
        return raw

    interrupted = os.path.join(tmp, "interrupted")
    whole = os.path.join(tmp, "whole")
    # interrupted after step 3, its last checkpoint at step 2: the resumed run redoes step 3
    build_trainer(load_config(raw=preset(interrupted, max_steps=3, checkpoint={"every": 2, "keep_last": 1}))).train()
    build_trainer(load_config(raw=preset(interrupted, max_steps=4)), resume=True).train()
    with pytest.raises(ConfigError, match="at step 2 and max_steps=2: nothing left to train"):
        build_trainer(load_config(raw=preset(interrupted, max_steps=2)), resume=True)
    other = preset(interrupted, max_steps=6)  # max_steps, beta may change; not the model, not GA
    other["student"]["model"]["config"]["hidden_size"] = 48
    other["student"]["deepspeed"]["gradient_accumulation_steps"] = 1
    other["distill"]["beta"] = 0.9
    with pytest.raises(ConfigError, match=r"checkpoint \S+step-2 was written by another run: "
                                          r"student.model.config.hidden_size was 32, now 48; "
                                          r"student.deepspeed.gradient_accumulation_steps was 2, now 1\. Resume"):
        build_trainer(load_config(raw=other), resume=True)
    raw = preset(whole, max_steps=4, export={"enabled": True}, eval={"every": 2, "num_samples": 4},
                 logging={"progress_bar": False, "wandb": {"enabled": True, "mode": "offline", "project": "t"}})
    raw["data"]["eval"] = {"builtin": "arithmetic", "split": "eval", "num_examples": 4}
    tr = build_trainer(load_config(raw=raw))
    tr.train()

    probe = torch.tensor([tr.train_data[0].prompt_ids + tr.train_data[0].completion_ids])
    tr.student.eval()
    with torch.no_grad():
        engine_logits = tr.student(input_ids=probe).logits
    if dist.get_rank() == 0:
        resumed, uninterrupted = logged_losses(interrupted), logged_losses(whole)
        assert sorted(resumed) == [1, 2, 3, 4] and sorted(uninterrupted) == [1, 2, 3, 4]
        with open(os.path.join(interrupted, "metrics.jsonl")) as f:  # every step once: step 3's first record dropped
            assert [r["step"] for r in map(json.loads, f) if "loss" in r] == [1, 2, 3, 4]
        assert resumed[3] == uninterrupted[3] and resumed[4] == uninterrupted[4], (resumed, uninterrupted)
        assert resumed[1] == uninterrupted[1]
        ckpts = sorted(d for d in os.listdir(os.path.join(interrupted, "checkpoints")) if d.startswith(("step-", "latest")))
        assert ckpts == ["latest", "step-2"], ckpts  # complete, renamed from step-2.tmp

        from transformers import AutoModelForCausalLM, AutoTokenizer
        exported = AutoModelForCausalLM.from_pretrained(os.path.join(whole, "export")).eval()
        with torch.no_grad():
            diff = (exported(input_ids=probe).logits - engine_logits).abs().max().item()
        assert diff <= 1e-6, f"exported model's logits differ by {diff:.2e}"
        tok = AutoTokenizer.from_pretrained(os.path.join(whole, "export"))
        assert tok.get_vocab() == tr.assembler.student.tokenizer.get_vocab()

        runs = glob.glob(os.path.join(whole, "wandb", "offline-run-*", "run-*.wandb"))
        assert len(runs) == 1, runs
        history = {}
        for rec in _wandb_records(runs[0]):
            if rec.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                history.setdefault(items["_step"], {}).update(items)
        assert {step: history[step]["loss"] for step in range(1, 5)} == uninterrupted
        for key in ("tokens", "time/rollout", "time/teacher", "time/student", "time/optimizer", "on_policy_share"):
            assert key in history[4], key
        assert all("eval/accuracy" in history[step] for step in (0, 2, 4))  # before, every 2 steps, after
        assert history[0]["data/train_rows"] == 64 and history[0]["data/truncated_completions"] == 0
        assert history[4]["eval/completions/_type"] == "table-file" and history[4]["eval/completions/nrows"] == 4


def _wandb_records(path):
    """The protobuf records of a W&B offline run file (a LevelDB-style log: a 7-byte header, then
    32 KiB blocks of chunks, each with a 7-byte header: crc32, little-endian length, chunk type)."""
    import struct
    from wandb.proto import wandb_internal_pb2
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, block, payload = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(payload)
            payload = b""
            yield rec


def test_resume_export_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_ranks(_resume_export_wandb, WORLD, str(tmp_path), err_dir=str(tmp_path / "errors"))
