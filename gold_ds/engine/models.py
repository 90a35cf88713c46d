"""Building tokenizers and models, and wrapping them in DeepSpeed engines.

Which ranks call what: every function here that touches a DeepSpeed engine or builds a model is
called by every rank (construction under ZeRO-3 and consolidation are collective).
"""
import contextlib
import copy
import os
import sys
import types

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def training_ds_config(ds: dict, world_size: int) -> dict:
    """The DeepSpeed config of a training engine, with ``train_batch_size`` made explicit."""
    ds = copy.deepcopy(ds)
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def inference_ds_config(ds: dict, micro_batch: int, world_size: int) -> dict:
    """The teacher's ZeRO-inference config: DeepSpeed still wants batch sizes; they do not matter."""
    ds = copy.deepcopy(ds)
    ds.setdefault("train_micro_batch_size_per_gpu", micro_batch)
    ds.setdefault("gradient_accumulation_steps", 1)
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


@contextlib.contextmanager
def _zero3_construction(ds_config: dict):
    """While this is open, transformers builds models partitioned (``zero.Init``): no rank ever holds
    a full copy. The ``HfDeepSpeedConfig`` must stay referenced for that; it is dropped on exit so
    that later calls (e.g. ``generate``) do not silently change behaviour because of it."""
    from transformers.integrations import HfDeepSpeedConfig
    keep = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del keep


def _auto_class(model_cfg):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    return AutoModelForImageTextToText if getattr(model_cfg, "processor", None) else AutoModelForCausalLM


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def check_model_source(model_cfg, key: str) -> None:
    """``ConfigError`` naming ``<key>.name_or_path`` unless it is a local directory with a config and
    weights, or a hub id whose config loads (checked at start, before anything is built)."""
    name = model_cfg.name_or_path
    if name is None:
        return
    from transformers import AutoConfig
    from ..config import ConfigError, missing_local_path
    if missing_local_path(name):
        raise ConfigError(f"config key '{key}.name_or_path': cannot load a model from {name!r} (no such directory); "
                          "give a local directory with config.json and weights, or a hub id")
    try:
        AutoConfig.from_pretrained(name, trust_remote_code=model_cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - not found, no config.json, offline: name the key
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = f"{type(e).__name__}: {first[:200]}"
        raise ConfigError(f"config key '{key}.name_or_path': cannot load a model from {name!r} ({what}); give a "
                          "local directory with config.json and weights, or a hub id") from e
    local = os.path.isdir(os.path.expanduser(name))
    if local and not any(os.path.exists(os.path.join(os.path.expanduser(name), f)) for f in _WEIGHT_FILES):
        raise ConfigError(f"config key '{key}.name_or_path': the directory {name!r} has a config but no weights "
                          f"(one of {', '.join(_WEIGHT_FILES)})")


def model_skeleton(model_cfg):
    """The model's modules with weights on the meta device (nothing allocated): its structure, for
    start-up checks."""
    from transformers import AutoConfig
    if model_cfg.name_or_path is not None:
        config = AutoConfig.from_pretrained(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
    else:
        kwargs = dict(model_cfg.config)
        config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    with torch.device("meta"):
        return _auto_class(model_cfg).from_config(config, trust_remote_code=model_cfg.trust_remote_code)


def build_model(model_cfg, ds_config: dict):
    """A causal LM (an image-text-to-text model when ``model_cfg.processor`` is set) built partitioned
    under ZeRO-3, from a hub id / local dir or from a config."""
    from transformers import AutoConfig
    dtype = _DTYPES[model_cfg.dtype]
    auto = _auto_class(model_cfg)
    with _zero3_construction(ds_config):
        if model_cfg.name_or_path is not None:
            model = auto.from_pretrained(model_cfg.name_or_path, dtype=dtype,
                                                         trust_remote_code=model_cfg.trust_remote_code)
        else:
            kwargs = dict(model_cfg.config)
            config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
            torch.manual_seed(model_cfg.init_seed)
            model = auto.from_config(config, dtype=dtype)
    return model


def with_layer_leaves(ds_config: dict, model) -> dict:
    """``ds_config`` with the model's decoder layers (transformers' ``_no_split_modules``) as ZeRO-3
    leaf modules: DeepSpeed then gathers a layer's parameters in one collective and runs its
    forward and backward hooks once per layer, instead of once per linear layer and norm. On small
    and mid-sized layers those per-module hooks and gathers are most of a step (2 CPU ranks, demo
    models: bench/RESULTS.md); the numbers computed are the same. Memory: a whole layer is live while
    it runs, so this is done only when every such layer has at most ``stage3_max_live_parameters``
    parameters. A ``zero_optimization.leaf_module`` in the preset is kept as it is (an empty
    ``{"classes": []}`` turns this off); DeepSpeed's own default leaf classes (MoE blocks) stay.

    Text models only, and not under LoRA: with a vision-language model (LLaVA) or peft's wrapped
    layers as leaves, DeepSpeed 0.19.8's backward meets a released (size-0) weight
    (tests/test_heads.py, tests/test_lora.py), so those keep DeepSpeed's per-module gathers."""
    from deepspeed.runtime.zero.leaf_module_config import DEFAULT_LEAF_MODULE_CLASSES
    from .lora import transformers_model
    zero, base = ds_config.get("zero_optimization", {}), transformers_model(model)
    if zero.get("stage") != 3 or "leaf_module" in zero or base is not model or hasattr(base.config, "vision_config"):
        return ds_config  # not ZeRO-3, the preset's own leaves, a peft (LoRA) wrapper, a vision-language model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        return ds_config
    limit = zero.get("stage3_max_live_parameters", 10 ** 9)
    if max(sum(getattr(p, "ds_numel", p.numel()) for p in m.parameters()) for m in layers) > limit:
        return ds_config
    ds_config = copy.deepcopy(ds_config)
    classes = list(DEFAULT_LEAF_MODULE_CLASSES) + sorted({type(m).__name__ for m in layers})
    ds_config["zero_optimization"]["leaf_module"] = {"classes": classes}
    return ds_config


_MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


@contextlib.contextmanager
def _without_muon_import(ds_config: dict):
    """DeepSpeed 0.19.8 imports its Muon optimizer in every ZeRO engine's set-up (the optimizer check
    and stage 3's ``isinstance(optimizer, MuonWithAuxAdam)``); that module runs ``torch.compile`` at
    import, which loads dynamo and inductor: ~2.5 s of every start-up on CPU. When the configured
    optimizer is not Muon, a stand-in module whose class nothing is an instance of answers those
    two questions the same way (not Muon); it is removed once the engine exists."""
    optimizer = str((ds_config.get("optimizer") or {}).get("type", "")).lower()
    if optimizer == "muon" or _MUON in sys.modules:
        yield
        return
    stand_in = types.ModuleType(_MUON)
    stand_in.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {})
    sys.modules[_MUON] = stand_in
    try:
        yield
    finally:
        if sys.modules.get(_MUON) is stand_in:
            del sys.modules[_MUON]


def _no_grad_linear_is_torchs() -> None:
    """ZeRO-3's ``memory_efficient_linear`` (on by default) replaces ``torch.nn.functional.linear``
    process-wide with an autograd Function that keeps no gathered weight alive for backward. Its
    every call costs ~25 us of Python (deepspeed 0.19.8: its ``setup_context`` makes torch bind the
    arguments through ``inspect.signature``), with or without a gradient. Calls that record no
    gradient (the teacher's forward, rollouts on the student's copy, evaluation) have nothing to
    keep for backward: they go to torch's own linear. Calls under autograd keep DeepSpeed's."""
    import torch.nn.functional as F
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as patched
    if F.linear is not zero3_linear_wrap:
        return
    plain = patched.linear_bk

    def linear(input, weight, bias=None):
        if torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad):
            return zero3_linear_wrap(input, weight, bias)
        return plain(input, weight, bias)
    F.linear = linear


