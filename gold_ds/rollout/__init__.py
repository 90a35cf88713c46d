"""On-policy rollouts: generators that turn prompt token ids into sampled completion ids.

The rollout interface (every generator; ``gold_ds.rollout.base``), called by every rank in the same
step, each with its own prompts:

    completions, metrics = rollout.sample(prompts, num_generations, step=step, weights=weights)

``num_generations`` completions per prompt, grouped by prompt (prompt 0's first). ``weights(bucket_bytes)``
yields the student's current weights in buckets (``gold_ds.engine.weights.gathered_weight_buckets``,
collective): a generator with its own copy of the weights (vLLM, or transformers on a plain copy of
the student: ``rollout.student_copy``) calls it when a sync is due, every ``rollout.sync_every``
steps and before its first rollout, and reports the sync's time in ``metrics``
(``time/weight_sync``); transformers on the student engine itself (``student_copy: false``) never
calls it. ``build_rollout`` (``gold_ds.rollout.factory``) builds the one ``rollout.backend`` names.
"""
from .base import Rollout
from .transformers_generator import TransformersGenerator

__all__ = ["Rollout", "TransformersGenerator"]
