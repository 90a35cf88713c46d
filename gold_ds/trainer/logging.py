"""Metrics: one step's record (``step_metrics``), and rank 0's outputs (a progress bar, a JSONL
metrics file and Weights & Biases).

Only rank 0 constructs a ``MetricsLogger`` with ``enabled=True``; on other ranks every call is a no-op.

Metric names: plain for the step's headline figures (``loss``, ``tokens``, ``tokens_per_s``,
``on_policy_share``, ``lr``, ``skipped_steps``), ``<group>/<name>`` for the rest: ``loss/on_policy``,
``loss/off_policy``, ``time/<phase>``, ``align/...``, ``data/...``, ``eval/...``.
"""
import json
import os

from .collective import global_sums_and_maxima

PHASES = ("rollout", "teacher", "student", "optimizer")


def seconds_since_launch():
    """Seconds since this process started (Linux: /proc), or None where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, after the comm field
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def step_metrics(*, flags, tokens, losses, counters, seconds, rollout, lr, skipped_steps, step_seconds,
                 device) -> dict:
    """The record of one optimizer step. Called by every rank (sums and maxima over ranks).

    ``flags``: on-policy per micro-step; ``tokens``: completion tokens per micro-step, all ranks;
    ``losses``: this rank's summed loss per micro-step; ``counters``: this rank's micro batch counters
    summed over the window; ``seconds``: this rank's time per phase; ``rollout``: the rollout's metrics;
    ``skipped_steps``: optimizer steps skipped so far for NaN/inf values (``gold_ds.trainer.stop``).
    Losses are per completion token (the window's normalization); times are the slowest rank's."""
    total = sum(tokens)
    on_tok = sum(t for t, on in zip(tokens, flags) if on)
    keys = sorted(counters)
    g, times = global_sums_and_maxima(
        [sum(x for x, on in zip(losses, flags) if on), sum(x for x, on in zip(losses, flags) if not on)]
        + [float(counters[k]) for k in keys], [seconds.get(k, 0.0) for k in PHASES], device)
    counted = dict(zip(keys, g[2:]))
    out = {
        "loss": (g[0] + g[1]) / total,
        "loss/on_policy": g[0] / on_tok if on_tok else None,
        "loss/off_policy": g[1] / (total - on_tok) if total > on_tok else None,
        "tokens": int(total),
        "tokens_per_s": total / step_seconds,
        "on_policy_share": sum(flags) / len(flags),
        "lr": lr,
        "skipped_steps": skipped_steps,
        **{f"time/{k}": t for k, t in zip(PHASES, times)},
        "time/step": step_seconds,
        **rollout,
    }
    if "align/total_bytes" in counted:  # across tokenizers
        out.update({"align/coverage": counted["align/covered_bytes"] / max(counted["align/total_bytes"], 1.0),
                    "align/groups_per_token": counted["align/groups"] / total,
                    "align/unaligned_samples": int(counted["align/unaligned_samples"])})
    return out


class MetricsLogger:
    def __init__(self, cfg, enabled: bool, resumed: bool = False):
        self.enabled, self.cfg = enabled, cfg
        self.bar = self.wandb_run = self.jsonl = None
        self._wandb_from = 0
        if not enabled:
            return
        os.makedirs(cfg.output_dir, exist_ok=True)
        self.jsonl = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a" if resumed else "w")
        w = cfg.logging.wandb
        if w.enabled:
            try:
                import wandb
            except ImportError:
                raise ImportError("logging.wandb.enabled is true but wandb is not installed: "
                                  "pip install 'gold_ds[wandb]' (or set logging.wandb.enabled=false)") from None
            from ..config import config_to_dict
            id_file = os.path.join(cfg.output_dir, "wandb-run-id")  # a resumed run continues the same W&B run
            run_id = open(id_file).read().strip() if resumed and os.path.isfile(id_file) else None
            self.wandb_run = wandb.init(project=w.project, entity=w.entity, name=w.run_name or cfg.name,
                                        mode=w.mode, tags=w.tags or None, dir=cfg.output_dir,
                                        config=config_to_dict(cfg), id=run_id, resume="allow" if run_id else None)
            with open(id_file, "w") as f:
                f.write(self.wandb_run.id)
            # a resumed W&B run holds the steps logged before the interruption, including those the
            # resumed run redoes after its checkpoint (with the same values: resume is exact); W&B
            # refuses steps below its own, so they are not sent again
            self._wandb_from = self.wandb_run.step if run_id else 0

    def drop_records_after(self, step: int) -> None:
        """On resume: drop the distillation records after ``step`` (the checkpoint's), which the
        resumed run logs again, so that every step appears once in ``metrics.jsonl``."""
        if not self.enabled:
            return
        path = self.jsonl.name
        self.jsonl.close()
        with open(path) as f:
            lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(path + ".tmp", path)
        self.jsonl = open(path, "a")

    def start_progress(self, total_steps: int, initial_step: int) -> None:
        if self.enabled and self.cfg.logging.progress_bar:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=initial_step, desc=self.cfg.name, dynamic_ncols=True,
                            mininterval=1.0)

    def info(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def log(self, step: int, metrics: dict, stage: str = None) -> None:
        """A metrics record. ``stage`` names a stage before distillation (the teacher's supervised
        stage): its records go to the JSONL file only, as W&B's step axis belongs to distillation."""
        if not self.enabled:
            return
        head = {"stage": stage, "stage_step": step} if stage else {"step": step}
        self.jsonl.write(json.dumps({**head, **metrics}) + "\n")
        self.jsonl.flush()
        if self.wandb_run is not None and stage is None and step >= self._wandb_from:
            self.wandb_run.log(metrics, step=step)

    def progress(self, metrics: dict) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        self.bar.set_postfix({"loss": f"{metrics['loss']:.4f}", "tok/s": f"{metrics['tokens_per_s']:.0f}",
                              "on-policy": f"{metrics['on_policy_share']:.2f}"}, refresh=False)

    def table(self, step: int, name: str, columns: list, rows: list) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, name: [dict(zip(columns, r)) for r in rows]}) + "\n")
        self.jsonl.flush()
        if self.wandb_run is not None and step >= self._wandb_from:
            import wandb
            self.wandb_run.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def summary(self, results: dict) -> None:
        """The run's results: ``results.json`` in the output dir, and W&B's run summary (scalars)."""
        if not self.enabled:
            return
        with open(os.path.join(self.cfg.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        if self.wandb_run is not None:
            self.wandb_run.summary.update({k: v for k, v in results.items() if not isinstance(v, dict)})

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
