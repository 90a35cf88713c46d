"""VLM batch assembly: per micro-step (gold_ds) vs materializing the whole window up front.

For a window of GA micro-steps of `micro` samples (shapes-task images of `--size` px), both ways
produce the same tensors per micro-step; "per micro-step" runs the assembler when a micro-step
starts and drops its tensors before the next, "whole window" processes every image of the window
first and keeps them until the window ends (as a dataloader that image-processes would).
Reported: assembler time per micro-step (ms, median of --repeats windows) and peak bytes of live
pixel tensors (weak references to every pixel tensor, gold_ds.data.vlm.PIXELS), plus the process's
peak RSS growth during the runs (VmHWM after /proc/self/clear_refs).

    python3 bench/vlm.py [--processor tiny-qwen2vl] [--micro 8] [--ga 8] [--size 224] [--repeats 5]
"""
import argparse
import os
import statistics
import sys
import time
from types import SimpleNamespace as NS

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gold_ds.data import SharedAssembler, encode_dataset  # noqa: E402
from gold_ds.data.cross_tokenizer import CrossTokenizerAssembler  # noqa: E402
from gold_ds.data.vlm import PIXELS, VLMSide, load_processor  # noqa: E402
from gold_ds.data.vlm_tasks import shapes_rows  # noqa: E402


def _rss_peak_reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def run(assemble, window, ga, upfront):
    """One window; returns (ms per micro-step, peak live pixel bytes)."""
    peak = 0
    t0 = time.perf_counter()
    if upfront:
        batches = [assemble(ms) for ms in window]
        peak = PIXELS.live()[1]
        for b in batches:
            _ = b  # the micro-steps would consume them here
        del batches
    else:
        for ms in window:
            b = assemble(ms)
            peak = max(peak, PIXELS.live()[1])
            del b
    return (time.perf_counter() - t0) * 1e3 / ga, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--processor", default="tiny-qwen2vl")
    ap.add_argument("--teacher", default=None, help="cross family: the teacher's processor (e.g. tiny-llava)")
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--ga", type=int, default=8)
    ap.add_argument("--size", type=int, default=224, help="image side in pixels")
    ap.add_argument("--max-pixels", type=int, default=448 * 448, help="Qwen2-VL image processor max_pixels")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    side = VLMSide(load_processor(NS(processor=f"builtin:{a.processor}", trust_remote_code=False)), "student")
    if hasattr(side.processor.image_processor, "max_pixels"):
        side.processor.image_processor.max_pixels = side.processor.image_processor.size["longest_edge"] = a.max_pixels
    rows = shapes_rows(a.micro * a.ga, 0)
    for r in rows:
        r["images"] = [r["images"][0].resize((a.size, a.size))]
    data = encode_dataset(side, rows, max_prompt_length=10 ** 6, max_completion_length=16)
    window = [data[i * a.micro:(i + 1) * a.micro] for i in range(a.ga)]
    assemble = SharedAssembler(side, side).assemble
    label = a.processor
    if a.teacher:
        teacher = VLMSide(load_processor(NS(processor=f"builtin:{a.teacher}", trust_remote_code=False)), "teacher")
        assemble = CrossTokenizerAssembler(side, teacher, 16).assemble
        label = f"{a.processor} <- {a.teacher}"
    results = {}
    for upfront in (False, True, False, True):  # alternate, keep the best time and the largest peak
        times, peaks = [], []
        _rss_peak_reset()
        rss0 = _status("VmRSS")
        for _ in range(a.repeats):
            ms, peak = run(assemble, window, a.ga, upfront)
            times.append(ms)
            peaks.append(peak)
        rss = _status("VmHWM") - rss0
        prev = results.get(upfront, (float("inf"), 0, 0))
        results[upfront] = (min(prev[0], statistics.median(times)), max(prev[1], max(peaks)), max(prev[2], rss))
    print(f"processor {label}; window = GA {a.ga} x micro {a.micro}; images {a.size}x{a.size}")
    print("| assembly | time per micro-step (ms) | peak live pixel tensors (MiB) | peak RSS growth (MiB) |")
    print("|---|---|---|---|")
    for upfront, name in ((False, "per micro-step (gold_ds)"), (True, "whole window up front")):
        t, p, r = results[upfront]
        print(f"| {name} | {t:.1f} | {p / 2**20:.2f} | {r / 2**20:.1f} |")
    print(f"peak pixel memory ratio (per micro-step / whole window): {results[False][1] / results[True][1]:.3f}")


if __name__ == "__main__":
    main()
