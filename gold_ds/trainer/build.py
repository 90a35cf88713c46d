"""Building a run's parts, in order, on every rank: ``build_trainer(cfg, resume).train()``.

1. the micro-step assembler (tokenizers or processors, and the start-up checks that need them:
   ``ConfigError`` before any process group exists), the models' paths or hub ids, and a LoRA
   student's adapter checked on the model's meta-device skeleton;
2. the process group, world-size checks, seeds;
3. the data: each node's first rank encodes it with the student's side into the cache (or finds
   it there), the others wait, every rank memory-maps it (``gold_ds.data.cache``); the per-rank
   sampler, the metrics logger;
4. teacher SFT when ``teacher.sft.max_steps`` > 0 (``teacher_sft.py``);
5. the teacher's ZeRO-inference engine and the student's ZeRO-3 engine (collective);
6. the objective, the student's rollout (``rollout.backend``), the teacher's generator, evaluation;
7. with ``resume``: the latest checkpoint's engine, optimizer, RNG and trainer state.
"""
import functools
import json
import os
import random
import threading
import time

import torch
import torch.distributed as dist

from ..config import ConfigError, validate_world
from ..data import BadRowError, RankSampler, build_assembler
from ..data.cache import encode_cached, open_cached
from ..engine.checkpoint import latest_checkpoint, load_checkpoint, trainer_state
from ..engine.lora import check_lora
from ..engine.models import build_inference_engine, build_training_engine, check_model_source
from ..rollout.factory import build_rollout, transformers_generator
from .collective import init_distributed
from .evaluate import Evaluator
from .logging import MetricsLogger, seconds_since_launch
from .loop import Trainer, run_identity
from .objective import build_objective, logits_path
from .stop import note_rank_processes
from .teacher_sft import teacher_sft


def _load_data(cfg, side, split: str, device, say):
    """``data.<split>`` encoded into the cache by each node's local rank 0 and opened memory-mapped
    by every rank (collective). The encoders work in a thread while every rank meets in a small
    all_reduce every few seconds, so a long encoding never runs into the process group's timeout.
    A failure on an encoding rank is raised on every rank."""
    source, where = getattr(cfg.data, split), f"data.{split}"
    root = cfg.data.cache_dir or os.path.join(cfg.output_dir, "data_cache")
    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    outcome = {}

    def encode():
        try:
            outcome["result"] = encode_cached(side, source, cfg.data, root, split, where, log=say)
        except BaseException as e:  # noqa: BLE001 - reported to every rank below
            outcome["error"] = e

    worker = threading.Thread(target=encode, name=f"gold_ds-encode-{split}", daemon=True) if local_rank == 0 else None
    if worker is not None:
        worker.start()
    while True:  # the other ranks wait inside the all_reduce, for at most 2 s each time
        if worker is not None:
            worker.join(timeout=2.0)
        done = torch.tensor([0.0 if worker is not None and worker.is_alive() else 1.0], device=device)
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if done.item() == 1.0:
            break
    failure = outcome.get("error")
    mine = None if failure is None else {"error": type(failure).__name__, "message": str(failure)}
    if worker is not None and failure is None:
        mine = outcome["result"]
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, mine)  # ranks are numbered node by node: a node's encoder is rank - local rank
    failed = next((r for r in results if r is not None and "error" in r), None)
    if failed is not None:
        if failure is not None:
            raise failure
        kind = {"ConfigError": ConfigError, "BadRowError": BadRowError}.get(failed["error"], RuntimeError)
        raise kind(failed["message"] if kind is not RuntimeError else
                   f"encoding {where} failed on another rank: {failed['error']}: {failed['message']}")
    mine = results[rank - local_rank]
    how = ("found in the cache" if mine["hit"] else
           f"encoded in {mine['seconds']:.1f}s with data.num_proc={cfg.data.num_proc}")
    say(f"[gold_ds] {split} data {how}: {mine['path']}")
    return open_cached(mine["path"], side, where).check(cfg.data.on_bad_row)


def _differences(key: str, was, now) -> list:
    """(dotted key, was, now) of each leaf where two JSON values differ."""
    if isinstance(was, dict) and isinstance(now, dict):
        return [d for k in sorted(set(was) | set(now)) for d in _differences(f"{key}.{k}", was.get(k), now.get(k))]
    return [] if json.dumps(was, sort_keys=True) == json.dumps(now, sort_keys=True) else [(key, was, now)]


def _check_same_run(saved, now: dict, where: str) -> None:
    """``ConfigError`` when the checkpoint was written by a run of another model or configuration
    (``saved``: its ``run_identity``; None for checkpoints that predate it)."""
    if saved is None:
        return
    differ = [d for k in now for d in _differences(k, saved.get(k), now[k])]
    if differ:
        def short(v):
            text = json.dumps(v, sort_keys=True)
            return text if len(text) <= 80 else text[:77] + "..."
        raise ConfigError(f"--resume: the checkpoint {where} was written by another run: "
                          + "; ".join(f"{k} was {short(a)}, now {short(b)}" for k, a, b in differ[:6])
                          + (f" (and {len(differ) - 6} more)" if len(differ) > 6 else "")
                          + ". Resume with the settings it was written with, or start a new run in another output_dir")