def build_training_engine(model_cfg, ds: dict, world_size: int, lora=None):
    """A ZeRO-3 training engine (optimizer and LR schedule from the DeepSpeed config). With ``lora``
    (a ``LoraConfig`` section) the model carries a peft adapter and only the parameters that train
    (adapter, ``modules_to_save``) reach the optimizer."""
    import deepspeed
    ds_config = training_ds_config(ds, world_size)
    model = build_model(model_cfg, ds_config)
    if lora is not None:
        from .lora import apply_lora
        model = apply_lora(model, lora, model_cfg.init_seed)
    ds_config = with_layer_leaves(ds_config, model)
    with _without_muon_import(ds_config):
        engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                          config=ds_config)
    engine.train()
    _no_grad_linear_is_torchs()
    return engine


def build_inference_engine(model_cfg, ds: dict, micro_batch: int, world_size: int):
    """A frozen ZeRO-inference engine: partitioned, no optimizer, no grads, optional offload."""
    import deepspeed
    ds_config = inference_ds_config(ds, micro_batch, world_size)
    model = build_model(model_cfg, ds_config)
    model.requires_grad_(False)
    ds_config = with_layer_leaves(ds_config, model)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    _no_grad_linear_is_torchs()
    return engine


def local_parameter_share(engine) -> float:
    """Fraction of the model's parameters this rank holds (about 1/world under ZeRO-3)."""
    local = full = 0
    for p in engine.module.parameters():
        full += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    return local / full
