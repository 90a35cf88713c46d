"""Benchmark: gold_ds.losses against the straightforward full-materialization implementation.

    python3 bench/losses.py [--rows 4096] [--vs 32000] [--vt 50000] [--repeats 2]

"plain" is tests/reference_losses.py run in fp32 (softmaxes, padding, sorts and every intermediate
for the whole batch, gradients by autograd); "gold_ds" is the library with its automatic chunk size.
Inputs are fp32, the student's logits need a gradient, the teacher's do not (as in distillation).
generalized_jsd needs one vocabulary: it runs at Vs x Vs. hybrid_uld matches 3/4 of the student
vocabulary to random teacher ids.

Every measurement is one forward + backward in a fresh subprocess, so no run inherits another's
heap; plain and gold_ds subprocesses alternate --repeats times per loss (this 2-core machine is
shared, so alternating spreads load changes over both), and the table keeps the minimum time and
the maximum peak of each. In each subprocess,
after the inputs exist and a small warm-up call has run, the kernel's peak-RSS counter is reset
(writing "5" to /proc/self/clear_refs) and the current VmRSS taken as baseline; after forward +
backward the peak is VmHWM from /proc/self/status. "Peak extra" = VmHWM - baseline: every byte the
loss touched beyond its inputs, including the student gradient both implementations must return
(torch's CPU allocator hands large blocks straight to the OS, so the RSS high-water mark is the
allocator's real peak). Time is wall-clock forward + backward.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import reference_losses as plain  # noqa: E402
import gold_ds.losses as gold  # noqa: E402

LOSSES = ("generalized_jsd", "uld", "hybrid_uld")


def make_inputs(loss, rows, vs, vt):
    gen = torch.Generator().manual_seed(0)
    vt = vs if loss == "generalized_jsd" else vt
    s = (torch.randn(rows, vs, generator=gen) * 2).requires_grad_()
    t = torch.randn(rows, vt, generator=gen) * 2
    k = 3 * vs // 4
    ids = (torch.randperm(vs, generator=gen)[:k], torch.randperm(vt, generator=gen)[:k])
    return s, t, ids


def call(impl, loss, s, t, ids):
    lib = gold if impl == "gold_ds" else plain
    if loss == "generalized_jsd":
        return lib.generalized_jsd(s, t, beta=0.5, temperature=1.0) if impl == "gold_ds" else \
            lib.generalized_jsd(s, t, 0.5, 1.0)
    if loss == "uld":
        return lib.uld(s, t)
    return lib.hybrid_uld(s, t, *ids)


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(loss, impl, rows, vs, vt):
    """Runs in its own process; returns time (s) and peak extra memory (MiB) of one forward+backward."""
    small = make_inputs(loss, 8, 64, 96)
    call(impl, loss, *small).backward()
    s, t, ids = make_inputs(loss, rows, vs, vt)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_kib("VmRSS")
    start = time.perf_counter()
    call(impl, loss, s, t, ids).backward()
    elapsed = time.perf_counter() - start
    return {"time_s": elapsed, "peak_extra_mib": (status_kib("VmHWM") - base) / 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vs", type=int, default=32000)
    parser.add_argument("--vt", type=int, default=50000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("LOSS", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.rows, args.vs, args.vt)))
        return
    print(f"{args.rows} rows, Vs={args.vs}, Vt={args.vt} (generalized_jsd: Vs x Vs), fp32, "
          f"{torch.get_num_threads()} threads, forward+backward; min time / max peak of {args.repeats} "
          f"alternating runs each")
    print(f"| loss | plain time (s) | gold_ds time (s) | time ratio | plain peak extra (MiB) "
          f"| gold_ds peak extra (MiB) | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for loss in LOSSES:
        runs = {"plain": [], "gold_ds": []}
        for _ in range(args.repeats):
            for impl, done in runs.items():
                cmd = [sys.executable, __file__, "--one", loss, impl, "--rows", str(args.rows),
                       "--vs", str(args.vs), "--vt", str(args.vt)]
                done.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        p, g = ({"time_s": min(r["time_s"] for r in done), "peak_extra_mib": max(r["peak_extra_mib"] for r in done)}
                for done in runs.values())
        print(f"| {loss} | {p['time_s']:.2f} | {g['time_s']:.2f} | {g['time_s'] / p['time_s']:.2f} "
              f"| {p['peak_extra_mib']:.0f} | {g['peak_extra_mib']:.0f} "
              f"| {g['peak_extra_mib'] / p['peak_extra_mib']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
