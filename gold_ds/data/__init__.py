"""Datasets, chat rendering, label masks and per-rank example streams."""
from .batch import RankSampler, training_batch
from .dataset import BadRowError, EncodedDataset, Example, encode_dataset, encode_example, read_rows, to_example
from .tokenizer import load_tokenizer

__all__ = ["RankSampler", "training_batch", "BadRowError", "EncodedDataset", "Example",
           "encode_dataset", "encode_example", "read_rows", "to_example", "load_tokenizer"]
