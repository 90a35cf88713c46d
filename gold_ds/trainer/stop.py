"""Stopping well: preemption signals, a launcher that went away, and ranks that were lost.

``StopRequests`` (every rank, while ``Trainer.train`` runs):
- SIGTERM or SIGINT (what clusters send before preemption, and Ctrl-C) asks this rank to stop; a
  second one, more than ``RELAY_S`` later, exits at once (code 128 + signal number);
- a watchdog thread asks the same when a launcher process above this rank (``deepspeed``,
  ``torchrun``, ``torch.distributed.run``) is gone, so no worker outlives its launcher;
- ``agreed()``, called by every rank after each step, is one small all_reduce: if any rank was
  asked, every rank stops after the same step. The trainer then writes a checkpoint and raises
  ``Preempted``; ``launch/train.py`` exits with ``EXIT_PREEMPTED`` and ``--resume`` continues.

``check_finite`` (every micro-step, before backward): a NaN or inf loss on any rank stops every
rank with ``NonFiniteLoss`` (``EXIT_NON_FINITE``), so no update is ever made from it.

A collective that fails (a rank died: its peers' connections close; or it stopped answering for
longer than ``timeout_s``, the process group's timeout) ends the rank with ``EXIT_LOST_RANK`` and
one line naming the step (``launch/train.py``).
"""
import math
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

EXIT_LOST_RANK = 3
"""A collective failed: another rank died or stopped answering within ``timeout_s``."""
EXIT_PREEMPTED = 75
"""Stopped by SIGTERM/SIGINT or the launcher's exit, after a checkpoint: ``--resume`` continues."""

RELAY_S = 2.0
"""Signals within this many seconds of the first are the same request (Ctrl-C reaches every process
of the job, and DeepSpeed's launcher then relays SIGTERM to its workers)."""
_LAUNCHER_SCRIPTS = ("deepspeed", "torchrun")
_LAUNCHER_MODULES = ("deepspeed.launcher.launch", "deepspeed.launcher.runner", "torch.distributed.run",
                     "torch.distributed.launch")


EXIT_NON_FINITE = 4
"""A loss was NaN or inf on some rank: stopped before its backward (no update from it)."""


class Preempted(Exception):
    """Every rank stopped after a step and wrote a checkpoint."""


class NonFiniteLoss(Exception):
    """A micro-step's loss was NaN or inf on some rank; raised on every rank before backward."""


def check_finite(value: float, device, step: int, micro_step: int) -> None:
    """Collective: raise ``NonFiniteLoss`` on every rank if ``value`` is NaN or inf on any rank."""
    bad = torch.zeros(dist.get_world_size(), device=device)
    if not math.isfinite(value):
        bad[dist.get_rank()] = 1.0
    dist.all_reduce(bad)
    if bad.any():
        ranks = [r for r, b in enumerate(bad.tolist()) if b]
        raise NonFiniteLoss(f"the loss of step {step}, micro-step {micro_step} is NaN or inf on rank(s) {ranks}; "
                            "no update was made from it (the last checkpoint is before it): lower the learning "
                            "rate, check the data and the teacher's outputs, then --resume")


def _argv(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _is_launcher(argv: list) -> bool:
    """``deepspeed ...``, ``torchrun ...``, ``python [-u] -m <launcher module> ...``."""
    names = [os.path.basename(a) for a in argv[:3]]
    if any(n in _LAUNCHER_SCRIPTS for n in names):
        return True
    return any(a == "-m" and i + 1 < len(argv) and argv[i + 1] in _LAUNCHER_MODULES for i, a in enumerate(argv[:4]))


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def launcher_pids() -> list:
    """The launcher processes above this one (Linux ``/proc``; empty elsewhere or without one)."""
    out, pid = [], os.getppid()
    while pid > 1:
        if _is_launcher(_argv(pid)):
            out.append(pid)
        pid = _parent(pid)
    return out


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (not gone, not a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class StopRequests:
    """Signals and the launcher watchdog of one rank (see the module docstring). A context manager:
    the previous signal handlers come back on exit."""

    def __init__(self, poll_s: float = 1.0):
        self.reason, self._first_signal = None, None
        self._poll_s, self._done = poll_s, threading.Event()
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        launchers = launcher_pids()
        if launchers:
            threading.Thread(target=self._watch, args=(launchers,), name="gold_ds-launcher-watchdog",
                             daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _on_signal(self, signum, frame):
        now = time.monotonic()
        if self._first_signal is not None and now - self._first_signal > RELAY_S:  # a second request
            os._exit(128 + signum)
        if self._first_signal is None:
            self._first_signal = now
            self.reason = self.reason or f"{signal.Signals(signum).name} received"

    def _watch(self, launchers: list):
        while not self._done.wait(self._poll_s):
            gone = [pid for pid in launchers if not _alive(pid)]
            if gone and self.reason is None:
                self.reason = f"the launcher (pid {gone[0]}) exited"

    def agreed(self, device) -> str:
        """Collective: a reason to stop now if any rank has one (this rank's, or another's), else ''."""
        flag = torch.tensor([0.0 if self.reason is None else 1.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 0.0:
            return ""
        return self.reason or "another rank was asked to stop"


def is_collective_failure(e: BaseException) -> bool:
    """Whether ``e`` is a failed collective (a lost peer, a timeout) rather than a bug."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(k in text for k in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out",
        "NCCL communicator was aborted", "ProcessGroupNCCL", "ProcessGroupGloo", "gloo/transport"))

