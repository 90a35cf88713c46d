"""Start-up and memory of the data stage: a checkout's launch/train.py on a large generated dataset.

    python bench/data.py [--rows 200000] [--old-commit COMMIT] [--num-proc 2]

Writes a conversational JSONL of ``--rows`` arithmetic rows whose completions are about 300 tokens
(chains of additions; the demo's byte-level tokenizer spells them digit by digit), then launches
``deepspeed --num_gpus 2 launch/train.py`` on the demo preset (no teacher SFT, no evaluation, one
optimizer step, models with 1,024 positions) for two checkouts, one after the other:

- ``old``: a git worktree of ``--old-commit`` (default: the last commit before the encoded-data
  cache), where every rank reads all rows into Python and encodes them one by one;
- ``new``: this checkout (one encoder per node with ``data.num_proc`` workers, the cache), launched
  twice: the first launch encodes, the relaunch finds the cache.

For each launch: seconds from the launcher's start to the first optimizer step's record in
``metrics.jsonl``, and each rank's peak resident memory (VmHWM of the rank process, sampled every
0.2 s; the map's worker processes, forked by a node's first rank, have exited by the first step
and are not counted). The growth due to the data is the peak minus the same launch's peak with a
2,000-row dataset. Each launch gets an empty
``HF_DATASETS_CACHE``, so none reuses another's JSON-to-Arrow conversion.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_COMMIT = "09f0286"


def write_rows(path: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            chain = " ".join(f"{x}+{y}={x + y}." for x, y in ((rng.randint(10, 99), rng.randint(10, 99))
                                                            for _ in range(30)))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{a}+{b}="},
                                             {"role": "assistant", "content": f"{chain} {a + b}"}],
                                "answer": str(a + b)}) + "\n")


def _children(pid: int) -> list:
    out = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except OSError:
        return out
    for k in kids:
        out += [k] + _children(k)
    return out


def _status_kib(pid: int, key: str):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def launch(checkout: str, data: str, out_dir: str, extra: list, port: int) -> dict:
    """One launch: seconds to the first step and the peak RSS of each rank (MiB)."""
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    hf_cache = tempfile.mkdtemp(prefix="bench-data-hf-")
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_DATASETS_CACHE=hf_cache, PYTHONPATH=checkout)
    pos = {"max_position_embeddings": 1024}
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), os.path.join(checkout, "launch", "train.py"),
           "--config", os.path.join(checkout, "ds_configs", "demo-cpu.json"), f"output_dir={out_dir}",
           f"data.train.path={data}", "data.train.builtin=null", "data.train.num_examples=null", "data.eval=null", "data.max_prompt_length=64",
           "data.max_completion_length=512", "teacher.sft.max_steps=0", "max_steps=1", "logging.every=1",
           "logging.progress_bar=false", "export.enabled=false", "checkpoint.every=0", "rollout.max_new_tokens=8",
           "distill.lmbda=0.0", f"student.model.config={json.dumps({**_model(checkout, 'student'), **pos})}",
           f"teacher.model.config={json.dumps({**_model(checkout, 'teacher'), **pos})}"] + extra
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=checkout)
    ranks, first = {}, None
    log = []
    import threading
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        for pid in _children(proc.pid):
            parent = _parents(pid)[:1]
            if "--local_rank" in _cmdline(pid) and not (parent and "--local_rank" in _cmdline(parent[0])):
                hwm = _status_kib(pid, "VmHWM")
                if hwm is not None:
                    ranks[pid] = max(ranks.get(pid, 0), hwm)
        if first is None and os.path.exists(metrics):
            with open(metrics) as f:
                if any('"step": 1' in line and '"loss"' in line for line in f):
                    first = time.perf_counter() - t0
        time.sleep(0.2)
    reader.join(timeout=5)
    shutil.rmtree(hf_cache, ignore_errors=True)
    if proc.returncode != 0 or first is None:
        raise SystemExit(f"launch failed ({proc.returncode}):\n" + "".join(log[-40:]))
    said = [line.strip() for line in log if "[gold_ds]" in line and "examples/s" not in line
            and any(k in line for k in ("data", "ranks on", "start-up"))]
    return {"first_step_s": first, "rank_peak_mib": sorted(v / 1024 for v in ranks.values()), "said": said}


def _parents(pid: int) -> list:
    out = []
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
        out.append(pid)
    return out


def _model(checkout: str, who: str) -> dict:
    with open(os.path.join(checkout, "ds_configs", "demo-cpu.json")) as f:
        return json.load(f)[who]["model"]["config"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--small", type=int, default=2_000)
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--old-commit", default=OLD_COMMIT)
    p.add_argument("--work", default=os.path.join(REPO, "runs", "bench-data"))
    a = p.parse_args()
    os.makedirs(a.work, exist_ok=True)
    data = {n: os.path.join(a.work, f"rows-{n}.jsonl") for n in (a.rows, a.small)}
    for n, path in data.items():
        if not os.path.exists(path):
            write_rows(path, n)
    old = os.path.join(a.work, "old-checkout")
    if not os.path.isdir(old):
        subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", old, a.old_commit], check=True,
                       capture_output=True)
    from gold_ds.data.builtin import builtin_tokenizer
    tok = builtin_tokenizer("arithmetic")
    with open(data[a.rows]) as f:
        sample = [json.loads(next(f))["messages"][-1]["content"] for _ in range(200)]
    mean_tokens = sum(len(tok(s)["input_ids"]) + 1 for s in sample) / len(sample)

    results, port = {}, 29610
    new_extra = [f"data.num_proc={a.num_proc}"]
    plan = [("old", old, a.small, [], "old-small"), ("old", old, a.rows, [], "old"),
            ("new", REPO, a.small, new_extra, "new-small"), ("new", REPO, a.rows, new_extra, "new"),
            ("new", REPO, a.rows, new_extra, "new")]
    for i, (kind, checkout, n, extra, out) in enumerate(plan):
        name = f"{kind} {n} rows" + (" (cached relaunch)" if i == 4 else "")
        results[name] = launch(checkout, data[n], os.path.join(a.work, out), extra, port + i)
        r = results[name]
        print(f"{name}: first step at {r['first_step_s']:.1f}s, rank peaks {[round(x) for x in r['rank_peak_mib']]} MiB",
              flush=True)
        for line in r["said"]:
            print("   ", line)

    def growth(kind, name):
        big, small = results[name]["rank_peak_mib"], results[f"{kind} {a.small} rows"]["rank_peak_mib"]
        return max(b - s for b, s in zip(big, small))
    old_g, new_g = growth("old", f"old {a.rows} rows"), growth("new", f"new {a.rows} rows")
    t_old, t_new = results[f"old {a.rows} rows"]["first_step_s"], results[f"new {a.rows} rows"]["first_step_s"]
    t_cached = results[f"new {a.rows} rows (cached relaunch)"]["first_step_s"]
    print(f"\nbench/data.py: {a.rows:,} conversational rows, completions ~{mean_tokens:.0f} tokens, 2 CPU ranks, "
          f"old = {a.old_commit}, new data.num_proc={a.num_proc}\n")
    print("| path | launch to first step | peak RSS per rank (max) | growth over 2,000 rows |")
    print("|---|---|---|---|")
    for name, g in ((f"old {a.rows} rows", old_g), (f"new {a.rows} rows", new_g),
                    (f"new {a.rows} rows (cached relaunch)", growth("new", f"new {a.rows} rows (cached relaunch)"))):
        r = results[name]
        print(f"| {name} | {r['first_step_s']:.1f} s | {max(r['rank_peak_mib']):.0f} MiB | {g:.0f} MiB |")
    print(f"\n- RSS growth: new {new_g:.0f} MiB vs old {old_g:.0f} MiB: ratio {new_g / old_g:.3f} (target <= 0.1)")
    print(f"- first launch: {t_old / t_new:.2f}x faster than old (target >= 2); cached relaunch {t_cached:.1f} s "
          "(target < 15 s)")


if __name__ == "__main__":
    main()
