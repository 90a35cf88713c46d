"""LoRA students with ``peft``: the adapter put on a ZeRO-3-partitioned model, and its exports.

``apply_lora`` runs after the model is built partitioned and before ``deepspeed.initialize``. peft
wraps the chosen layers (it reads their shapes from the modules, not from the released weights) and
freezes every base weight; the new adapter weights are ordinary tensors, made from one seed, which
``deepspeed.initialize`` partitions like the rest (broadcasting rank 0's values). Only parameters
that require grad reach the optimizer, so only the adapter and ``modules_to_save`` have optimizer
state. peft's own ZeRO-3 handling gathers a ``modules_to_save`` module before copying it.

Which layers: ``target_modules`` are looked up inside the model's decoder (``get_decoder()``: a
causal LM's decoder, a vision-language model's language model), so ``all-linear`` never takes the
output head or a vision tower. They are handed to peft as qualified names; the adapter's config
lists them, and ``PeftModel.from_pretrained`` on the base model finds the same layers.

The rollout engines get merged weights (``gold_ds.engine.weights``): vLLM sees a plain model.
"""
import torch
import torch.distributed as dist

from ..config import ConfigError
from .checkpoint import write_directory
from .weights import gathered_weight_buckets


def peft_model(module):
    """The ``peft`` wrapper when ``module`` is one, else None."""
    return module if hasattr(module, "peft_config") and hasattr(module, "get_base_model") else None


def transformers_model(module):
    """The transformers model of an engine's module (under any ``peft`` wrapper)."""
    peft = peft_model(module)
    return peft.get_base_model() if peft is not None else module


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _resolve(lora, model, key: str) -> tuple:
    """(qualified names of the adapted layers, qualified names of the modules trained fully)."""
    decoder = model.get_decoder()
    prefix = next(n for n, m in model.named_modules() if m is decoder)
    inside = [(f"{prefix}.{n}", m) for n, m in decoder.named_modules() if n]
    where = f"the student's {type(decoder).__name__} ({prefix})"
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in inside if isinstance(m, torch.nn.Linear)})
    if lora.target_modules == "all-linear":
        targets = [n for n, m in inside if isinstance(m, torch.nn.Linear)]
    else:
        for t in lora.target_modules:
            if not any(_matches(n, t) for n, _ in inside):
                raise ConfigError(f"config key '{key}.target_modules': {t!r} matches no module of {where}; "
                                  f"its linear layers are named {', '.join(linear)} (or use 'all-linear')")
        targets = [n for n, _ in inside if any(_matches(n, t) for t in lora.target_modules)]
    everything = [n for n, _ in model.named_modules() if n]
    saved = []
    for t in lora.modules_to_save:
        found = [n for n in everything if _matches(n, t)]
        if not found:
            raise ConfigError(f"config key '{key}.modules_to_save': {t!r} matches no module of the student "
                              f"({type(model).__name__}); e.g. {', '.join(n for n, _ in model.named_children())}")
        saved += [n for n in found if n not in saved]
    if not targets:
        raise ConfigError(f"config key '{key}.target_modules': {where} has no linear layer")
    return targets, saved


def apply_lora(model, lora, init_seed: int, key: str = "student.lora"):
    """``model`` wrapped by ``peft`` with the adapter of ``lora`` (a ``LoraConfig`` section), its
    base weights frozen. A layer peft cannot adapt is a ConfigError naming ``key``."""
    import peft
    targets, saved = _resolve(lora, model, key)
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=targets, modules_to_save=saved or None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        try:
            return peft.get_peft_model(model, config)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config key '{key}.target_modules': peft cannot put a LoRA adapter on the "
                              f"student's layers {targets[:4]}{'...' if len(targets) > 4 else ''}: {e}") from e


def check_lora(model_cfg, lora, key: str = "student.lora") -> None:
    """``apply_lora``'s checks on the model's meta-device skeleton, at start-up (before any stage
    builds a model): a ConfigError naming ``key`` when the adapter cannot be put on the student."""
    from .models import model_skeleton
    with torch.device("meta"):
        apply_lora(model_skeleton(model_cfg), lora, 0, key)


def export_lora(engine, tokenizer, out_dir: str, merged_dir) -> None:
    """The adapter in peft's format (``adapter_config.json``, ``adapter_model.safetensors``) and the
    tokenizer in ``out_dir``; with ``merged_dir``, also the merged model (``from_pretrained``).
    Called by every rank (the weights are gathered); rank 0 writes."""
    state = engine._zero3_consolidated_16bit_state_dict()
    merged = {}
    if merged_dir is not None:  # the rollout's merged, checkpoint-named weights, bucket by bucket
        for bucket in gathered_weight_buckets(engine.module, 512 * 2 ** 20):
            if dist.get_rank() == 0:
                merged.update({name: t.detach().cpu().clone() for name, t in bucket})
    if dist.get_rank() == 0:
        write_directory(out_dir, lambda tmp: (engine.module.save_pretrained(tmp, state_dict=state),
                                              tokenizer.save_pretrained(tmp)))
        if merged_dir is not None:
            base = transformers_model(engine.module)
            write_directory(merged_dir, lambda tmp: (base.save_pretrained(tmp, state_dict=merged, safe_serialization=True),
                                                     tokenizer.save_pretrained(tmp)))
    dist.barrier()

