"""Output heads: logits materialized in full vs. applied inside the fused loss (distill.logits).

Two modes.

    python bench/heads.py loss [--rows 2048 --vocab 131072 --student-hidden 512 --teacher-hidden 1024]
                               [--repeats 3] [--chunk-size N (linear_generalized_jsd's; default automatic)]

Loss level, fp32, one forward + backward from hidden states: the student's hidden states and head
weight need gradients, the teacher's are frozen; generalized JSD, beta 0.5, reduction sum. Methods:
"logits + generalized_jsd" (both [rows, V] logits materialized, then ``gold_ds.losses.generalized_jsd``),
"plain torch" (full logits, log_softmax, the JSD formula of tests/reference_losses.py in log space,
autograd), "TRL ChunkedDivergenceFunction" (``trl.kernels.chunked_divergence``, the hidden-state
kernel of TRL's DistillationTrainer, on its torch (non-Triton) path; skipped if trl is not
importable; bench/requirements.txt pins it) and "gold_ds linear_generalized_jsd". Each method runs
in its own fresh subprocess: a small warm-up call, the inputs allocated (every page written), then
1 + --repeats full-size calls. Before each call the kernel's RSS high-water mark is reset (writing
"5" to /proc/self/clear_refs) and VmRSS taken as the baseline; "peak extra" = VmHWM after the call -
baseline (it includes the student gradients every method must return: [V, Hs] fp32 = 256 MiB at the
defaults), the maximum over the calls (the first, cold call is the largest). Time: the median of the
--repeats calls after the first (warm-up) call. Every method's loss is compared with
linear_generalized_jsd's.

    python bench/heads.py step [--steps 3] [--warmup 1]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 bench/heads.py step     (the same: rank 0 runs the driver)

Training-step level on 2 CPU ranks: Mistral's tekken tokenizer (131,072 tokens, from mistral_common,
converted to a Hugging Face tokenizer in runs/bench-heads/tekken), a Llama student (hidden 512, 2
layers) and a Qwen2 teacher (hidden 1024, 2 layers), both with vocabulary 131,072, built from
configs and randomly initialized; ``jsd``, off-policy only (lmbda 0), fp32, micro-steps of 4
sequences x --completion tokens per rank, GA 1, no eval / export / teacher SFT / checkpoints. The
data is a synthetic local JSONL of plain-text prompt/completion rows (short prompts, completions of
well over 512 tokens, cut to data.max_completion_length). The driver runs four configurations,
distill.logits in {full, sharded} x completion length in {8, 512}, each in its own
``deepspeed --num_gpus 2`` launch (a fresh process group), one of which is

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 bench/heads.py step --logits sharded --completion 512

and prints per configuration: the peak RSS (VmHWM of each rank process at the end, max over the 2
ranks; it includes start-up), its growth over the 8-token run of the same mode (what grows with
tokens x vocabulary), the VmHWM right after the trainer is built, and the median step time
(``time/step``, max over ranks) of --steps steps after --warmup steps. The 8-token runs use
max(--steps, 4) steps after 1 warm-up step (they are cheap).
"""
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from losses import status_kib  # noqa: E402  (bench/losses.py, beside this file)

WORKDIR = os.path.join(ROOT, "runs", "bench-heads")
TOKENIZER_DIR = os.path.join(WORKDIR, "tekken")
DATA_PATH = os.path.join(WORKDIR, "train.jsonl")
RESULT_TAG = "BENCH_HEADS_RESULT "


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# ============================================================================ loss level
METHODS = {
    "logits": "logits + gold_ds generalized_jsd",
    "plain": "plain torch (full logits, log_softmax, autograd)",
    "trl": "TRL ChunkedDivergenceFunction (torch path)",
    "linear": "gold_ds linear_generalized_jsd",
}
BETA = 0.5


