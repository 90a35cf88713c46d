"""DeepSpeed engines for the student (ZeRO-3 training) and the teacher (ZeRO-inference), checkpoints, export."""
from .checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from .models import (build_inference_engine, build_model, build_training_engine,
                     local_parameter_share)

__all__ = ["build_model", "build_training_engine", "build_inference_engine",
           "local_parameter_share", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "export_hf"]
