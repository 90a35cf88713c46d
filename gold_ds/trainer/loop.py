"""The GOLD training loop: the one place that knows every part.

One optimizer step (a *window* of GA micro-steps), on every rank:
  1. schedule: rank 0 draws on-/off-policy for each micro-step (probability ``lmbda``) and broadcasts;
  2. examples: an on-policy micro-step takes micro_batch / num_generations prompts (each sampled
     num_generations times), an off-policy one micro_batch examples with their dataset completions
     (with ``seq_kd``: completions sampled from the teacher);
  3. rollout: all on-policy prompts of the window are generated in one call;
  4. per micro-step: teacher forward (no grad), student forward, loss, backward;
  5. ``engine.step()`` (DeepSpeed steps the optimizer at the window's end), metrics, eval, checkpoint.

Loss normalization (per window): the loss of a micro-step is its summed per-token divergence times
world_size / N, where N is the number of completion tokens trained in the whole window on all ranks
(all_reduce after the rollout), and backward runs without DeepSpeed's 1/GA scaling. ZeRO-3 averages
gradients over ranks, so the optimizer step follows the gradient of the mean per-token loss over all
completion tokens of the window on all ranks, whatever the micro batch, GA and world size.
"""
import functools
import gc
import math
import os
import random
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import ModelConfig, validate_world
from ..data.batch import RankSampler, training_batch
from ..data.dataset import encode_dataset, read_rows
from ..engine.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from ..data.tokenizer import load_tokenizer
from ..engine.models import build_inference_engine, build_training_engine
from ..losses import generalized_jsd
from ..rollout import TransformersGenerator
from .evaluate import Evaluator
from .logging import MetricsLogger


