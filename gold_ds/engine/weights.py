"""The student's full weights, gathered from ZeRO-3 partitions in size-bounded buckets.

Used to push the student's current weights into a rollout engine (vLLM). One bucket at a time is
gathered (``deepspeed.zero.GatheredParameters``, one all-gather per bucket, not one per parameter
and never the whole model), handed out, and released when the consumer asks for the next one, so
the extra memory is one bucket: at most ``bucket_bytes`` of full tensors, or the largest single
parameter when that is larger.

Names are Hugging Face checkpoint names (what ``save_pretrained`` would write, what vLLM's
``load_weights`` reads): PEFT wrappers are stripped, LoRA adapters are merged into their base
weights (``W + scaling * B @ A``) and a ``modules_to_save`` module is its trained copy, so the
consumer sees a plain model.

Which ranks call it: every rank of the student's ZeRO-3 group, and every rank must consume the whole
iterator (each bucket's gather and release are collectives). Stopping early on one rank hangs the
others.
"""
import re

import torch

_PEFT_PREFIX = re.compile(r"^(base_model\.model\.)")
_TRAINED_COPY = re.compile(r"\.modules_to_save\.[^.]+\.")  # peft's trained copy of a ``modules_to_save`` module


def checkpoint_name(name: str) -> str:
    """A parameter's name in the model's Hugging Face checkpoint: without PEFT's
    ``base_model.model.`` prefix, ``.base_layer`` wrapper and ``modules_to_save`` copy."""
    return _TRAINED_COPY.sub(".", _PEFT_PREFIX.sub("", name).replace(".base_layer.", "."))


def _lora_layers(module) -> dict:
    """PEFT LoRA layers by their qualified name: modules holding ``base_layer``, ``lora_A``,
    ``lora_B`` (ModuleDicts per adapter) and ``scaling`` (a dict per adapter)."""
    return {n: m for n, m in module.named_modules()
            if all(hasattr(m, a) for a in ("base_layer", "lora_A", "lora_B", "scaling"))}


def _units(module) -> list:
    """The model's parameters grouped into units that must be gathered together: one unit per
    LoRA layer (base weight, bias and all adapters), one per other parameter. Each unit is
    (lora_layer or None, [(name, param), ...]); tied parameters appear once."""
    lora = _lora_layers(module)
    owner_of = {}
    for lname, layer in lora.items():
        for pname, _ in layer.named_parameters(prefix=lname):
            owner_of[pname] = lname
    units, seen, lora_units = [], set(), {}
    for name, p in module.named_parameters():
        if id(p) in seen or ".original_module." in name:  # the frozen original of a modules_to_save copy
            continue
        seen.add(id(p))
        lname = owner_of.get(name)
        if lname is None:
            units.append((None, [(name, p)]))
        elif lname in lora_units:
            lora_units[lname][1].append((name, p))
        else:
            lora_units[lname] = (lora[lname], [(name, p)])
            units.append(lora_units[lname])
    return units


def _numel(p) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def _merged(layer, params: list) -> list:
    """Checkpoint-named full tensors of one gathered LoRA layer: base weight + scaling * B @ A for
    each active adapter, other base parameters (bias) as they are; adapter weights themselves are
    not part of the checkpoint."""
    out = []
    for name, p in params:
        if ".lora_" in name:
            continue
        t = p.data
        if name.endswith("base_layer.weight"):
            adapters = getattr(layer, "active_adapters", None) or list(layer.lora_A.keys())
            if isinstance(adapters, str):
                adapters = [adapters]
            delta = None
            for a in adapters:
                if a not in layer.lora_A or getattr(layer, "merged", False):
                    continue
                A, B = layer.lora_A[a].weight.data.float(), layer.lora_B[a].weight.data.float()
                d = (B @ A) * layer.scaling[a]
                delta = d if delta is None else delta + d
            if delta is not None:
                if getattr(layer, "fan_in_fan_out", False):
                    delta = delta.T
                t = (t.float() + delta).to(t.dtype)
        out.append((checkpoint_name(name), t))
    return out


def gathered_weight_buckets(module, bucket_bytes: int):
    """Yield lists of (checkpoint name, full tensor), each list one bucket of at most
    ``bucket_bytes`` (a unit larger than that is a bucket of its own). Tensors are the gathered
    parameters themselves (or merged copies): valid until the consumer has copied them, read-only.
    Collective: see the module docstring."""
    import deepspeed
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets, current, size = [], [], 0
    for unit in _units(module):
        nbytes = sum(_numel(p) * p.element_size() for _, p in unit[1])
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(unit)
        size += nbytes
    if current:
        buckets.append(current)
    for bucket in buckets:
        params = [p for _, ps in bucket for _, p in ps]
        with torch.no_grad(), deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            out = []
            for layer, ps in bucket:
                out += _merged(layer, ps) if layer is not None else [(checkpoint_name(n), p.data) for n, p in ps]
            yield out
