"""Building the on-policy generator a preset asks for (``rollout.backend``) from config sections.
Called by every rank (the colocated engine's construction is collective)."""
import os

from ..config import RunConfig

_CPU_KV_CACHE_BYTES = 256 << 20


def vllm_generator(cfg: RunConfig, hf_config, tokenizer):
    """A vLLM generator for ``rollout.backend`` ``vllm_colocate`` or ``vllm_server``.
    ``hf_config``: the student's transformers config (the engine's architecture); ``tokenizer``: the
    student's. Both generators expect weights with their first ``generate``."""
    r = cfg.rollout
    sampling = dict(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                    top_k=r.top_k, stop_token_ids=list(r.stop_token_ids))
    if r.backend == "vllm_server":
        from .vllm_server import VLLMServerGenerator
        return VLLMServerGenerator(tokenizer, url=r.server.url, timeout_s=r.server.timeout_s,
                                   weights_path=r.server.weights_path or os.path.join(cfg.output_dir, "server-weights"),
                                   **sampling)
    if r.backend != "vllm_colocate":
        raise ValueError(f"rollout.backend={r.backend!r} is not a vLLM backend")
    from .vllm_colocate import VLLMColocateGenerator
    from .vllm_common import import_vllm
    import_vllm()
    from vllm.platforms import current_platform
    v = r.vllm
    kv = v.kv_cache_memory_bytes
    if kv is None and current_platform.is_cpu():
        kv = _CPU_KV_CACHE_BYTES
    return VLLMColocateGenerator(
        hf_config, tokenizer, workdir=os.path.join(cfg.output_dir, "vllm-model"), dtype=cfg.student.model.dtype,
        max_model_len=v.max_model_len or cfg.data.max_prompt_length + r.max_new_tokens,
        sleep_level=v.sleep_level, tensor_parallel_size=v.tensor_parallel_size,
        gpu_memory_utilization=v.gpu_memory_utilization, kv_cache_memory_bytes=kv,
        enforce_eager=v.enforce_eager, seed=cfg.seed, trust_remote_code=cfg.student.model.trust_remote_code,
        **sampling)
