"""The training loop (``loop.py``) and the builder of its parts (``build.py``): ``build_trainer(cfg).train()``."""
from .build import build_trainer
from .loop import Trainer

__all__ = ["Trainer", "build_trainer"]
