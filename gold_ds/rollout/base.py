"""The rollout interface, and the weight-sync cadence of generators that hold their own weights."""
import collections
import time


class Rollout:
    """``sample(prompts, num_generations, *, step, weights) -> (completions, metrics)``: see the
    package docstring. Subclasses implement ``generate(prompts, num_generations, greedy, max_new_tokens)``."""

    def sample(self, prompts: list, num_generations: int, *, step: int, weights) -> tuple:
        return self.generate(prompts, num_generations), {}


class WeightSyncedRollout(Rollout):
    """A generator with its own copy of the student's weights (vLLM, the student's plain copy):
    ``sample`` hands it the student's weights (``generate(..., weights=buckets)``) before its first
    rollout and then every ``sync_every`` steps; the generator loads them at the right point of its call sequence through
    ``_sync_weights``, which times the sync. ``events`` keeps the last 64 engine calls, in order."""

    def __init__(self, sync_every: int, bucket_bytes: int):
        self.sync_every, self.bucket_bytes = sync_every, bucket_bytes
        self.synced_at = None  # the step of the last sync, None before the first
        self.events = collections.deque(maxlen=64)
        self.loaded_tensors = 0
        self._sync_seconds = None

    def sample(self, prompts: list, num_generations: int, *, step: int, weights) -> tuple:
        due = self.synced_at is None or step - self.synced_at >= self.sync_every
        completions = self.generate(prompts, num_generations, weights=weights(self.bucket_bytes) if due else None)
        if not due:
            return completions, {}
        self.synced_at = step
        return completions, {"time/weight_sync": self._sync_seconds}

    @property
    def has_weights(self) -> bool:
        return self._sync_seconds is not None

    def _sync_weights(self, weights) -> None:
        """Load every bucket of ``weights`` (iterable of buckets of (checkpoint name, full tensor))."""
        t0 = time.perf_counter()
        self.loaded_tensors = self._load_weights(weights)
        self._sync_seconds = time.perf_counter() - t0
        self.events.append(f"load({self.loaded_tensors})")

    def _load_weights(self, weights) -> int:
        """Load the buckets; return the number of tensors loaded."""
        raise NotImplementedError
