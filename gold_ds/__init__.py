"""gold_ds: GOLD (General Online Logit Distillation) on DeepSpeed ZeRO-3."""
__version__ = "0.1.0"
