"""Faults through the real launcher (deepspeed, 2 CPU ranks): SIGTERM to the workers mid-run then
--resume, and SIGKILL during a checkpoint write then --resume (losses equal the uninterrupted
run's, each step logged once), SIGINT to the launcher alone (no worker outlives it), Ctrl-C, a rank
killed mid-step (the job ends at once, one line naming it); on 2 spawned ranks: NaN/inf values
skipped, counted, then stopping the run; a resumed W&B run sent each step once."""
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


def _launch(preset, *extra, session=False, env=None):
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), TRAIN, "--config", preset, *extra]
    return subprocess.Popen(cmd, env={**_env(), **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=session)


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


_KILL_HOOK = """
import os, signal
_tmp = os.environ.get("GOLD_DS_TEST_KILL_WHEN")
if _tmp:  # SIGKILL this process when the checkpoint directory being written exists
    import gold_ds.engine.checkpoint as _ck
    _real = _ck._rng_state
    def _rng_state():
        if os.path.isdir(_tmp):
            os.kill(os.getpid(), signal.SIGKILL)
        return _real()
    _ck._rng_state = _rng_state
"""


def test_sigterm_to_the_workers_then_resume(tmp_path):
    """Also: the whole job killed (SIGKILL) while it writes a checkpoint, after DeepSpeed's files and
    before its rename (a test-only sitecustomize kills each rank there), then --resume from the
    checkpoint before; both resumed runs' losses equal the uninterrupted run's."""
    whole, cut = _preset(tmp_path, "whole"), _preset(tmp_path, "cut")
    killed = _preset(tmp_path, "killed", checkpoint={"every": 3})
    ref = _launch(whole)
    out = ref.communicate(timeout=300)[0]
    assert ref.returncode == 0, out[-3000:]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_KILL_HOOK)
    writing = tmp_path / "killed" / "checkpoints" / "step-6.tmp"
    proc = _launch(killed, env={"PYTHONPATH": f"{hook}{os.pathsep}{REPO}", "GOLD_DS_TEST_KILL_WHEN": str(writing)})
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and writing.is_dir(), out[-3000:]
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text() == "step-3"
    again = _launch(killed, "--resume")
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0 and "resumed from" in out and "step-3 at step 3" in out, out[-3000:]
    assert not writing.exists()  # the half-written checkpoint was removed by the next save
    resumed, reference = _records(tmp_path / "killed"), _records(tmp_path / "whole")
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]
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
    assert "rank(s) [1] exited" in out, out[-3000:]


def _non_finite(tmp):
    """Step 2: a NaN loss on rank 1 in micro-step 2; step 4: NaN teacher outputs on rank 0 in
    micro-step 1; step 5: a finite loss whose gradient is NaN on every rank. Each such step is
    skipped (the weights stay those of the step before, the count grows); the step between is
    applied; with max_consecutive_skips=2, steps 4 and 5 stop the run."""
    import pytest
    import torch
    import torch.distributed as dist
    from gold_ds.config import load_config
    from gold_ds.trainer import build_trainer
    from gold_ds.trainer.stop import NonFiniteValues
    tr = build_trainer(load_config(raw=tiny_raw(os.path.join(tmp, "run"), max_steps=8, max_consecutive_skips=2,
                                                distill={"beta": 0.5, "lmbda": 0.0})))
    rank, plan = dist.get_rank(), {}  # (step, micro-step) -> what goes bad
    real_loss, real_teacher = tr.objective.loss, tr.objective.teacher_targets
    micro = {"m": 0}

    def teacher_targets(mbs):  # one call may score several micro-steps: micro["m"] + 1, ...
        targets = real_teacher(mbs)
        for i in range(len(targets)):
            if plan.get((tr.step + 1, micro["m"] + 1 + i)) == "teacher" and rank == 0:
                targets[i] = targets[i] * float("nan")
        return targets

    def loss(mb, targets):
        micro["m"] += 1
        value, share = real_loss(mb, targets)
        bad = plan.get((tr.step + 1, micro["m"]))
        if bad == "loss" and rank == 1:
            return value * float("nan"), float("nan")
        if bad == "gradient":  # forward 0, backward 0 x inf = NaN
            return value + 0 * torch.sqrt(value - value), share
        return value, share
    tr.objective.teacher_targets, tr.objective.loss = teacher_targets, loss
    plan.update({(2, 2): "loss", (4, 1): "teacher", (5, 1): "gradient"})
    weights, skipped = [tr.student._zero3_consolidated_16bit_state_dict()], []
    for _ in range(4):
        micro["m"] = 0
        skipped.append(tr.train_step()["skipped_steps"])
        weights.append(tr.student._zero3_consolidated_16bit_state_dict())
    micro["m"] = 0
    with pytest.raises(NonFiniteValues) as stop:
        tr.train_step()
    assert skipped == [0, 1, 1, 2], skipped
    message = str(stop.value)
    assert "2 optimizer steps in a row skipped" in message, message
    assert "the first with the loss and the teacher's outputs of step 4, micro-step 1" in message or \
        "the first with the teacher's outputs of step 4, micro-step 1" in message, message
    assert "the last with the gradient norm of step 5 NaN or inf" in message, message
    after = tr.student._zero3_consolidated_16bit_state_dict()
    if rank == 0:
        def same(a, b):
            return all(torch.equal(a[k], b[k]) for k in a)
        assert not same(weights[0], weights[1]) and not same(weights[2], weights[3])  # steps 1, 3 applied
        assert same(weights[1], weights[2]), "step 2 (NaN loss) was applied"
        assert same(weights[3], weights[4]) and same(weights[3], after), "step 4 or 5 was applied"
        assert all(torch.isfinite(v).all() for v in after.values())


def test_non_finite_values_are_skipped_counted_then_stop_the_run(tmp_path):
    from conftest import run_ranks
    run_ranks(_non_finite, 2, str(tmp_path), err_dir=str(tmp_path / "errors"))


def test_a_resumed_wandb_run_gets_each_step_once(tmp_path, monkeypatch):
    """A resumed W&B run (the same run id) already holds the steps logged before the interruption:
    W&B refuses steps below its own, so the logger does not send them again, and sends every later
    step. A stand-in ``wandb`` module plays the service (its ``step``: the step of the next log)."""
    import sys
    import types
    from gold_ds.config import load_config
    from gold_ds.trainer.logging import MetricsLogger

    runs = []

    class Run:
        def __init__(self, id, resume, **_):
            self.id, self.resume, self.logged = id or "abc123", resume, []
            self.step = 6 if resume else 0  # the interrupted session logged steps up to 5
            runs.append(self)

        def log(self, metrics, step):
            assert step >= self.step, f"W&B refuses step {step} below its step {self.step}"
            self.logged.append(step)
            self.step = step + 1

        def finish(self):
            pass
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=Run))
    cfg = load_config(raw=tiny_raw(tmp_path / "run", logging={"progress_bar": False, "wandb": {"enabled": True}}))
    first = MetricsLogger(cfg, True)
    for step in range(0, 6):
        first.log(step, {"loss": 1.0})
    first.close()
    resumed = MetricsLogger(cfg, True, resumed=True)  # its checkpoint at step 3: steps 4-5 are redone
    resumed.drop_records_after(3)
    for step in range(4, 9):
        resumed.log(step, {"loss": 1.0})
    resumed.close()
    assert runs[1].id == runs[0].id and runs[1].resume == "allow"
    assert runs[0].logged == [0, 1, 2, 3, 4, 5] and runs[1].logged == [6, 7, 8]
    assert [r["step"] for r in _records(tmp_path / "run")] == list(range(0, 9))
