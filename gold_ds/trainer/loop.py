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
from ..data.cross_tokenizer import CrossTokenizerAssembler
from ..data.dataset import EncodedExample, encode_dataset, read_rows
from ..data.vlm import VLMPair
from ..engine.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from ..data.tokenizer import load_tokenizer
from ..engine.models import build_inference_engine, build_training_engine
from ..engine.weights import gathered_weight_buckets
from ..rollout import TransformersGenerator
from .evaluate import Evaluator
from .logging import MetricsLogger
from .objective import CrossTokenizerObjective, SharedVocabularyObjective


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
        self.teacher_tokenizer = load_tokenizer(cfg.teacher.model)
        self.cross = cfg.distill.loss != "jsd"  # uld / hybrid_uld: any two tokenizers
        # vision-language pair: processors checked here; images are processed per micro-step only
        self.vlm = VLMPair(cfg) if cfg.student.model.processor else None
        if self.cross:
            self.assembler = (self.vlm.cross_assembler() if self.vlm else
                              CrossTokenizerAssembler(self.tokenizer, self.teacher_tokenizer))
            self._teacher_rows = {}  # id(row) -> the teacher's rendering, for its supervised stage
        else:
            check_shared_vocabulary(self.tokenizer, self.teacher_tokenizer)
            self.teacher_tokenizer = self.tokenizer
        d = cfg.data
        encode = functools.partial(self.vlm.encode_dataset if self.vlm else functools.partial(encode_dataset, self.tokenizer),
                                   max_prompt_length=d.max_prompt_length,
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
        if self.cross:
            self.objective = CrossTokenizerObjective(cfg.distill, self.student, self.teacher, self.tokenizer,
                                                     self.teacher_tokenizer, self._now, self.log.info,
                                                     assembler=self.assembler)
        else:
            self.objective = SharedVocabularyObjective(cfg.distill, self.student, self.teacher, self.tokenizer,
                                                       self._now, batch_of=self.vlm.student.batch if self.vlm else None)
        r = cfg.rollout
        gen = dict(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
        if self.vlm:  # vision-language rollouts: one micro-step's worth of prompts' images at a time
            gen.update(multimodal_chunk=self.micro)
        self.student_gen = TransformersGenerator(self.student.module, self.tokenizer, device=self.student.device,
                                                 suppress_tokens=self.vlm.student.placeholder_ids if self.vlm else None,
                                                 **gen)
        self.teacher_gen = TransformersGenerator(self.teacher.module, self.teacher_tokenizer, device=self.teacher.device,
                                                 suppress_tokens=self.vlm.teacher.placeholder_ids if self.vlm else None,
                                                 **gen)
        # on-policy rollouts: student_gen (transformers on the ZeRO-3 engine; evaluation always uses it),
        # or a vLLM engine/server that gets the student's weights pushed every rollout.sync_every steps
        self.rollout_gen, self._synced_at = self.student_gen, None
        if r.backend != "transformers":  # (the config refuses vLLM for vision-language students)
            from ..rollout.factory import vllm_generator
            self.rollout_gen = vllm_generator(cfg, self.student.module.config, self.tokenizer)
        self.evaluator = (Evaluator(self.eval_data, cfg.eval, self.tokenizer, self.teacher_tokenizer,
                                    self.student, self.student_gen, self.teacher_gen, self.objective,
                                    self._teacher_prompt_ids, forward_batch=self.micro,
                                    generate_batch=self.micro * self.ga)
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
    def _teacher_prompt_ids(self, row) -> list:
        """A row's prompt in the teacher's own template (the student's when they share a tokenizer)."""
        return self.assembler.teacher_prompt_ids(row.example) if self.cross else row.prompt_ids

    def _student_sample(self, row, teacher_completion_ids) -> EncodedExample:
        """A teacher-sampled completion (seq_kd) of a row as a student sample."""
        if not self.cross:
            return EncodedExample(row.prompt_ids, teacher_completion_ids, row.example)
        return self.assembler.student_sample(row.example, teacher_completion_ids, self.cfg.data.max_completion_length)

    def _teacher_sequence(self, row) -> tuple:
        """A dataset row as the teacher's (prompt ids, completion ids), for its supervised stage."""
        if not self.cross:
            return row.prompt_ids, row.completion_ids
        key = id(row)
        if key not in self._teacher_rows:
            p, c = self.assembler.render(self.teacher_tokenizer, row.example, row.example.completion, True)
            self._teacher_rows[key] = (p, c[:self.cfg.data.max_completion_length])
        return self._teacher_rows[key]

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

    def _backward_window(self, engine, micro_samples: list, loss_of_samples, timer: dict):
        """Forward/backward every micro-step of a window with the per-window normalization, calling
        ``engine.step()`` after each (DeepSpeed applies the update at the window's end).
        ``micro_samples``: per micro-step, its samples (``EncodedExample``: the student's ids);
        ``loss_of_samples(samples, timer)`` returns the micro-step's summed loss and a dict of
        counters. Returns the global token count per micro-step, their total, the micro-steps'
        summed losses (floats) and the counters summed over the window (this rank)."""
        tokens = self._global_sum([float(sum(len(s.completion_ids) for s in ms)) for ms in micro_samples])
        total = sum(tokens)
        sums, counters = [], {}
        for samples in micro_samples:
            loss_sum, stats = loss_of_samples(samples, timer)
            t0 = self._now()
            engine.backward(loss_sum * (self.world / total), scale_wrt_gas=False)
            timer["student"] += self._now() - t0
            t0 = self._now()
            engine.step()
            timer["optimizer"] += self._now() - t0
            sums.append(loss_sum.item())
            for k, v in stats.items():
                counters[k] = counters.get(k, 0) + v
        return tokens, total, sums, counters

    # ---------------------------------------------------------------------------------- teacher SFT
    def _teacher_sft(self) -> ModelConfig:
        """Supervised stage: fine-tune the teacher on the training completions (cross-entropy per
        completion token, same normalization as distillation), export it, return its ModelConfig.
        A fresh run always trains it; a resumed run loads the export of its first session."""
        cfg, sft = self.cfg, self.cfg.teacher.sft
        out_dir = os.path.join(cfg.output_dir, "teacher-sft")
        loaded = ModelConfig(name_or_path=out_dir, dtype=cfg.teacher.model.dtype,
                             trust_remote_code=cfg.teacher.model.trust_remote_code,
                             processor=cfg.teacher.model.processor)
        if self.resume_tag is not None:  # the stage finished before the first checkpoint
            if not os.path.isfile(os.path.join(out_dir, "config.json")):
                raise FileNotFoundError(f"--resume: the supervised teacher {out_dir} is missing")
            self.log.info(f"[gold_ds] teacher SFT: resuming with {out_dir}")
            return loaded
        engine = build_training_engine(cfg.teacher.model, sft.deepspeed, self.world)
        micro, ga = sft.deepspeed["train_micro_batch_size_per_gpu"], sft.deepspeed["gradient_accumulation_steps"]
        sampler = RankSampler(len(self.train_data), self.rank, self.world, cfg.seed + 1, cfg.data.shuffle)

        vocab = len(self.teacher_tokenizer)

        def ce(samples, timer):
            t0 = time.perf_counter()
            batch = (self.vlm.teacher.batch(samples) if self.vlm else training_batch(
                [(s.prompt_ids, s.completion_ids) for s in samples], self.teacher_tokenizer.pad_token_id))
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            logits = engine(**{k: v for k, v in batch.items() if k != "loss_mask"}).logits[:, :-1]
            mask = batch["loss_mask"]
            loss = F.cross_entropy(logits[mask][:, :vocab].float(), batch["input_ids"][:, 1:][mask], reduction="sum")
            timer["student"] += time.perf_counter() - t0
            return loss, {}

        t_start = time.perf_counter()
        for step in range(sft.max_steps):
            timer = {"student": 0.0, "optimizer": 0.0}
            windows = [[EncodedExample(*self._teacher_sequence(self.train_data.rows[i]), self.train_data.rows[i].example)
                        for i in sampler.take(micro)] for _ in range(ga)]
            _, total, sums, _ = self._backward_window(engine, windows, ce, timer)
            loss = self._global_sum([sum(sums)])[0] / total
            if (step + 1) % cfg.logging.every == 0:
                self.log.log(step + 1, {"loss": loss}, stage="teacher_sft")
            if (step + 1) % max(1, sft.max_steps // 10) == 0:
                self.log.info(f"[gold_ds] teacher SFT step {step + 1}/{sft.max_steps} loss {loss:.4f}")
        export_hf(engine, self.vlm.teacher.processor if self.vlm else self.teacher_tokenizer, out_dir)
        self.log.info(f"[gold_ds] teacher SFT: {sft.max_steps} steps in {time.perf_counter() - t_start:.0f}s, "
                      f"exported to {out_dir}")
        engine.destroy()
        del engine
        gc.collect()
        return loaded

    # ------------------------------------------------------------------------------------ one step
    def _sample_student(self, prompts: list, G: int, timer: dict) -> list:
        """``G`` on-policy samples per prompt, in one call (every rank calls it). A vLLM backend gets
        the student's current weights with the call when a sync is due: before the first rollout and
        then every ``rollout.sync_every`` steps (the buckets are gathered collectively)."""
        if self.rollout_gen is self.student_gen:
            return self.student_gen.generate(prompts, G)
        r = self.cfg.rollout
        due = self._synced_at is None or self.step - self._synced_at >= r.sync_every
        weights = gathered_weight_buckets(self.student.module, r.sync_bucket_mb << 20) if due else None
        samples = self.rollout_gen.generate(prompts, G, weights=weights)
        if due:
            self._synced_at, timer["weight_sync"] = self.step, self.rollout_gen.last_sync_seconds
        return samples

    def train_step(self) -> dict:
        cfg, G = self.cfg, self.cfg.distill.num_generations
        t_step = self._now()
        timer = {"rollout": 0.0, "teacher": 0.0, "student": 0.0, "optimizer": 0.0}
        flags = self._draw_policy(self.step)
        rows = [[self.train_data.rows[i] for i in self.sampler.take(self.micro // G if on else self.micro)]
                for on in flags]

        # rollout: every on-policy prompt of the window in one call (the same calls on every rank)
        t0 = self._now()
        seqs = [None if on else list(rs) for rs, on in zip(rows, flags)]  # per micro-step: its samples
        on_prompts = [r.prompt_ids for rs, on in zip(rows, flags) if on for r in rs]
        if on_prompts:
            samples = iter(self._sample_student(on_prompts, G, timer))
            for m, on in enumerate(flags):
                if on:
                    seqs[m] = [EncodedExample(r.prompt_ids, next(samples), r.example) for r in rows[m] for _ in range(G)]
        if cfg.distill.seq_kd and not all(flags):
            off_prompts = [self._teacher_prompt_ids(r) for rs, on in zip(rows, flags) if not on for r in rs]
            samples = iter(self.teacher_gen.generate(off_prompts, 1))
            for m, on in enumerate(flags):
                if not on:
                    seqs[m] = [self._student_sample(r, next(samples)) for r in rows[m]]
        timer["rollout"] = self._now() - t0

        tokens, total, sums, counters = self._backward_window(self.student, seqs, self.objective, timer)
        on_sum = sum(s for s, on in zip(sums, flags) if on)
        off_sum = sum(s for s, on in zip(sums, flags) if not on)
        on_tok = sum(t for t, on in zip(tokens, flags) if on)
        keys = sorted(counters)
        g = self._global_sum([on_sum, off_sum] + [float(counters[k]) for k in keys])
        counters = dict(zip(keys, g[2:]))
        align = {}
        if self.cross:
            align = {"align/coverage": counters["align/covered_bytes"] / max(counters["align/total_bytes"], 1.0),
                     "align/groups_per_token": counters["align/groups"] / total,
                     "align/unaligned_samples": int(counters["align/unaligned_samples"])}
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
            "time/optimizer": times[3], "time/step": dt, **align,
            **({"time/weight_sync": timer["weight_sync"]} if "weight_sync" in timer else {}),
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
            export_hf(self.student, self.vlm.student.processor if self.vlm else self.tokenizer,
                      os.path.join(cfg.output_dir, "export"))
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