def init_distributed():
    """Join the process group set up by the launcher (deepspeed, torchrun or spawn env vars).
    nccl on GPUs, gloo on CPU (DeepSpeed picks it). Called by every rank."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    deepspeed.init_distributed()
    acc = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if acc.device_name() != "cpu":
        acc.set_device(local_rank)
    return acc


def check_shared_vocabulary(student_tok, teacher_tok):
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise ValueError("distill.loss='jsd' compares the two models' distributions token by token, so the "
                         "student and teacher must share a tokenizer (student.model.tokenizer and "
                         "teacher.model.tokenizer have different vocabularies)")


class Trainer:
    """Built and run by every rank: ``Trainer(cfg).train()``."""

    def __init__(self, cfg, resume: bool = False):
        self.cfg = cfg
        self._t_start = time.perf_counter()
        self.accelerator = init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(self.accelerator.current_device_name())  # where collectives' tensors live (nccl: GPU)
        validate_world(cfg, self.world)
        random.seed(cfg.seed + self.rank)
        torch.manual_seed(cfg.seed + self.rank)
        ds = cfg.student.deepspeed
        self.micro, self.ga = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
        self.ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
        self.resume_tag = latest_checkpoint(self.ckpt_root) if resume else None
        if resume and self.resume_tag is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {self.ckpt_root}")

        self.tokenizer = load_tokenizer(cfg.student.model)
        check_shared_vocabulary(self.tokenizer, load_tokenizer(cfg.teacher.model))
        self.vocab = len(self.tokenizer)
        d = cfg.data
        encode = functools.partial(encode_dataset, self.tokenizer, max_prompt_length=d.max_prompt_length,
                                   max_completion_length=d.max_completion_length, on_bad_row=d.on_bad_row)
        self.train_data = encode(read_rows(d.train))
        self.eval_data = encode(read_rows(d.eval)) if d.eval is not None else None
        self.sampler = RankSampler(len(self.train_data), self.rank, self.world, cfg.seed, d.shuffle)
        self.log = MetricsLogger(cfg, self.rank == 0, resumed=self.resume_tag is not None)
        self.log.info(f"[gold_ds] {self.world} ranks on {self.accelerator.device_name()}; train data: "
                      f"{self.train_data.report()}")
        if self.eval_data is not None:
            self.log.info(f"[gold_ds] eval data: {self.eval_data.report()}")
        if self.resume_tag is None:
            self.log.log(0, {"data/train_rows": len(self.train_data),
                             "data/truncated_completions": self.train_data.truncated_completions,
                             **{f"data/bad_rows/{k}": v for k, v in self.train_data.bad_rows.items()}})

        teacher_model = self._teacher_sft() if cfg.teacher.sft.max_steps > 0 else cfg.teacher.model
        self.teacher = build_inference_engine(teacher_model, cfg.teacher.deepspeed, self.micro, self.world)
        self.student = build_training_engine(cfg.student.model, ds, self.world)
        self.loss_fn = functools.partial(generalized_jsd, beta=cfg.distill.beta,
                                         temperature=cfg.distill.temperature, reduction="sum")
        r = cfg.rollout
        gen = dict(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
        self.student_gen = TransformersGenerator(self.student.module, self.tokenizer,
                                                 device=self.student.device, **gen)
        self.teacher_gen = TransformersGenerator(self.teacher.module, self.tokenizer,
                                                 device=self.teacher.device, **gen)
        self.evaluator = (Evaluator(self.eval_data, cfg.eval, self.tokenizer, self.student, self.teacher,
                                    self.student_gen, self.teacher_gen, self._forward_logits, self.loss_fn,
                                    forward_batch=self.micro, generate_batch=self.micro * self.ga)
                          if self.eval_data is not None else None)
        self.step = 0
        self.results = {}
        self.wall = 0.0
        if self.resume_tag is not None:
            state = load_checkpoint(self.student, self.ckpt_root, self.resume_tag)
            self.step, self.results, self.wall = state["step"], state["results"], state["wall"]
            self.sampler.load_state_dict(state["sampler"])
            self.log.info(f"[gold_ds] resumed from {os.path.join(self.ckpt_root, self.resume_tag)} at step {self.step}")

    # ------------------------------------------------------------------------------- building blocks
    def _forward_logits(self, engine, batch):
        """Logits [B, T-1, V] in the model dtype, cut to the shared tokenizer's vocabulary (models may
        pad their embedding matrix)."""
        out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[:, :-1]
        if logits.shape[-1] < self.vocab:
            raise ValueError(f"model has {logits.shape[-1]} logits per position but the tokenizer has {self.vocab} tokens")
        return logits[..., :self.vocab]

    def _to_device(self, batch, engine):
        return {k: v.to(engine.device) for k, v in batch.items()}

    def _draw_policy(self, step: int) -> list:
        """On-policy flag per micro-step: drawn on rank 0 from (seed, step), broadcast to all ranks."""
        flags = torch.zeros(self.ga, dtype=torch.long)
        if self.rank == 0:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
            flags = (torch.rand(self.ga, generator=g) < self.cfg.distill.lmbda).long()
        flags = flags.to(self.device)
        dist.broadcast(flags, src=0)
        return [bool(f) for f in flags.tolist()]

    def _now(self) -> float:
        """A timestamp after the accelerator's queued work (GPU kernels run asynchronously)."""
        self.accelerator.synchronize()
        return time.perf_counter()

    def _global_sum(self, values: list, op=dist.ReduceOp.SUM) -> list:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def _backward_window(self, engine, micro_batches: list, loss_of_batch, timer: dict):
        """Forward/backward every micro-step of a window with the per-window normalization, calling
        ``engine.step()`` after each (DeepSpeed applies the update at the window's end).
        ``loss_of_batch(batch, timer)`` returns the micro-step's summed loss. Returns the global
        token count per micro-step, their total, and the micro-steps' summed losses (floats)."""
        tokens = self._global_sum([float(b["loss_mask"].sum()) for b in micro_batches])
        total = sum(tokens)
        sums = []
        for b in micro_batches:
            loss_sum = loss_of_batch(self._to_device(b, engine), timer)
            t0 = self._now()
            engine.backward(loss_sum * (self.world / total), scale_wrt_gas=False)
            timer["student"] += self._now() - t0
            t0 = self._now()
            engine.step()
            timer["optimizer"] += self._now() - t0
            sums.append(loss_sum.item())
        return tokens, total, sums

    # ---------------------------------------------------------------------------------- teacher SFT
    def _teacher_sft(self) -> ModelConfig:
        """Supervised stage: fine-tune the teacher on the training completions (cross-entropy per
        completion token, same normalization as distillation), export it, return its ModelConfig.
        A fresh run always trains it; a resumed run loads the export of its first session."""
        cfg, sft = self.cfg, self.cfg.teacher.sft
        out_dir = os.path.join(cfg.output_dir, "teacher-sft")
        loaded = ModelConfig(name_or_path=out_dir, dtype=cfg.teacher.model.dtype,
                             trust_remote_code=cfg.teacher.model.trust_remote_code)
        if self.resume_tag is not None:  # the stage finished before the first checkpoint
            if not os.path.isfile(os.path.join(out_dir, "config.json")):
                raise FileNotFoundError(f"--resume: the supervised teacher {out_dir} is missing")
            self.log.info(f"[gold_ds] teacher SFT: resuming with {out_dir}")
            return loaded
        engine = build_training_engine(cfg.teacher.model, sft.deepspeed, self.world)
        micro, ga = sft.deepspeed["train_micro_batch_size_per_gpu"], sft.deepspeed["gradient_accumulation_steps"]
        sampler = RankSampler(len(self.train_data), self.rank, self.world, cfg.seed + 1, cfg.data.shuffle)

        def ce(batch, timer):
            t0 = time.perf_counter()
            logits = self._forward_logits(engine, batch)
            targets = batch["input_ids"][:, 1:]
            mask = batch["loss_mask"]
            loss = F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum")
            timer["student"] += time.perf_counter() - t0
            return loss

        t_start = time.perf_counter()
        for step in range(sft.max_steps):
            timer = {"student": 0.0, "optimizer": 0.0}
            batches = [training_batch([(r.prompt_ids, r.completion_ids) for r in
                                       (self.train_data.rows[i] for i in sampler.take(micro))],
                                      self.tokenizer.pad_token_id) for _ in range(ga)]
            _, total, sums = self._backward_window(engine, batches, ce, timer)
            loss = self._global_sum([sum(sums)])[0] / total
            if (step + 1) % cfg.logging.every == 0:
                self.log.log(step + 1, {"loss": loss}, stage="teacher_sft")
            if (step + 1) % max(1, sft.max_steps // 10) == 0:
                self.log.info(f"[gold_ds] teacher SFT step {step + 1}/{sft.max_steps} loss {loss:.4f}")
        export_hf(engine, self.tokenizer, out_dir)
        self.log.info(f"[gold_ds] teacher SFT: {sft.max_steps} steps in {time.perf_counter() - t_start:.0f}s, "
                      f"exported to {out_dir}")
        engine.destroy()
        del engine
        gc.collect()
        return loaded

    # ------------------------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        cfg, G = self.cfg, self.cfg.distill.num_generations
        t_step = self._now()
        timer = {"rollout": 0.0, "teacher": 0.0, "student": 0.0, "optimizer": 0.0}
        flags = self._draw_policy(self.step)
        rows = [[self.train_data.rows[i] for i in self.sampler.take(self.micro // G if on else self.micro)]
                for on in flags]

        # rollout: every on-policy prompt of the window in one call (the same calls on every rank)
        t0 = self._now()
        seqs = [[(r.prompt_ids, r.completion_ids) for r in rs] if not on else None for rs, on in zip(rows, flags)]
        on_prompts = [r.prompt_ids for rs, on in zip(rows, flags) if on for r in rs]
        if on_prompts:
            samples = iter(self.student_gen.generate(on_prompts, G))
            for m, on in enumerate(flags):
                if on:
                    seqs[m] = [(r.prompt_ids, next(samples)) for r in rows[m] for _ in range(G)]
        if cfg.distill.seq_kd and not all(flags):
            off_prompts = [r.prompt_ids for rs, on in zip(rows, flags) if not on for r in rs]
            samples = iter(self.teacher_gen.generate(off_prompts, 1))
            for m, on in enumerate(flags):
                if not on:
                    seqs[m] = [(p, next(samples)) for p, _ in seqs[m]]
        timer["rollout"] = self._now() - t0
        batches = [training_batch(s, self.tokenizer.pad_token_id) for s in seqs]

        def jsd(batch, timer):
            t0 = self._now()
            with torch.no_grad():
                t_logits = self._forward_logits(self.teacher, batch)
            t1 = self._now()
            s_logits = self._forward_logits(self.student, batch)
            mask = batch["loss_mask"]
            loss = self.loss_fn(s_logits, t_logits, mask=mask)
            timer["teacher"] += t1 - t0
            timer["student"] += self._now() - t1
            return loss

        tokens, total, sums = self._backward_window(self.student, batches, jsd, timer)
        on_sum = sum(s for s, on in zip(sums, flags) if on)
        off_sum = sum(s for s, on in zip(sums, flags) if not on)
        on_tok = sum(t for t, on in zip(tokens, flags) if on)
        g = self._global_sum([on_sum, off_sum])
        times = self._global_sum([timer[k] for k in ("rollout", "teacher", "student", "optimizer")],
                                 op=dist.ReduceOp.MAX)
        dt = self._now() - t_step
        self.step += 1
        return {
            "loss": (g[0] + g[1]) / total,
            "loss_on_policy": g[0] / on_tok if on_tok else None,
            "loss_off_policy": g[1] / (total - on_tok) if total > on_tok else None,
            "tokens": int(total),
            "tokens_per_s": total / dt,
            "on_policy_share": sum(flags) / len(flags),
            "lr": self.student.get_lr()[0],
            "time/rollout": times[0], "time/teacher": times[1], "time/student": times[2],
            "time/optimizer": times[3], "time/step": dt,
        }

    # --------------------------------------------------------------------------------------- the run
    def _evaluate(self, tag: str) -> dict:
        if self.evaluator is None:
            return {}
        metrics, table = self.evaluator.run()
        self.log.log(self.step, {f"eval/{k}": v for k, v in metrics.items()})
        self.log.table(self.step, "eval/samples", ["prompt", "answer", "student", "teacher"], table)
        self.log.info(f"[gold_ds] eval ({tag}, step {self.step}): " +
                      ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None))
        return metrics

    def _state(self) -> dict:
        return {"step": self.step, "results": self.results, "wall": self.wall,
                "sampler": self.sampler.state_dict()}

    def train(self) -> dict:
        cfg = self.cfg
        t_run = self._t_start - self.wall  # wall time counts setup, teacher SFT and earlier sessions
        if self.step == 0:
            self.results["before"] = self._evaluate("before training")
        self.log.start_progress(cfg.max_steps, self.step)
        while self.step < cfg.max_steps:
            metrics = self.train_step()
            if self.step % cfg.logging.every == 0 or self.step == cfg.max_steps:
                self.log.log(self.step, {k: v for k, v in metrics.items() if v is not None})
            self.log.progress(metrics)
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.max_steps:
                self._evaluate("periodic")
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                self.wall = time.perf_counter() - t_run
                save_checkpoint(self.student, self.ckpt_root, self.step, self._state(), cfg.checkpoint.keep_last)
        self.results["after"] = self._evaluate("after training")
        if cfg.export.enabled:
            export_hf(self.student, self.tokenizer, os.path.join(cfg.output_dir, "export"))
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
        self.log.summary({k: v for k, v in self.results.items() if not isinstance(v, dict)})
        self.log.info("\n".join(lines))
