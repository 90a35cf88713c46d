"""Stopping well: preemption signals, a launcher that went away, and ranks that were lost.

``StopRequests`` (every rank, while ``Trainer.train`` runs):
- SIGTERM or SIGINT (what clusters send before preemption, and Ctrl-C) asks this rank to stop; a
  second one, more than ``RELAY_S`` later, exits at once (code 128 + signal number);
- a watchdog thread asks the same when a launcher process above this rank (``deepspeed``,
  ``torchrun``, ``torch.distributed.run``) is gone, so no worker outlives its launcher;
- ``agreed()``, called by every rank after each step, is one small all_reduce: if any rank was
  asked, every rank stops after the same step. The trainer then writes a checkpoint and raises
  ``Preempted``; ``launch/train.py`` exits with ``EXIT_PREEMPTED`` and ``--resume`` continues.

``NonFiniteGuard`` (never train on garbage): every micro-step, before its backward, one small
all_reduce tells every rank whether the loss or the teacher's outputs are NaN/inf on any rank; if
so, that micro-step's loss is made NaN on every rank, so the window's gradient norm is NaN and
DeepSpeed discards the window's update (ZeRO-3 skips any step whose gradient norm is not finite,
in every precision, and zeroes the gradients). A gradient norm that is NaN/inf on its own is
skipped the same way. The guard counts skipped steps (``skipped_steps`` in the metrics) and after
``max_consecutive_skips`` in a row raises ``NonFiniteValues`` on every rank (``EXIT_NON_FINITE``),
naming the step, the micro-step and the value that went bad. In fp16, steps that DeepSpeed's loss
scaler skips for a gradient overflow (its normal search for a loss scale) are counted but do not
stop the run.

A collective that fails (a rank died: its peers' connections close; or it stopped answering for
longer than ``timeout_s``, the process group's timeout) ends the rank with ``EXIT_LOST_RANK`` and
one line naming the step and the ranks on its host that are gone (``launch/train.py``).
"""
import math
import os
import signal
import socket
import threading
import time

import torch
import torch.distributed as dist

EXIT_LOST_RANK = 3
"""A collective failed: another rank died or stopped answering within ``timeout_s``."""
EXIT_PREEMPTED = 75
"""Stopped by SIGTERM/SIGINT or the launcher's exit, after a checkpoint: ``--resume`` continues."""
EXIT_NON_FINITE = 4
"""``max_consecutive_skips`` optimizer steps in a row were skipped for NaN/inf values."""

RELAY_S = 2.0
"""Signals within this many seconds of the first are the same request (Ctrl-C reaches every process
of the job, and DeepSpeed's launcher then relays SIGTERM to its workers)."""
_LAUNCHER_SCRIPTS = ("deepspeed", "torchrun")
_LAUNCHER_MODULES = ("deepspeed.launcher.launch", "deepspeed.launcher.runner", "torch.distributed.run",
                     "torch.distributed.launch")




class Preempted(Exception):
    """Every rank stopped after a step and wrote a checkpoint."""


class NonFiniteValues(Exception):
    """Too many steps in a row had NaN/inf values; raised on every rank."""


def _finite(value) -> bool:
    """Whether a float, or every floating tensor in a (nested) tuple/list, is free of NaN and inf
    (for a tensor: its sum in fp32 is finite, one cheap pass without a mask of its size)."""
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value.sum(dtype=torch.float32)))
    if isinstance(value, (tuple, list)):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


class NonFiniteGuard:
    """The non-finite policy of the module docstring, on every rank. Per micro-step
    ``check(...)`` (collective) before backward; per window ``window_end(applied)`` after the
    optimizer step."""

    VALUES = ("the loss", "the teacher's outputs")

    def __init__(self, max_consecutive: int, device, loss_scaling: bool = False, stage: str = ""):
        self.max_consecutive, self.device, self.loss_scaling, self.stage = max_consecutive, device, loss_scaling, stage
        self.skipped, self.consecutive, self._first, self._bad = 0, 0, None, None

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive, "first": self._first}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive, self._first = state["skipped"], state["consecutive"], state["first"]

    def check(self, step: int, micro_step: int, loss: float, teacher) -> bool:
        """Collective: whether the loss or the teacher's outputs are NaN/inf on any rank (then the
        caller makes this micro-step's loss NaN before backward, so the window is not applied)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        flags = torch.zeros(len(self.VALUES), world, device=self.device)
        flags[0, rank] = float(not _finite(loss))
        flags[1, rank] = float(not _finite(teacher))
        dist.all_reduce(flags)
        if not flags.any():
            return False
        if self._bad is None:
            which = " and ".join(v for v, f in zip(self.VALUES, flags.any(dim=1).tolist()) if f)
            ranks = sorted({r for row in flags.tolist() for r, f in enumerate(row) if f})
            self._bad = f"{which} of step {step}, micro-step {micro_step} NaN or inf on rank(s) {ranks}"
        return True

    def window_end(self, step: int, applied: bool) -> str:
        """After the window's optimizer step: '' if it was applied, else why it was skipped (raises
        ``NonFiniteValues`` after ``max_consecutive`` skips in a row)."""
        bad, self._bad = self._bad, None
        if applied:
            self.consecutive, self._first = 0, None
            return ""
        self.skipped += 1
        if bad is None and self.loss_scaling:  # DeepSpeed's fp16 loss scaler lowered its scale
            return f"step {step}: gradient overflow in fp16, the loss scaler skipped the update"
        why = bad or f"the gradient norm of step {step} NaN or inf"
        self.consecutive += 1
        self._first = self._first or why
        if self.consecutive >= self.max_consecutive:
            then = ("start again (the stage writes no checkpoints)" if self.stage else
                    "--resume from a checkpoint before the first")
            raise NonFiniteValues(
                f"{self.stage + ': ' if self.stage else ''}{self.consecutive} optimizer steps in a row skipped for "
                f"NaN/inf values (max_consecutive_skips={self.max_consecutive}), the first with {self._first}, the "
                f"last with {why}; no update was made from them: lower the learning rate, check the data and the "
                f"teacher, then {then}")
        return f"{self.stage + ' ' if self.stage else ''}step {step}: update skipped ({why}); {self.consecutive} " \
               f"in a row of max_consecutive_skips={self.max_consecutive}"


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


_PROCESSES = []


def note_rank_processes() -> None:
    """Collective, once after the process group exists: (host, pid) of every rank, kept so that a
    rank which loses its peers can say which of them are gone (``lost_ranks``)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, (socket.gethostname(), os.getpid()))
    _PROCESSES[:] = out


def lost_ranks() -> list:
    """The ranks on this host whose process is gone (ranks on other hosts cannot be seen from here)."""
    host = socket.gethostname()
    return [r for r, (h, pid) in enumerate(_PROCESSES) if h == host and not _alive(pid)]


def is_collective_failure(e: BaseException) -> bool:
    """Whether ``e`` is a failed collective (a lost peer, a timeout) rather than a bug."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(k in text for k in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out",
        "NCCL communicator was aborted", "ProcessGroupNCCL", "ProcessGroupGloo", "gloo/transport"))

