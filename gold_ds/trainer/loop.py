"""The GOLD training loop: the one place that knows every part.

One optimizer step (a *window* of GA micro-steps), on every rank (``Trainer.train_step``):
  1. schedule: rank 0 draws on-/off-policy for each micro-step (probability ``lmbda``) and broadcasts;
  2. rows: an on-policy micro-step takes micro_batch / num_generations prompts (each sampled
     num_generations times), an off-policy one micro_batch rows with their dataset completions
     (with ``seq_kd``: completions sampled from the teacher);
  3. rollout: all on-policy prompts of the window are generated in one call (``gold_ds.rollout``);
  4. per micro-step: assemble its tensors (``gold_ds.data.assembler``), teacher forward (no grad;
     text micro-steps of a window in one forward, ``teacher.forward_micro_steps``), student forward,
     loss (``objective.py``), backward (a NaN/inf loss or teacher output on any
     rank makes the window's update skipped: ``gold_ds.trainer.stop.NonFiniteGuard``);
  5. ``engine.step()`` (DeepSpeed steps the optimizer at the window's end), metrics, eval, checkpoint;
     then every rank agrees whether to stop (a signal, the launcher gone) and, if so, checkpoints.

Loss normalization (per window): the loss of a micro-step is its summed per-token divergence times
world_size / N, where N is the number of completion tokens trained in the whole window on all ranks
(all_reduce after the rollout), and backward runs without DeepSpeed's 1/GA scaling. ZeRO-3 averages
gradients over ranks, so the optimizer step follows the gradient of the mean per-token loss over all
completion tokens of the window on all ranks, whatever the micro batch, GA and world size.

The parts are built by ``gold_ds.trainer.build.build_trainer``.
"""
import collections
import contextlib
import dataclasses
import functools
import json
import math
import os
import time

import torch
import torch.distributed as dist

from ..data import Sample
from ..engine.checkpoint import export_hf, save_checkpoint
from ..engine.lora import export_lora
from ..engine.weights import gathered_weight_buckets
from .collective import global_sum
from .logging import seconds_since_launch, step_metrics
from .stop import NonFiniteGuard, Preempted, StopRequests


def run_identity(cfg, world: int) -> dict:
    """What a checkpoint must share with the run that resumes it, by config key (the rest, such as
    ``max_steps``, the learning rate or evaluation, may change between sessions)."""
    ds = cfg.student.deepspeed

    def plain(section):
        return json.loads(json.dumps(dataclasses.asdict(section) if dataclasses.is_dataclass(section) else section))
    return {"student.model": plain(cfg.student.model), "student.lora": plain(cfg.student.lora),
            "teacher.model": plain(cfg.teacher.model), "teacher.sft.max_steps": cfg.teacher.sft.max_steps,
            "data.train": plain(cfg.data.train), "distill.loss": cfg.distill.loss, "the number of ranks": world,
            "student.deepspeed.train_micro_batch_size_per_gpu": ds["train_micro_batch_size_per_gpu"],
            "student.deepspeed.gradient_accumulation_steps": ds["gradient_accumulation_steps"],
            "student.deepspeed.optimizer.type": ds.get("optimizer", {}).get("type")}


class PhaseTimer:
    """Seconds per phase of a step: ``with timer("teacher"): ...`` (after the accelerator's queued
    work, as GPU kernels run asynchronously)."""

    def __init__(self, synchronize):
        self.synchronize, self.seconds = synchronize, collections.defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        self.synchronize()
        t0 = time.perf_counter()
        yield
        self.synchronize()
        self.seconds[phase] += time.perf_counter() - t0


