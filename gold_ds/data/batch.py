"""Per-rank streams of dataset indices, and right-padded tensors of sequences."""
import torch


class RankSampler:
    """An endless, resumable stream of dataset indices for one rank.

    Epoch ``e`` is a permutation of all rows drawn from ``seed + e`` (or the identity without
    shuffle); rank ``r`` of ``w`` takes positions ``r, r + w, ...`` of it, cut to ``len // w`` so that
    every rank's epoch has the same length (up to ``w - 1`` rows per epoch go unused, different ones
    each epoch). The state is one integer, the number of indices taken so far, which every rank
    advances by the same amount (the schedule is shared).
    """

    def __init__(self, num_rows: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        if num_rows < world_size:
            raise ValueError(f"{num_rows} usable rows cannot be split over {world_size} ranks")
        self.num_rows, self.rank, self.world_size = num_rows, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.per_epoch = num_rows // world_size
        self.consumed = 0
        self._epoch, self._order = -1, None

    def _epoch_order(self, epoch: int):
        if epoch != self._epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                perm = torch.randperm(self.num_rows, generator=g)
            else:
                perm = torch.arange(self.num_rows)
            self._order = perm[self.rank::self.world_size][:self.per_epoch]  # a tensor: no Python int per row
            self._epoch = epoch
        return self._order

    def take(self, n: int) -> list:
        out = []
        for _ in range(n):
            epoch, pos = divmod(self.consumed, self.per_epoch)
            out.append(int(self._epoch_order(epoch)[pos]))
            self.consumed += 1
        return out

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])


def sequence_tensors(sequences: list, pad_id: int) -> dict:
    """Right-padded tensors for teacher-forced forward passes.

    ``sequences``: (prompt_ids, completion_ids) pairs. Returns ``input_ids``, ``attention_mask`` and
    ``loss_mask``: ``loss_mask[b, t]`` is 1 where logits row ``t`` predicts a completion token
    (token ``t + 1``); its shape is that of the logits without their last position.
    """
    lengths = [len(p) + len(c) for p, c in sequences]
    T = max(lengths)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(sequences), T), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), T - 1), dtype=torch.bool)
    for b, (p, c) in enumerate(sequences):
        n = len(p) + len(c)
        ids[b, :n] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attn[b, :n] = 1
        loss_mask[b, len(p) - 1:n - 1] = True
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def concat_batches(batches: list) -> dict:
    """Several right-padded text batches (``sequence_tensors``' dicts) as one: rows stacked in order,
    every row right-padded to the longest (pad id 0, attention and loss masks 0 there), so batch
    ``i``'s rows are a slice of the result and, cut to its own length, equal its own tensors.
    Vision-language batches (pixel inputs) are not stacked: their images belong to one micro-step."""
    keys = set(batches[0])
    if keys - {"input_ids", "attention_mask", "loss_mask"} or any(set(b) != keys for b in batches):
        raise ValueError(f"only text batches (input_ids, attention_mask, loss_mask) can be stacked; got {sorted(keys)}")
    T = max(b["input_ids"].shape[1] for b in batches)
    out = {}
    for key in keys:
        width = T - 1 if key == "loss_mask" else T
        parts = [torch.nn.functional.pad(b[key], (0, width - b[key].shape[1])) for b in batches]
        out[key] = torch.cat(parts)
    return out