class _Phases:
    """Seconds per start-up phase, for one ``[gold_ds] start-up`` line; the first, ``imports``, is
    from the process's start to ``build_trainer`` (interpreter, imports, the config)."""

    def __init__(self):
        self.seconds, self._t = {}, time.perf_counter()
        launched = seconds_since_launch()
        if launched is not None:
            self.seconds["imports"] = launched

    def done(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = now - self._t
        self._t = now

    def line(self) -> str:
        return "[gold_ds] start-up: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())


def build_trainer(cfg, resume: bool = False) -> Trainer:
    t_start = time.perf_counter()
    phases = _Phases()
    assembler = build_assembler(cfg)
    cfg.distill.logits, logits_why = logits_path(cfg.distill, (len(assembler.student.tokenizer),
                                                               len(assembler.teacher.tokenizer)),
                                                 cfg.student.deepspeed, cfg.teacher.deepspeed)
    check_model_source(cfg.student.model, "student.model")
    check_model_source(cfg.teacher.model, "teacher.model")
    if cfg.student.lora is not None:
        check_lora(cfg.student.model, cfg.student.lora)
    phases.done("tokenizers")
    accelerator = init_distributed(cfg.timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    note_rank_processes()
    validate_world(cfg, world)
    random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)
    ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
    resume_tag = latest_checkpoint(ckpt_root) if resume else None
    if resume and resume_tag is None:
        raise ConfigError(f"--resume: no complete checkpoint in {ckpt_root} (output_dir={cfg.output_dir!r}); "
                          "start without --resume, or point output_dir at the run to continue")
    if resume_tag is not None:
        _check_same_run(trainer_state(ckpt_root, resume_tag).get("run"), run_identity(cfg, world),
                        os.path.join(ckpt_root, resume_tag))

    phases.done("process group")  # DeepSpeed builds its CPU comm op here on a first launch (kept in TORCH_EXTENSIONS_DIR)
    say = functools.partial(print, flush=True) if rank == 0 else (lambda text: None)
    device = torch.device(accelerator.current_device_name())
    train_data = _load_data(cfg, assembler.student, "train", device, say)
    eval_data = _load_data(cfg, assembler.student, "eval", device, say) if cfg.data.eval is not None else None
    sampler = RankSampler(len(train_data), rank, world, cfg.seed, cfg.data.shuffle)
    log = MetricsLogger(cfg, rank == 0, resumed=resume_tag is not None)
    log.info(f"[gold_ds] {world} ranks on {accelerator.device_name()}; train data: {train_data.report()}")
    log.info(f"[gold_ds] distill.logits: {cfg.distill.logits} ({logits_why})")
    if eval_data is not None:
        log.info(f"[gold_ds] eval data: {eval_data.report()}")
    if resume_tag is None:
        log.log(0, {"data/train_rows": len(train_data), "data/truncated_completions": train_data.truncated_completions,
                    **{f"data/bad_rows/{k}": v for k, v in train_data.bad_rows.items()}})

    phases.done("data")
    teacher_model = cfg.teacher.model
    if cfg.teacher.sft.max_steps > 0:
        teacher_model = teacher_sft(cfg, assembler, train_data, world, log, resumed=resume_tag is not None)
        phases.done("teacher SFT")
    ds = cfg.student.deepspeed
    micro = ds["train_micro_batch_size_per_gpu"]
    teacher = build_inference_engine(teacher_model, cfg.teacher.deepspeed, micro, world)
    phases.done("teacher engine")
    student = build_training_engine(cfg.student.model, ds, world, cfg.student.lora)
    phases.done("student engine")
    objective = build_objective(cfg.distill, student, teacher, assembler, log.info)
    rollout = build_rollout(cfg, student, assembler.student, micro)
    teacher_generator = transformers_generator(cfg, teacher, assembler.teacher, micro)
    evaluator = None
    if eval_data is not None:  # evaluation generates with transformers whatever the rollout backend
        evaluator = Evaluator(eval_data, cfg.eval, assembler, objective, student,
                              transformers_generator(cfg, student, assembler.student, micro), teacher_generator,
                              forward_batch=micro, generate_batch=micro * ds["gradient_accumulation_steps"])
    trainer = Trainer(cfg, accelerator=accelerator, assembler=assembler, train_data=train_data, sampler=sampler,
                      student=student, teacher=teacher, objective=objective, rollout=rollout,
                      teacher_generator=teacher_generator, evaluator=evaluator, log=log, t_start=t_start)
    phases.done("objective and generators")
    if resume_tag is not None:
        trainer.load_state_dict(load_checkpoint(student, ckpt_root, resume_tag))
        if trainer.step >= cfg.max_steps:
            raise ConfigError(f"--resume: the checkpoint {os.path.join(ckpt_root, resume_tag)} is at step {trainer.step} "
                              f"and max_steps={cfg.max_steps}: nothing left to train; raise max_steps to continue")
        log.drop_records_after(trainer.step)
        log.info(f"[gold_ds] resumed from {os.path.join(ckpt_root, resume_tag)} at step {trainer.step}")
        phases.done("checkpoint")
    log.info(phases.line())
    return trainer
