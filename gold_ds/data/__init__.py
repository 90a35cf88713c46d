"""Datasets (encoded once, cached, read lazily), chat rendering, label masks, per-rank index streams and the micro-step assembler."""
from .assembler import MicroBatch, SharedAssembler, build_assembler
from .batch import RankSampler, concat_batches, sequence_tensors
from .dataset import BadRowError, EncodedDataset, Example, Sample, encode_dataset, open_source, to_example
from .render import TextSide
from .tokenizer import load_tokenizer

__all__ = ["MicroBatch", "SharedAssembler", "build_assembler", "RankSampler", "sequence_tensors", "BadRowError",
           "EncodedDataset", "Example", "Sample", "encode_dataset", "open_source", "to_example", "TextSide",
           "load_tokenizer"]
