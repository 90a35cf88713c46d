"""The run config: typed dataclasses loaded from a JSON preset plus command-line overrides."""
from .load import ConfigError, config_to_dict, load_config, missing_local_path, validate_world
from .schema import (CheckpointConfig, DataConfig, DatasetSource, DistillConfig, EvalConfig, ExportConfig,
                     LoggingConfig, ModelConfig, RolloutConfig, RunConfig, StudentConfig, TeacherConfig,
                     TeacherSFTConfig, WandbConfig)

__all__ = ["ConfigError", "config_to_dict", "load_config", "missing_local_path", "validate_world", "RunConfig", "ModelConfig",
           "StudentConfig", "TeacherConfig", "TeacherSFTConfig", "DataConfig", "DatasetSource",
           "DistillConfig", "RolloutConfig", "LoggingConfig", "WandbConfig", "EvalConfig",
           "CheckpointConfig", "ExportConfig"]