def make_inputs(rows, vocab, hs, ht):
    import torch
    g = torch.Generator().manual_seed(0)
    s_h = torch.randn(rows, hs, generator=g).requires_grad_()
    s_w = (torch.randn(vocab, hs, generator=g) * (2 / hs ** 0.5)).requires_grad_()  # logits ~ N(0, 4)
    t_h = torch.randn(rows, ht, generator=g)
    t_w = torch.randn(vocab, ht, generator=g) * (2 / ht ** 0.5)
    return s_h, s_w, t_h, t_w


def loss_fn(method, chunk_size=None):
    import math
    import torch
    if method == "logits":
        from gold_ds.losses import generalized_jsd

        def fn(s_h, s_w, t_h, t_w):
            s = s_h @ s_w.T
            with torch.no_grad():
                t = t_h @ t_w.T
            return generalized_jsd(s, t, beta=BETA, temperature=1.0, reduction="sum")
    elif method == "plain":
        def fn(s_h, s_w, t_h, t_w):
            ls = torch.log_softmax(s_h @ s_w.T, -1)
            with torch.no_grad():
                lt = torch.log_softmax(t_h @ t_w.T, -1)
            lm = torch.logaddexp(ls + math.log(1 - BETA), lt + math.log(BETA))  # log(beta p_t + (1-beta) p_s)
            rows = BETA * (lt.exp() * (lt - lm)).sum(-1) + (1 - BETA) * (ls.exp() * (ls - lm)).sum(-1)
            return rows.sum()
    elif method == "trl":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        def fn(s_h, s_w, t_h, t_w):
            # TRL's mixture is (1 - beta) p_s + beta p_t, loss beta KL(p_t||m) + (1 - beta) KL(p_s||m): gold_ds's.
            div, _entropy = ChunkedDivergenceFunction.apply(s_h, s_w, None, t_h, t_w, None, BETA, 1.0,
                                                            1.0, None, 1.0, None)
            return div.sum()
    else:
        from gold_ds.losses import linear_generalized_jsd

        def fn(s_h, s_w, t_h, t_w):
            return linear_generalized_jsd(s_h, s_w, t_h, t_w, beta=BETA, temperature=1.0, reduction="sum",
                                          chunk_size=chunk_size)
    return fn


def measure_loss(method, rows, vocab, hs, ht, repeats, chunk_size=None):
    """In its own process: time, peak extra memory and loss of 1 + repeats forward+backward calls."""
    import torch
    fn = loss_fn(method, chunk_size)
    small = make_inputs(16, 256, 32, 48)
    fn(*small).backward()
    del small
    inputs = make_inputs(rows, vocab, hs, ht)
    s_h, s_w = inputs[0], inputs[1]
    input_mib = sum(x.numel() * x.element_size() for x in inputs) / 2 ** 20
    times, peaks, losses = [], [], []
    for _ in range(1 + repeats):
        s_h.grad = s_w.grad = None
        gc.collect()
        reset_peak()
        base = status_kib("VmRSS")
        start = time.perf_counter()
        loss = fn(*inputs)
        loss.backward()
        times.append(time.perf_counter() - start)
        peaks.append((status_kib("VmHWM") - base) / 2 ** 20)  # GiB
        losses.append(float(loss))
        del loss
    grad_norm = float(torch.linalg.vector_norm(s_w.grad))
    return {"times_s": times, "peaks_gib": peaks, "losses": losses, "input_mib": input_mib,
            "grad_w_norm": grad_norm, "threads": torch.get_num_threads()}


