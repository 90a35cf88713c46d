"""Faults through the real launcher (deepspeed, 2 CPU ranks): SIGTERM to the workers mid-run then
--resume (losses equal the uninterrupted run's, each step logged once), SIGINT to the launcher
alone (no worker outlives it), and a rank killed mid-step (the job ends at once, one line)."""
import json
import os
import signal
import subprocess
import time

import psutil

from conftest import REPO, free_port, tiny_raw

TRAIN = os.path.join(REPO, "launch", "train.py")
EXIT_PREEMPTED, EXIT_LOST_RANK = 75, 3


def _env():
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=REPO)


def _preset(tmp_path, name, **top):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(tiny_raw(tmp_path / name, **{"max_steps": 12, **top})))
    return str(path)


def _launch(preset, *extra, session=False):
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), TRAIN, "--config", preset, *extra]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=session)


def _records(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in map(json.loads, f) if "loss" in r and "step" in r]


def _wait_for_step(proc, out_dir, step, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(r["step"] >= step for r in _records(out_dir)):
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout}s")


def _workers(proc):
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank" in " ".join(p.cmdline())]


def _no_worker_left(preset, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        left = [p for p in psutil.process_iter(["cmdline"]) if preset in " ".join(p.info["cmdline"] or [])]
        if not left:
            return True
        time.sleep(0.5)
    return False


def test_sigterm_to_the_workers_then_resume(tmp_path):
    whole, cut = _preset(tmp_path, "whole"), _preset(tmp_path, "cut")
    ref = _launch(whole)
    out = ref.communicate(timeout=300)[0]
    assert ref.returncode == 0, out[-3000:]
    proc = _launch(cut)
    _wait_for_step(proc, tmp_path / "cut", 2)
    for w in _workers(proc):
        w.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    assert out.count("[gold_ds] stopping after step") == 1 and "SIGTERM received" in out, out[-3000:]
    stopped = max(r["step"] for r in _records(tmp_path / "cut"))
    assert 2 <= stopped < 12 and (tmp_path / "cut" / "checkpoints" / f"step-{stopped}").is_dir()
    again = _launch(cut, "--resume")
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out[-3000:]
    resumed, reference = _records(tmp_path / "cut"), _records(tmp_path / "whole")
    assert [r["step"] for r in resumed] == list(range(1, 13))  # every step once
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]


def test_sigint_to_the_launcher_alone_stops_every_worker(tmp_path):
    preset = _preset(tmp_path, "run", max_steps=200)
    proc = _launch(preset)
    _wait_for_step(proc, tmp_path / "run", 1)
    proc.send_signal(signal.SIGINT)  # the deepspeed runner only: its launch.py and the workers stay up
    proc.communicate(timeout=60)
    assert _no_worker_left(preset), "a worker outlived its launcher"
    steps = [r["step"] for r in _records(tmp_path / "run")]
    assert steps and max(steps) < 200 and (tmp_path / "run" / "checkpoints" / f"step-{max(steps)}").is_dir()


def test_ctrl_c_checkpoints_before_the_launcher_kills(tmp_path):
    """Ctrl-C: SIGINT to the job's whole process group (launcher, its launch.py, the workers), then
    DeepSpeed's launch.py relays SIGTERM: one request, the step finishes and is checkpointed."""
    preset = _preset(tmp_path, "run", max_steps=200)
    proc = _launch(preset, session=True)
    _wait_for_step(proc, tmp_path / "run", 1)
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert _no_worker_left(preset)
    assert out.count("[gold_ds] stopping after step") == 1, out[-3000:]
    steps = [r["step"] for r in _records(tmp_path / "run")]
    assert (tmp_path / "run" / "checkpoints" / f"step-{max(steps)}").is_dir()


def test_a_killed_rank_ends_the_job(tmp_path):
    preset = _preset(tmp_path, "run", max_steps=200)
    proc = _launch(preset)
    _wait_for_step(proc, tmp_path / "run", 1)
    t0 = time.time()
    next(w for w in _workers(proc) if "--local_rank=1" in " ".join(w.cmdline())).kill()
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and time.time() - t0 < 60, out[-3000:]
    assert _no_worker_left(preset, timeout=10)
    assert "Traceback" not in out, out[-3000:]
    assert out.count("gold_ds: rank 0: lost the other ranks during step") == 1, out[-3000:]


def _nan_on_rank1(tmp):
    import pytest
    import torch
    import torch.distributed as dist
    from gold_ds.config import load_config
    from gold_ds.trainer import build_trainer
    from gold_ds.trainer.stop import NonFiniteLoss
    tr = build_trainer(load_config(raw=tiny_raw(os.path.join(tmp, "run"), max_steps=3,
                                                distill={"beta": 0.5, "lmbda": 0.0})))
    tr.train_step()
    before = tr.student._zero3_consolidated_16bit_state_dict()
    real, calls = tr.objective.loss, []

    def loss(micro_batch, targets):  # step 2, micro-step 2, rank 1 only: an injected NaN
        value, share = real(micro_batch, targets)
        calls.append(1)
        if len(calls) == 2 and dist.get_rank() == 1:
            return value * float("nan"), float("nan")
        return value, share
    tr.objective.loss = loss
    with pytest.raises(NonFiniteLoss, match=r"step 2, micro-step 2 is NaN or inf on rank\(s\) \[1\]"):
        tr.train_step()
    after = tr.student._zero3_consolidated_16bit_state_dict()
    if dist.get_rank() == 0:
        assert all(torch.equal(before[k], after[k]) for k in before)  # no update from the bad window


def test_a_nan_loss_stops_every_rank_before_any_update(tmp_path):
    from conftest import run_ranks
    run_ranks(_nan_on_rank1, 2, str(tmp_path), err_dir=str(tmp_path / "errors"))