class Trainer:
    """Run by every rank: ``build_trainer(cfg).train()``. Holds the parts ``build_trainer`` made."""

    def __init__(self, cfg, *, accelerator, assembler, train_data, sampler, student, teacher, objective,
                 rollout, teacher_generator, evaluator, log, t_start):
        self.cfg, self.accelerator, self.assembler = cfg, accelerator, assembler
        self.device = torch.device(accelerator.current_device_name())  # where collectives' tensors live
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.train_data, self.sampler = train_data, sampler
        self.student, self.teacher, self.objective = student, teacher, objective
        self.rollout, self.teacher_generator, self.evaluator, self.log = rollout, teacher_generator, evaluator, log
        ds = cfg.student.deepspeed
        self.micro_batch_size, self.ga = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
        # micro-steps per teacher forward (objective.py); a vision-language micro-step's images are
        # processed only when it comes (gold_ds.data.vlm), so those run one at a time
        self.teacher_micro_steps = cfg.teacher.forward_micro_steps or (1 if cfg.student.model.processor else self.ga)
        self.ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
        self.step, self.results, self.wall, self._t_start = 0, {}, 0.0, t_start
        self.identity = run_identity(cfg, self.world)
        self.guard = NonFiniteGuard(cfg.max_consecutive_skips, self.device,
                                    loss_scaling=bool(ds.get("fp16", {}).get("enabled")))

    def load_state_dict(self, state: dict) -> None:
        self.step, self.results, self.wall = state["step"], state["results"], state["wall"]
        self.sampler.load_state_dict(state["sampler"])
        if "guard" in state:  # checkpoints written before the guard have none
            self.guard.load_state_dict(state["guard"])

    def state_dict(self) -> dict:
        return {"step": self.step, "results": self.results, "wall": self.wall, "sampler": self.sampler.state_dict(),
                "guard": self.guard.state_dict(), "run": self.identity}

    # ------------------------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        timer, G, t_step = PhaseTimer(self.accelerator.synchronize), self.cfg.distill.num_generations, self._now()
        flags = self._draw_policy(self.step)
        rows = [self.train_data.samples(self.sampler.take(self.micro_batch_size // G if on else self.micro_batch_size))
                for on in flags]
        with timer("rollout"):
            micro_steps, rollout_metrics = self._roll_out(rows, flags)
        tokens = global_sum([float(sum(len(s.completion_ids) for s in samples)) for samples in micro_steps],
                            self.device)
        losses, counters, scored = [], collections.Counter(), []
        for m in range(len(micro_steps)):
            if not scored:  # the next micro-steps' tensors, and the teacher's targets of all of them at once
                micro_batches = [self.assembler.assemble(s) for s in micro_steps[m:m + self.teacher_micro_steps]]
                with timer("teacher"):
                    scored = list(zip(micro_batches, self.objective.teacher_targets(micro_batches)))
                del micro_batches
            micro_batch, targets = scored.pop(0)
            with timer("student"):
                loss, share = self.objective.loss(micro_batch, targets)
                if self.guard.check(self.step + 1, m + 1, share, targets):  # never train on garbage:
                    loss = loss * math.nan  # the window's gradient norm is NaN, DeepSpeed skips its update
                self.student.backward(loss * (self.world / sum(tokens)), scale_wrt_gas=False)
            with timer("optimizer"):
                self.student.step()
            losses.append(share)
            counters.update(micro_batch.counters)
            del micro_batch, targets, loss  # this micro-step's tensors (pixels) go before the next is assembled
        self.step += 1
        skipped = self.guard.window_end(self.step, self.student.was_step_applied())
        if skipped:
            self.log.info(f"[gold_ds] {skipped}")
        return step_metrics(flags=flags, tokens=tokens, losses=losses, counters=counters, seconds=timer.seconds,
                            rollout=rollout_metrics, lr=self.student.get_lr()[0], skipped_steps=self.guard.skipped,
                            step_seconds=self._now() - t_step, device=self.device)

    def _draw_policy(self, step: int) -> list:
        """On-policy flag per micro-step: drawn on rank 0 from (seed, step), broadcast to all ranks."""
        flags = torch.zeros(self.ga, dtype=torch.long)
        if self.rank == 0:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
            flags = (torch.rand(self.ga, generator=g) < self.cfg.distill.lmbda).long()
        flags = flags.to(self.device)
        dist.broadcast(flags, src=0)
        return [bool(f) for f in flags.tolist()]

    def _roll_out(self, rows: list, flags: list) -> tuple:
        """Per micro-step, its samples; and the rollout's metrics. On-policy micro-steps get
        num_generations student completions per prompt, all from one rollout call (every rank calls
        it in the same steps: the flags are shared); off-policy ones the dataset's completions, or
        with ``seq_kd`` the teacher's, also from one call."""
        G, metrics = self.cfg.distill.num_generations, {}
        micro_steps = [None if on else list(r) for r, on in zip(rows, flags)]
        on_rows = [r for rs, on in zip(rows, flags) if on for r in rs]
        if on_rows:
            weights = functools.partial(gathered_weight_buckets, self.student.module)  # weights(bucket_bytes)
            completions, metrics = self.rollout.sample([r.prompt_ids for r in on_rows], G, step=self.step,
                                                       weights=weights)
            completions = iter(completions)
            for m, on in enumerate(flags):
                if on:
                    micro_steps[m] = [Sample(r.prompt_ids, next(completions), r.example) for r in rows[m]
                                      for _ in range(G)]
        off_rows = [r for rs, on in zip(rows, flags) if not on for r in rs]
        if self.cfg.distill.seq_kd and off_rows:
            completions = iter(self.teacher_generator.generate([self.assembler.teacher_prompt_ids(r)
                                                                for r in off_rows], 1))
            for m, on in enumerate(flags):
                if not on:
                    micro_steps[m] = [self.assembler.from_teacher_completion(r, next(completions)) for r in rows[m]]
        return micro_steps, metrics

    def _now(self) -> float:
        self.accelerator.synchronize()
        return time.perf_counter()

    # --------------------------------------------------------------------------------------- the run
    def _evaluate(self, tag: str) -> dict:
        if self.evaluator is None:
            return {}
        metrics, table = self.evaluator.run()
        self.log.log(self.step, {f"eval/{k}": v for k, v in metrics.items()})
        self.log.table(self.step, "eval/completions", ["prompt", "answer", "student", "teacher"], table)
        self.log.info(f"[gold_ds] eval ({tag}, step {self.step}): " +
                      ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None))
        return metrics

    def train(self) -> dict:
        cfg = self.cfg
        t_run = self._t_start - self.wall  # wall time counts setup, teacher SFT and earlier sessions
        if self.step == 0:
            self.results["before"] = self._evaluate("before training")
        self.log.start_progress(cfg.max_steps, self.step)
        with StopRequests() as stop:
            first = True
            while self.step < cfg.max_steps:
                metrics = self.train_step()
                if first:
                    launched, first = seconds_since_launch(), False
                    self.log.info(f"[gold_ds] first step: {metrics['time/step']:.1f}s"
                                  + (f", done {launched:.1f}s after launch" if launched is not None else ""))
                if self.step % cfg.logging.every == 0 or self.step == cfg.max_steps:
                    self.log.log(self.step, {k: v for k, v in metrics.items() if v is not None})
                self.log.progress(metrics)
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.max_steps:
                    self._evaluate("periodic")
                saved = cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0
                if saved:
                    self.wall = time.perf_counter() - t_run
                    save_checkpoint(self.student, self.ckpt_root, self.step, self.state_dict(), cfg.checkpoint.keep_last)
                reason = stop.agreed(self.device) if self.step < cfg.max_steps else ""
                if reason:
                    if not saved:
                        self.wall = time.perf_counter() - t_run
                        save_checkpoint(self.student, self.ckpt_root, self.step, self.state_dict(),
                                        cfg.checkpoint.keep_last)
                    self.log.info(f"[gold_ds] stopping after step {self.step} ({reason}): checkpoint "
                                  f"{self.ckpt_root}/step-{self.step} written; --resume continues")
                    self.log.close()
                    raise Preempted(self.step)
        self.results["after"] = self._evaluate("after training")
        if cfg.export.enabled:
            out, preprocessor = os.path.join(cfg.output_dir, "export"), self.assembler.student.preprocessor
            if cfg.student.lora is None:
                export_hf(self.student, preprocessor, out)
            else:
                export_lora(self.student, preprocessor, out,
                            os.path.join(cfg.output_dir, "export-merged") if cfg.export.merge_lora else None)
        self.wall = time.perf_counter() - t_run
        self._final_table()
        self.log.close()
        return self.results

    def _final_table(self):
        before, after = self.results.get("before", {}), self.results.get("after", {})
        lines = [f"[gold_ds] {self.cfg.name}: {self.cfg.max_steps} steps, wall time {self.wall:.0f}s"]
        if "accuracy" in after:
            t, b, a = after["teacher_accuracy"], before.get("accuracy"), after["accuracy"]
            lines += ["| model | exact match |", "|---|---|", f"| teacher | {t:.3f} |"]
            if b is not None:
                lines.append(f"| student before | {b:.3f} |")
            lines.append(f"| student after | {a:.3f} |")
            if b is not None and t > b:
                lines.append(f"| gap closed | {(a - b) / (t - b):.0%} |")
                self.results["gap_closed"] = (a - b) / (t - b)
        if "loss" in after:
            lines.append(f"eval distillation loss: {before.get('loss', math.nan):.4f} -> {after['loss']:.4f}")
        self.results["wall_time"] = self.wall
        self.log.summary(self.results)
        self.log.info("\n".join(lines))