def run_loss(args):
    if args.one:
        print(RESULT_TAG + json.dumps(measure_loss(args.one, args.rows, args.vocab, args.student_hidden,
                                                   args.teacher_hidden, args.repeats, args.chunk_size)))
        return
    try:
        import trl  # noqa: F401
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    methods = [m for m in METHODS if m != "trl" or trl_version is not None]
    results = {}
    for m in methods:
        cmd = [sys.executable, os.path.abspath(__file__), "loss", "--one", m, "--rows", str(args.rows),
               "--vocab", str(args.vocab), "--student-hidden", str(args.student_hidden),
               "--teacher-hidden", str(args.teacher_hidden), "--repeats", str(args.repeats)]
        if args.chunk_size is not None:
            cmd += ["--chunk-size", str(args.chunk_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[m] = json.loads(next(l for l in out.splitlines() if l.startswith(RESULT_TAG))[len(RESULT_TAG):])
        r = results[m]
        print(f"[{m}] times {['%.2f' % t for t in r['times_s']]} s, peaks {['%.2f' % p for p in r['peaks_gib']]} GiB, "
              f"loss {r['losses'][0]:.6f}, |grad W_s| {r['grad_w_norm']:.6e}", file=sys.stderr, flush=True)
    ref = results["linear"]
    chunk = args.chunk_size if args.chunk_size is not None else "automatic"
    print(f"\nbench/heads.py loss: {args.rows} rows, V={args.vocab}, Hs={args.student_hidden}, "
          f"Ht={args.teacher_hidden}, fp32, beta {BETA}, reduction sum, {ref['threads']} threads; "
          f"linear_generalized_jsd chunk_size {chunk}; inputs "
          f"{ref['input_mib']:.0f} MiB; forward+backward; time = median of {args.repeats} after 1 warm-up call, "
          f"peak extra = max over the {1 + args.repeats} calls; TRL "
          f"{trl_version if trl_version else 'not installed (skipped)'}\n")
    print("| method | time (s) | peak extra (GiB) | loss | rel. diff vs linear_generalized_jsd | "
          "rel. diff grad W_s norm |")
    print("|---|---|---|---|---|---|")
    for m in methods:
        r = results[m]
        t = statistics.median(r["times_s"][1:]) if len(r["times_s"]) > 1 else r["times_s"][0]
        rel = abs(r["losses"][0] - ref["losses"][0]) / abs(ref["losses"][0])
        relg = abs(r["grad_w_norm"] - ref["grad_w_norm"]) / ref["grad_w_norm"]
        print(f"| {METHODS[m]} | {t:.2f} | {max(r['peaks_gib']):.2f} | {r['losses'][0]:.4f} | {rel:.1e} | "
              f"{relg:.1e} |")
    lin = max(ref["peaks_gib"])
    t_lin = statistics.median(ref["times_s"][1:])
    t_log = statistics.median(results["logits"]["times_s"][1:])
    print(f"\nlinear_generalized_jsd time / logits+generalized_jsd time: {t_lin / t_log:.2f} (target <= 1)")
    if "trl" in results:
        print(f"linear_generalized_jsd peak / TRL peak: {lin / max(results['trl']['peaks_gib']):.2f} "
              f"(target <= 0.5)")


# ============================================================================ step level
STUDENT = {"model_type": "llama", "vocab_size": 131072, "hidden_size": 512, "intermediate_size": 1536,
           "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 8,
           "max_position_embeddings": 1024, "tie_word_embeddings": False}
TEACHER = {"model_type": "qwen2", "vocab_size": 131072, "hidden_size": 1024, "intermediate_size": 2816,
           "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 4,
           "max_position_embeddings": 1024, "tie_word_embeddings": False}
MICRO_BATCH = 4
PHASES = ("teacher", "student", "optimizer")


def prepare():
    """The tekken tokenizer as a Hugging Face tokenizer, and the synthetic dataset (idempotent)."""
    import random
    os.makedirs(WORKDIR, exist_ok=True)
    if not os.path.isfile(os.path.join(TOKENIZER_DIR, "tokenizer.json")):
        import mistral_common
        from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer
        tok = convert_tekken_tokenizer(os.path.join(os.path.dirname(mistral_common.__file__), "data",
                                                    "tekken_240911.json"))
        tmp = f"{TOKENIZER_DIR}.tmp{os.getpid()}"
        tok.save_pretrained(tmp)
        os.rename(tmp, TOKENIZER_DIR)
    if not os.path.isfile(DATA_PATH):
        rng = random.Random(0)
        words = ("the of and to in is was for on that with as by at from his her an were are which this be "
                 "model teacher student token vocabulary head layer hidden state gradient memory rank shard "
                 "loss step batch chunk softmax logits weight matrix engine partition optimizer sequence "
                 "river mountain window garden letter number city morning evening winter summer table "
                 "distillation probability divergence training inference language sample prompt").split()
        tmp = f"{DATA_PATH}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            for i in range(128):
                text = " ".join(rng.choice(words) for _ in range(1200))  # > 1000 tekken tokens
                f.write(json.dumps({"prompt": f"Document {i}: write on.", "completion": text}) + "\n")
        os.rename(tmp, DATA_PATH)


def step_config(logits, completion, steps):
    from gold_ds.config import load_config
    with open(os.path.join(ROOT, "ds_configs", "demo-cpu.json")) as f:
        raw = json.load(f)
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 11}  # tekken's <s>, </s>, <pad>
    raw["student"]["model"] = {"config": {**STUDENT, **ids}, "tokenizer": TOKENIZER_DIR, "init_seed": 1}
    raw["teacher"]["model"] = {"config": {**TEACHER, **ids}, "tokenizer": TOKENIZER_DIR, "init_seed": 7}
    ds = raw["student"]["deepspeed"]
    ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"] = MICRO_BATCH, 1
    ds["scheduler"]["params"].update(total_num_steps=steps, warmup_num_steps=1)
    raw["data"] = {"train": {"path": DATA_PATH}, "eval": None, "max_prompt_length": 32,
                   "max_completion_length": completion, "on_bad_row": "error"}
    return load_config(raw=raw, overrides=[
        "teacher.sft.max_steps=0", "export.enabled=false", "checkpoint.every=0", "logging.progress_bar=false",
        "logging.every=1", f"max_steps={steps}", "distill.loss=jsd", "distill.lmbda=0", "distill.seq_kd=false",
        f"distill.logits={logits}", f"output_dir=runs/bench-heads/{logits}-{completion}"])


def run_step_one(args):
    """One configuration, on every rank of a ``deepspeed --num_gpus 2`` launch."""
    import torch
    import torch.distributed as dist
    from gold_ds.trainer import build_trainer
    torch.set_num_threads(1)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        prepare()
    while not (os.path.isfile(DATA_PATH) and os.path.isdir(TOKENIZER_DIR)):
        time.sleep(0.5)
    cfg = step_config(args.logits, args.completion, args.warmup + args.steps)
    tr = build_trainer(cfg)
    built_hwm = status_kib("VmHWM")
    times, losses, tokens, phases = [], [], [], {k: [] for k in PHASES}
    for i in range(args.warmup + args.steps):
        m = tr.train_step()
        losses.append(m["loss"])
        tokens.append(m["tokens"])
        if i >= args.warmup:
            times.append(m["time/step"])
            for k in PHASES:
                phases[k].append(m[f"time/{k}"])  # already the max over ranks
    mine = {"hwm_kib": status_kib("VmHWM"), "built_hwm_kib": built_hwm, "times": times}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if dist.get_rank() == 0:
        step_times = [max(r["times"][k] for r in every) for k in range(len(times))]
        print(RESULT_TAG + json.dumps({
            "logits": args.logits, "completion": args.completion, "world": dist.get_world_size(),
            "peak_gib": [r["hwm_kib"] / 2 ** 20 for r in every],
            "built_peak_gib": [r["built_hwm_kib"] / 2 ** 20 for r in every],
            "step_times": step_times, "phases": {k: statistics.median(v) for k, v in phases.items()},
            "losses": losses, "tokens": tokens,
            "device": tr.accelerator.device_name()}), flush=True)
    dist.barrier()
    tr.student.destroy()
    tr.teacher.destroy()
    dist.destroy_process_group()


def run_step_driver(args):
    prepare()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "CROSS_RANK", "CROSS_SIZE")}
    env.setdefault("DS_ACCELERATOR", "cpu")
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    rows = {}
    for k, (logits, completion) in enumerate([("full", 8), ("sharded", 8), ("full", 512), ("sharded", 512)]):
        steps, warmup = (args.steps, args.warmup) if completion > 8 else (max(args.steps, 4), 1)
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(29611 + k), os.path.abspath(__file__), "step",
               "--logits", logits, "--completion", str(completion), "--steps", str(steps), "--warmup", str(warmup)]
        print(f"[bench/heads.py] {' '.join(cmd)}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        lines = [l for l in proc.stdout.splitlines() if RESULT_TAG in l]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-12000:])
            print(f"[bench/heads.py] {logits} x {completion}: FAILED (exit {proc.returncode})", file=sys.stderr)
            rows[(logits, completion)] = None
            continue
        r = json.loads(lines[-1].split(RESULT_TAG, 1)[1])
        r["wall_s"] = time.perf_counter() - t0
        rows[(logits, completion)] = r
        print(f"[bench/heads.py] {logits} x {completion}: peaks {['%.2f' % p for p in r['peak_gib']]} GiB, step times "
              f"{['%.1f' % t for t in r['step_times']]} s, losses {['%.4f' % x for x in r['losses']]}, "
              f"tokens {r['tokens']}, wall {r['wall_s']:.0f} s", file=sys.stderr, flush=True)
    print(f"\nbench/heads.py step: 2 ranks (gloo, CPU, 1 thread each); student Llama H=512 x 2 layers, teacher "
          f"Qwen2 H=1024 x 2 layers, V=131072 (tekken), jsd, off-policy, fp32, micro batch {MICRO_BATCH} x GA 1 per "
          f"rank; step time = median over the timed steps (512: {args.steps} after {args.warmup} warm-up; 8: "
          f"{max(args.steps, 4)} after 1), max over ranks; peak = VmHWM at the end, max over ranks\n")
    print("| logits | completion tokens | peak RSS (GiB) | growth over 8 tokens (GiB) | peak after build (GiB) "
          "| step time (s) | teacher / student / optimizer (s) | first-step loss |")
    print("|---|---|---|---|---|---|---|---|")
    for (logits, completion), r in rows.items():
        if r is None:
            print(f"| {logits} | {completion} | failed | | | | | |")
            continue
        base = rows.get((logits, 8))
        growth = f"{max(r['peak_gib']) - max(base['peak_gib']):.2f}" if base and completion != 8 else "-"
        print(f"| {logits} | {completion} | {max(r['peak_gib']):.2f} | {growth} | {max(r['built_peak_gib']):.2f} | "
              f"{statistics.median(r['step_times']):.2f} | "
              f"{' / '.join('%.2f' % r['phases'][k] for k in PHASES)} | {r['losses'][0]:.5f} |")
    f512, s512, f8, s8 = (rows.get(k) for k in (("full", 512), ("sharded", 512), ("full", 8), ("sharded", 8)))
    if all((f512, s512, f8, s8)):
        gf = max(f512["peak_gib"]) - max(f8["peak_gib"])
        gs = max(s512["peak_gib"]) - max(s8["peak_gib"])
        print(f"\nsharded growth / full growth: {gs / gf:.3f} (target <= 0.25); sharded step time / full step "
              f"time at 512: {statistics.median(s512['step_times']) / statistics.median(f512['step_times']):.2f} "
              f"(target <= 1)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("loss", "step"))
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=131072)
    p.add_argument("--student-hidden", type=int, default=512)
    p.add_argument("--teacher-hidden", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=None,
                   help="loss mode: linear_generalized_jsd's chunk_size (rows; default: its automatic choice)")
    p.add_argument("--one", choices=tuple(METHODS), help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--logits", choices=("full", "sharded"), default=None)
    p.add_argument("--completion", type=int, default=512)
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args()
    if args.mode == "loss":
        run_loss(args)
    elif args.logits is not None:
        run_step_one(args)
    elif "LOCAL_RANK" in os.environ or args.local_rank is not None:
        # Under `deepspeed --num_gpus 2`: rank 0 becomes the driver (each configuration gets its own launch).
        if int(os.environ.get("LOCAL_RANK", args.local_rank or 0)) == 0:
            run_step_driver(args)
    else:
        run_step_driver(args)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
