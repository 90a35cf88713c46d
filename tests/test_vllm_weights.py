"""Weights for the rollout engine: checkpoint names and LoRA merge (plain reference formula), and
bucket bounds, on an unpartitioned model (ZeRO-3 gathering itself is covered by the vLLM tests)."""
import torch
from torch import nn

from gold_ds.engine.weights import checkpoint_name, gathered_weight_buckets


class _Lora(nn.Module):
    """The attribute layout of a PEFT LoRA Linear (base_layer, lora_A/lora_B per adapter, scaling)."""
    def __init__(self, i, o, r, alpha):
        super().__init__()
        self.base_layer = nn.Linear(i, o)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(i, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, o, bias=False)})
        self.scaling = {"default": alpha / r}
        self.active_adapters = ["default"]


def _peft_like():
    torch.manual_seed(0)
    inner = nn.Module()
    inner.embed = nn.Embedding(50, 16)
    inner.q_proj = _Lora(16, 16, 4, 8)
    inner.lm_head = nn.Linear(16, 50, bias=False)
    outer = nn.Module()
    outer.base_model = nn.Module()
    outer.base_model.model = inner
    return outer, inner


def test_names_and_lora_merge():
    outer, inner = _peft_like()
    got = {n: t.clone() for b in gathered_weight_buckets(outer, 1 << 20) for n, t in b}
    lora = inner.q_proj
    merged = lora.base_layer.weight + 2.0 * lora.lora_B["default"].weight @ lora.lora_A["default"].weight
    assert sorted(got) == ["embed.weight", "lm_head.weight", "q_proj.bias", "q_proj.weight"]
    assert torch.allclose(got["q_proj.weight"], merged, atol=1e-6)
    assert not torch.allclose(got["q_proj.weight"], lora.base_layer.weight)  # the adapter is not zero
    assert torch.equal(got["q_proj.bias"], lora.base_layer.bias)
    assert checkpoint_name("base_model.model.model.layers.0.mlp.up_proj.base_layer.weight") == \
        "model.layers.0.mlp.up_proj.weight"


def _units_and_bytes(bucket):
    """A yielded bucket's units, each with the bytes of its yielded tensors: the LoRA layer q_proj's
    tensors together are one unit, every other tensor one of its own."""
    units = {}
    for name, t in bucket:
        unit = "q_proj" if name.startswith("q_proj.") else name
        units[unit] = units.get(unit, 0) + t.numel() * t.element_size()
    return units


def test_buckets_are_bounded_and_keep_lora_layers_whole():
    outer, _ = _peft_like()
    limit = 16 * 16 * 4 + 100  # about one 16x16 fp32 matrix
    buckets = [[n for n, _ in b] for b in gathered_weight_buckets(outer, limit)]
    assert len(buckets) == 3  # embed (alone: larger than the limit), q_proj layer (all its parts), lm_head
    assert ["q_proj.weight", "q_proj.bias"] in buckets
    # Yielded bytes: embed and lm_head 3200 each, q_proj 1088 (1600 with its adapters). At each limit a
    # bucket of several units holds at most `limit` bytes, and a unit larger than the limit is alone.
    seen = {"several units": 0, "a unit over the limit": 0}
    for limit in (limit, 1024, 3200, 4800, 6400, 1 << 20):
        names = []
        for bucket in gathered_weight_buckets(outer, limit):
            units = _units_and_bytes(bucket)
            names += [n for n, _ in bucket]
            if max(units.values()) > limit:
                seen["a unit over the limit"] += 1
                assert len(units) == 1, (limit, units)
            if len(units) > 1:
                seen["several units"] += 1
                assert sum(units.values()) <= limit, (limit, units)
        assert sorted(names) == ["embed.weight", "lm_head.weight", "q_proj.bias", "q_proj.weight"]
    assert min(seen.values()) > 0, seen  # both cases were met
