"""The training loop: schedule, rollout, teacher and student passes, logging, checkpoints."""
from .loop import Trainer

__all__ = ["Trainer"]
