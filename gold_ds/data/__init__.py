"""Datasets, chat rendering, label masks and per-rank example streams."""
from .batch import RankSampler, prompt_batch, training_batch
from .dataset import BadRowError, EncodedDataset, Example, encode_dataset, encode_example, read_rows, to_example

__all__ = ["RankSampler", "prompt_batch", "training_batch", "BadRowError", "EncodedDataset", "Example",
           "encode_dataset", "encode_example", "read_rows", "to_example"]
