"""Run one preset and variants of it (same steps, same data, the same frozen teacher), over one or
more seeds, then print one table of the student after each: greedy exact match (mean and standard
deviation over the seeds, and the share of the teacher-student gap it closes), and teacher-forced on
the reference answers the per-character (per-digit) accuracy and the answer NLL (see
``gold_ds.trainer.evaluate``).

    python launch/compare.py --config ds_configs/<preset>.json [--num_gpus N] [--seeds 0 1 2] \\
        [KEY=VALUE ...] --variant NAME KEY=VALUE [KEY=VALUE ...] [--variant ...]

The preset runs first (its own name, the first seed), under the deepspeed launcher, into
``<output_dir>``; every other run (a variant, or the preset at another seed) into
``<output_dir>/variants/<NAME>/seed<S>``. Seed S sets ``seed=S`` (data order, sampling) and
``student.model.init_seed=S+1`` (the student's initialization). When the preset trains its teacher
(``teacher.sft``), every other run loads that run's exported teacher instead of training its own, so
every row distills the same teacher. Overrides before ``--variant`` apply to every run. Each run's
figures come from its ``results.json``; ``--reuse`` keeps a run whose ``results.json`` exists (same
command assumed) instead of running it again. The table goes to ``<output_dir>/compare.md``, every
run's figures to ``compare.json``.
"""
import argparse
import json
import os
import statistics
import re
import shutil
import socket
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gold_ds.config import ConfigError, load_config  # noqa: E402

TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")


def _port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _run(args, overrides) -> dict:
    cfg = load_config(args.config, overrides)  # fails early, with the config's own message
    done = os.path.join(cfg.output_dir, "results.json")
    if args.reuse and os.path.exists(done):
        print(f"[compare] reusing {done}", flush=True)
        with open(done) as f:
            return {"results": json.load(f), "cfg": cfg}
    launcher = shutil.which("deepspeed")
    if launcher is None:
        raise SystemExit("gold_ds: the deepspeed launcher is not on PATH (pip install deepspeed)")
    cmd = [launcher, "--num_gpus", str(args.num_gpus), "--master_port", str(_port()), TRAIN,
           "--config", args.config, *overrides]
    print("[compare] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    with open(os.path.join(cfg.output_dir, "results.json")) as f:
        return {"results": json.load(f), "cfg": cfg}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--num_gpus", type=int, default=2, help="ranks per run (CPU: processes)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="run every row once per seed (default: the preset's own seed, as it is)")
    parser.add_argument("--reuse", action="store_true", help="keep runs whose results.json exists")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE",
                        help="a variant's name, then its overrides")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for every run")
    args = parser.parse_args(argv)
    for v in args.variant:
        if not re.fullmatch(r"[\w.+-]+", v[0]) or len(v) < 2:
            parser.error(f"--variant {' '.join(v)}: expected a name ([A-Za-z0-9_.+-]) then KEY=VALUE overrides")
    try:
        base_cfg = load_config(args.config, args.overrides)
        for v in args.variant:
            load_config(args.config, args.overrides + v[1:])
    except ConfigError as e:
        print(f"gold_ds: {e}", file=sys.stderr)
        return 2

    seeds = args.seeds or [None]
    seeded = lambda seed: [] if seed is None else [f"seed={seed}", f"student.model.init_seed={seed + 1}"]  # noqa: E731
    runs = [(base_cfg.name, seeds[0], _run(args, args.overrides + seeded(seeds[0])))]
    shared = list(args.overrides)
    if base_cfg.teacher.sft.max_steps > 0:  # every other run distills the preset's trained teacher
        teacher_dir = os.path.abspath(os.path.join(base_cfg.output_dir, "teacher_sft"))
        shared += [f"teacher.model.name_or_path={teacher_dir}", "teacher.model.config=null",
                   "teacher.model.tokenizer=null", "teacher.sft.max_steps=0"]
    for name, *overrides in [[base_cfg.name]] + args.variant:
        for seed in seeds:
            if name == base_cfg.name and seed == seeds[0]:
                continue
            out = os.path.join(base_cfg.output_dir, "variants", name, f"seed{seed}" if seed is not None else "")
            runs.append((name, seed, _run(args, shared + seeded(seed) + [f"output_dir={out.rstrip(os.sep)}",
                                                                        f"name={name}"] + overrides)))
    table, figures = _table(runs)
    print(table)
    with open(os.path.join(base_cfg.output_dir, "compare.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(base_cfg.output_dir, "compare.json"), "w") as f:
        json.dump(figures, f, indent=1)
    return 0


def _stat(values, fmt) -> str:
    """``mean`` of one value, ``mean ± sd`` of several."""
    mean = statistics.fmean(values)
    return fmt.format(mean) + (" ± " + fmt.format(statistics.stdev(values)) if len(values) > 1 else "")


def _table(runs) -> tuple:
    """(markdown table, per-run figures) of ``runs``: (name, seed, run) in order."""
    first = runs[0][2]["results"]
    teacher, before = first["after"].get("teacher_accuracy"), first["before"]
    figures, names = [], []
    for name, seed, run in runs:
        r = run["results"]
        figures.append({"name": name, "seed": seed, "exact_match": r["after"]["accuracy"],
                        "char_accuracy": r["after"].get("char_accuracy"), "answer_nll": r["after"].get("answer_nll"),
                        "wall_time": r["wall_time"]})
        if name not in names:
            names.append(name)
    n_seeds = max(sum(f["name"] == n for f in figures) for n in names)
    lines = [f"| run ({n_seeds} seed{'s' if n_seeds > 1 else ''}) | exact match | gap closed | char accuracy "
             f"(teacher-forced) | answer NLL (nats) | wall time |", "|---|---|---|---|---|---|",
             f"| teacher | {teacher:.3f} | | | | |",
             f"| student before | {before['accuracy']:.3f} | | {before.get('char_accuracy', float('nan')):.3f} | "
             f"{before.get('answer_nll', float('nan')):.2f} | |"]
    for name in names:
        mine = [f for f in figures if f["name"] == name]
        em = [f["exact_match"] for f in mine]
        gap = (f"{(statistics.fmean(em) - before['accuracy']) / (teacher - before['accuracy']):.0%}"
               if teacher > before["accuracy"] else "-")
        lines.append(f"| {name} | {_stat(em, '{:.3f}')} | {gap} | {_stat([f['char_accuracy'] for f in mine], '{:.3f}')}"
                     f" | {_stat([f['answer_nll'] for f in mine], '{:.2f}')} | "
                     f"{statistics.fmean(f['wall_time'] for f in mine):.0f}s |")
    return "\n".join(lines), figures


if __name__ == "__main__":
    sys.exit(main())
