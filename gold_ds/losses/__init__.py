"""GOLD distillation losses: generalized JSD, ULD, hybrid ULD and byte-prefix JSD, chunked and
vocab-shardable.

Imports torch only. Every loss takes logits ``[..., V]`` (one row per aligned position or merged
span), an optional row ``mask`` and a ``reduction`` ("mean" or "sum" over counted rows; "mean" over
zero counted rows is 0, still attached to the graph), and returns a 0-dim fp32 tensor.

Precision: inputs of any float dtype; all math is fp32 (log space for the divergences); gradients
come back in the input dtype. Temperatures divide the logits; nothing is multiplied by T**2.

Chunking: one autograd Function (``_base.chunked_loss``) walks the counted rows ``chunk_size`` at a
time. For each chunk it computes the row losses and, in closed form, their gradients with respect
to the chunk's logits (and log scales), and writes them into a stored input-sized gradient; backward
only scales that by grad_output (once: a second backward raises; under torch.no_grad nothing is
stored). Extra memory is therefore the
stored gradient (the size of the inputs that need one, in their dtype) plus O(chunk_size x V) fp32.
``chunk_size=None`` targets 8 MiB per fp32 [chunk_size, V] block.

Vocabulary sharding (``group``, Megatron vocab-parallel convention): each rank passes the contiguous
slice of the vocabulary it owns, in rank order, sizes may differ; every rank must pass the same rows,
mask, log scales, ids and options, the same inputs must need a gradient on every rank, and every
rank must call the loss (collectives run in forward). Every rank
gets the same loss and exactly its slice of the unsharded gradient (log-scale gradients in full).
Backward runs no collective: the loss is replicated, so each rank's gradient is its stored slice,
with no world-size factor (the trap of backpropagating through torch.distributed.nn all_reduce).
Each call first all_gathers every rank's (rows, local vocabulary sizes) once, to check the rows
agree and to learn the global vocabulary sizes (chunk size, id ranges, the all_to_all splits).

- generalized_jsd needs only per-row scalars across shards: per chunk of n rows, a MAX all_reduce
  of [n, 2] (row maxima), a SUM all_reduce of [n, 2] (softmax denominators) and a SUM all_reduce of
  [2, n] (the two sum(r) terms of the softmax chain rule, from which the row loss also follows):
  6 floats per row.
- uld and hybrid_uld are moved to a row-sharded layout. Design note: the sorted L1 pairs the k-th
  largest student value with the k-th largest teacher value, so a row's loss depends on how the
  shards' values interleave in one global order; no fixed number of per-row scalars determines
  that, and an exact distributed sort must move O(V) values per row in general (a sample sort
  moves each value once and then still needs counts across buckets). We chose the simplest exact
  scheme with that volume: per chunk, one all_to_all per logits tensor sends every rank the whole
  rows of ~n/W of the chunk's rows (each value crosses the network once, (W-1)/W of a row per row,
  in fp32), the whole-row kernel runs there (sort work is split W ways), gradients go back by the
  inverse all_to_all (only for inputs that need one), and one SUM all_reduce of [3, n] shares the
  row losses and log-scale gradients. The one exception to "no rank holds a full-vocabulary row":
  a rank transiently holds ~chunk_size/W whole rows. hybrid_uld's ids are global; on whole rows
  they index directly, so the matched part rides along in the same exchange. byte_prefix_jsd
  projects a row through a scatter over its whole vocabulary, so it takes the same layout.
"""

from .jsd import generalized_jsd
from .linear import (linear_byte_prefix_jsd, linear_generalized_jsd, linear_hybrid_uld, linear_token_logprobs,
                     linear_uld)
from .prefix import byte_prefix_jsd
from .uld import hybrid_uld, uld

__all__ = ["generalized_jsd", "uld", "hybrid_uld", "byte_prefix_jsd", "linear_generalized_jsd", "linear_uld",
           "linear_hybrid_uld", "linear_byte_prefix_jsd", "linear_token_logprobs"]
