"""Rank 0's outputs: a progress bar, a JSONL metrics file and Weights & Biases.

Only rank 0 constructs a ``MetricsLogger`` with ``enabled=True``; on other ranks every call is a no-op.
"""
import json
import os


class MetricsLogger:
    def __init__(self, cfg, enabled: bool, resumed: bool = False):
        self.enabled, self.cfg = enabled, cfg
        self.bar = self.wandb_run = self.jsonl = None
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
        if self.wandb_run is not None and stage is None:
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
        if self.wandb_run is not None:
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
