"""Helpers of the vLLM tests: skip without vllm (fail instead when GOLD_DS_REQUIRE_VLLM=1, as CI
sets it), and a tiny student vLLM can run (head size >= 32)."""
import os

import pytest


def require_vllm():
    """Skip the calling test module when vllm is not importable; with GOLD_DS_REQUIRE_VLLM=1 fail."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken torchvision raising at import
        if os.environ.get("GOLD_DS_REQUIRE_VLLM") == "1":
            raise RuntimeError(f"GOLD_DS_REQUIRE_VLLM=1 but vllm does not import: {e!r}") from e
        pytest.skip(f"vllm not importable ({e!r}): pip install -e '.[vllm]'", allow_module_level=True)


def student_llama(hidden=64, layers=2, heads=2):
    """A tiny Llama on the arithmetic tokenizer's 274 tokens; head size hidden/heads = 32."""
    return {"model_type": "llama", "vocab_size": 274, "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
            "max_position_embeddings": 128, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def student_cfg(**kw):
    """ModelConfig fields of the student (fp32, built from a config)."""
    return {"config": student_llama(**kw), "tokenizer": "builtin:arithmetic", "init_seed": 1, "dtype": "float32"}
