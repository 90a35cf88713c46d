"""On-policy sample generators. Each turns a list of prompt token ids into sampled completion ids.

Interface (every generator): ``generate(prompts, num_generations, greedy=False) -> list[list[int]]``,
``num_generations`` samples per prompt, grouped by prompt (prompt 0's samples first). Every rank
calls it in the same step, with its own prompts.
"""
from .transformers_generator import TransformersGenerator

__all__ = ["TransformersGenerator"]
