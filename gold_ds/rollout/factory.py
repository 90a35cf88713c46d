"""Building the rollout a preset asks for (``rollout.backend``). Called by every rank (the colocated
engine's construction is collective)."""
import os

import torch

from ..config import RunConfig
from .transformers_generator import StudentCopyGenerator, TransformersGenerator

_CPU_KV_CACHE_BYTES = 256 << 20


def transformers_generator(cfg: RunConfig, engine, side, micro_batch_size: int) -> TransformersGenerator:
    """``generate`` on a ZeRO engine's model (the student's or the teacher's) with the rollout's
    sampling settings. ``side``: the model's data side (tokenizer, placeholder ids never sampled);
    vision-language prompts are generated ``micro_batch_size`` at a time."""
    r = cfg.rollout
    return TransformersGenerator(engine.module, side.tokenizer, device=engine.device, max_new_tokens=r.max_new_tokens,
                                 temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                 multimodal_chunk=micro_batch_size, suppress_tokens=side.placeholder_ids)


def build_rollout(cfg: RunConfig, engine, side, micro_batch_size: int):
    """The student's on-policy rollout for ``rollout.backend``. ``engine``: the student's ZeRO-3
    engine (transformers generates with it; vLLM starts from its architecture)."""
    r = cfg.rollout
    if r.backend == "transformers":
        if not r.student_copy:
            return transformers_generator(cfg, engine, side, micro_batch_size)
        return StudentCopyGenerator(lambda: _plain_copy(engine), side.tokenizer, device=engine.device,
                                    sync_every=r.sync_every, bucket_bytes=r.sync_bucket_mb << 20,
                                    max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                    top_k=r.top_k, multimodal_chunk=micro_batch_size,
                                    suppress_tokens=side.placeholder_ids)
    sampling = dict(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                    stop_token_ids=list(r.stop_token_ids), sync_every=r.sync_every,
                    bucket_bytes=r.sync_bucket_mb << 20)
    if r.backend == "vllm_server":
        from .vllm_server import VLLMServerGenerator
        s = r.server
        return VLLMServerGenerator(side.tokenizer, url=s.url, timeout_s=s.timeout_s,
                                   weights_path=s.weights_path or os.path.join(cfg.output_dir, "server-weights"),
                                   **sampling)
    from .vllm_colocate import VLLMColocateGenerator
    from .vllm_common import import_vllm
    import_vllm()
    from vllm.platforms import current_platform
    c = r.colocate
    kv = c.kv_cache_memory_bytes
    if kv is None and current_platform.is_cpu():
        kv = _CPU_KV_CACHE_BYTES
    return VLLMColocateGenerator(
        engine.module.config, side.tokenizer, workdir=os.path.join(cfg.output_dir, "vllm-model"),
        dtype=cfg.student.model.dtype, max_model_len=c.max_model_len or cfg.data.max_prompt_length + r.max_new_tokens,
        sleep_level=c.sleep_level, tensor_parallel_size=c.tensor_parallel_size,
        gpu_memory_utilization=c.gpu_memory_utilization, kv_cache_memory_bytes=kv, enforce_eager=c.enforce_eager,
        seed=cfg.seed, trust_remote_code=cfg.student.model.trust_remote_code, **sampling)


def _plain_copy(engine):
    """An unpartitioned model of the student's architecture on the engine's device, its initial
    weights overwritten by the first sync. A LoRA student's copy is its base architecture: the synced
    weights have the adapters merged in."""
    module = engine.module
    model = module.get_base_model() if hasattr(module, "get_base_model") else module  # under peft's wrapper
    dtype = next(model.parameters()).dtype
    gpus = [engine.device] if engine.device.type == "cuda" else []
    # its random initialization (overwritten by the first sync) must not move the run's RNG: a resumed
    # run builds the copy at another step than the uninterrupted one and must sample the same
    with torch.random.fork_rng(devices=gpus), torch.device(engine.device):
        copy = type(model)(model.config).to(dtype)
    if any(hasattr(p, "ds_id") for p in copy.parameters()):
        raise RuntimeError("the student's copy for generation was built partitioned (a ZeRO-3 context was open)")
    copy.generation_config = model.generation_config
    return copy.eval()
