"""Per-phase time of a distillation step for the demo models.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 bench/step.py [--steps 20] [KEY=VALUE ...]

Builds the demo preset's engines (the teacher stays randomly initialized: the supervised stage does
not change timings), runs warm-up steps, then ``--steps`` steps each fully on-policy and fully
off-policy, and prints (rank 0) the median time per phase: rollout (generation), teacher forward,
student forward+backward, optimizer, and the whole step. Times are the max over ranks of each phase; then each rank's peak resident memory (VmHWM: the whole process,
model building included), the max over ranks. Compare presets side by side, e.g. a LoRA student
and the same student fully fine-tuned: ``ds_configs/demo-lora-cpu.json`` and ``... student.lora=null
export.merge_lora=false``.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PHASES = ("rollout", "teacher", "student", "optimizer", "step")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="ds_configs/demo-cpu.json")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--local_rank", type=int, default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    import torch
    import torch.distributed as dist
    from gold_ds.config import load_config
    from gold_ds.trainer import build_trainer
    torch.set_num_threads(1)
    rows = {}
    for name, lmbda in (("on-policy", 1.0), ("off-policy", 0.0)):
        cfg = load_config(args.config, ["teacher.sft.max_steps=0", "data.eval=null", "export.enabled=false",
                                        "checkpoint.every=0", "logging.progress_bar=false",
                                        f"output_dir=runs/bench-step/{name}", f"distill.lmbda={lmbda}"]
                          + args.overrides)
        tr = build_trainer(cfg)
        times = {k: [] for k in PHASES}
        for i in range(args.warmup + args.steps):
            m = tr.train_step()
            if i >= args.warmup:
                for k in PHASES:
                    times[k].append(m[f"time/{k}"])
        rows[name] = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        params = {id(p): p for p in tr.student.module.parameters()}.values()
        total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params if p.requires_grad)
        tr.student.destroy()
        tr.teacher.destroy()
    from losses import status_kib  # bench/losses.py, beside this file
    peak = torch.tensor([status_kib("VmHWM") / 2 ** 10])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        ds = cfg.student.deepspeed
        print(f"\nbench/step.py: {args.config}, {dist.get_world_size()} ranks on "
              f"{tr.accelerator.device_name()}, micro batch {ds['train_micro_batch_size_per_gpu']} x GA "
              f"{ds['gradient_accumulation_steps']}, rollout max_new_tokens {cfg.rollout.max_new_tokens}; "
              f"median of {args.steps} steps, ms\n")
        print("| step kind | " + " | ".join(PHASES) + " |")
        print("|---|" + "---|" * len(PHASES))
        for name, r in rows.items():
            print(f"| {name} | " + " | ".join(f"{r[k]:.0f}" for k in PHASES) + " |")
        lora = cfg.student.lora
        print(f"\nstudent: {'LoRA rank %d on %s' % (lora.rank, lora.target_modules) if lora else 'full fine-tuning'}, "
              f"{trainable} of the module's {total} parameters train; peak RSS per rank (max over ranks): {peak.item():.0f} MiB")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
