"""Run one preset and variants of it (same steps, same data, the same frozen teacher), then print
one table of the student's exact-match accuracy before and after each.

    python launch/compare.py --config ds_configs/<preset>.json [--num_gpus N] [KEY=VALUE ...] \\
        --variant NAME KEY=VALUE [KEY=VALUE ...] [--variant ...]

The preset runs first (its own name), under the deepspeed launcher, into ``<output_dir>``; each
variant runs with its overrides into ``<output_dir>/variants/<NAME>``. When the preset trains its
teacher (``teacher.sft``), the variants load that run's exported teacher instead of training their
own, so every row distills the same teacher. Overrides before ``--variant`` apply to every run.
Each run's figures come from its ``results.json``.
"""
import argparse
import json
import os
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

    runs = [(base_cfg.name, _run(args, args.overrides))]
    shared = list(args.overrides)
    if base_cfg.teacher.sft.max_steps > 0:  # every variant distills the preset's trained teacher
        teacher_dir = os.path.abspath(os.path.join(base_cfg.output_dir, "teacher_sft"))
        shared += [f"teacher.model.name_or_path={teacher_dir}", "teacher.model.config=null",
                   "teacher.model.tokenizer=null", "teacher.sft.max_steps=0"]
    for name, *overrides in args.variant:
        out = os.path.join(base_cfg.output_dir, "variants", name)
        runs.append((name, _run(args, shared + [f"output_dir={out}", f"name={name}"] + overrides)))

    first = runs[0][1]["results"]
    teacher = first["after"].get("teacher_accuracy")
    before = first["before"].get("accuracy")
    lines = ["| run | exact match | gap closed | wall time |", "|---|---|---|---|",
             f"| teacher | {teacher:.3f} | | |", f"| student before | {before:.3f} | | |"]
    for name, run in runs:
        r = run["results"]
        after = r["after"]["accuracy"]
        gap = f"{(after - before) / (teacher - before):.0%}" if teacher > before else "-"
        lines.append(f"| {name} | {after:.3f} | {gap} | {r['wall_time']:.0f}s |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(base_cfg.output_dir, "compare.md"), "w") as f:
        f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
