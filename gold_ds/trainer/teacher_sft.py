"""Teacher SFT: an optional supervised stage that fine-tunes the teacher on the training completions
before distillation (``teacher.sft``), exports it, and hands distillation the exported model.

Each row is the teacher's own rendering (``assembler.teacher_sample``). The loss is the teacher's
cross-entropy per completion token, normalized per window like distillation (see ``loop.py``): each
micro-step's summed loss times world / N, N the completion tokens of the window on all ranks.
Called by every rank.
"""
import gc
import math
import os
import time

import torch.distributed as dist

from ..config import ConfigError, ModelConfig
from ..data import RankSampler
from ..engine.checkpoint import export_hf
from ..engine.heads import HeadSlice, head_spec
from ..engine.models import build_training_engine
from .collective import global_sum
from .objective import completion_nll
from .stop import NonFiniteGuard


def teacher_sft(cfg, assembler, train_data, world: int, log, resumed: bool) -> ModelConfig:
    """Train, export to ``<output_dir>/teacher_sft`` and return its ``ModelConfig``. A resumed run
    loads the export of its first session (the stage finished before the first checkpoint)."""
    sft = cfg.teacher.sft
    out_dir = os.path.join(cfg.output_dir, "teacher_sft")
    exported = ModelConfig(name_or_path=out_dir, dtype=cfg.teacher.model.dtype,
                           trust_remote_code=cfg.teacher.model.trust_remote_code, processor=cfg.teacher.model.processor)
    if resumed:
        if not os.path.isfile(os.path.join(out_dir, "config.json")):
            raise ConfigError(f"--resume: the teacher SFT export {out_dir} is missing (the run's first session "
                              "wrote it before its first checkpoint); start without --resume")
        log.info(f"[gold_ds] teacher SFT: resuming with {out_dir}")
        return exported
    engine = build_training_engine(cfg.teacher.model, sft.deepspeed, world)
    micro, ga = sft.deepspeed["train_micro_batch_size_per_gpu"], sft.deepspeed["gradient_accumulation_steps"]
    sampler = RankSampler(len(train_data), dist.get_rank(), world, cfg.seed + 1, cfg.data.shuffle)
    side, vocab = assembler.teacher, len(assembler.teacher.tokenizer)
    head = None
    if cfg.distill.logits == "sharded":  # the same path as distillation's (see objective.py)
        head = HeadSlice(engine, head_spec(engine.module, "teacher"), vocab, "teacher")
    guard = NonFiniteGuard(cfg.max_consecutive_skips, engine.device, stage="teacher SFT",
                           loss_scaling=bool(sft.deepspeed.get("fp16", {}).get("enabled")))
    t_start = time.perf_counter()
    for step in range(sft.max_steps):
        window = [[assembler.teacher_sample(r) for r in train_data.samples(sampler.take(micro))] for _ in range(ga)]
        tokens = sum(global_sum([float(sum(len(s.completion_ids) for s in w)) for w in window], engine.device))
        loss_sum = 0.0
        for m, samples in enumerate(window):
            loss, share = completion_nll(engine, head, side.batch(samples), vocab)
            if guard.check(step + 1, m + 1, share, None):  # as in distillation (loop.py): no update from it
                loss = loss * math.nan
            engine.backward(loss * (world / tokens), scale_wrt_gas=False)
            engine.step()
            loss_sum += share
        skipped = guard.window_end(step + 1, engine.was_step_applied())
        if skipped:
            log.info(f"[gold_ds] {skipped}")
        loss = global_sum([loss_sum], engine.device)[0] / tokens
        if (step + 1) % cfg.logging.every == 0:
            log.log(step + 1, {"loss": loss}, stage="teacher_sft")
        if (step + 1) % max(1, sft.max_steps // 10) == 0:
            log.info(f"[gold_ds] teacher SFT step {step + 1}/{sft.max_steps} loss {loss:.4f}")
    export_hf(engine, side.preprocessor, out_dir)
    log.info(f"[gold_ds] teacher SFT: {sft.max_steps} steps in {time.perf_counter() - t_start:.0f}s, "
             f"exported to {out_dir}")
    engine.destroy()
    del engine
    gc.collect()
    return exported
