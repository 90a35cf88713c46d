"""Helpers of the vLLM tests: skip without vllm (fail instead when GOLD_DS_REQUIRE_VLLM=1, as CI
sets it), a tiny student vLLM can run (head size >= 32), and the trainer-side references the tests
compare vLLM with (a plain fp64 copy of the ZeRO-3 student, its logprobs and greedy choices)."""
import os

import pytest
import torch


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


def plain_copy(engine):
    """The ZeRO-3 student's current weights in a plain (unpartitioned) fp64 copy of the model, so
    that ranks can run different numbers of forwards. Collective (every rank calls it)."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        state = {n: p.data.clone() for n, p in engine.module.named_parameters()}
    model = AutoModelForCausalLM.from_config(engine.module.config)
    model.load_state_dict(state, strict=False)
    return model.double().eval()


@torch.no_grad()
def model_logprobs(model, sequences, prompt_lengths):
    """log p(token | prefix) of every token after the prompt, per sequence."""
    out = []
    for s, n in zip(sequences, prompt_lengths):
        lp = torch.log_softmax(model(input_ids=torch.tensor([s])).logits[0], -1)
        out.append([lp[i - 1, s[i]].item() for i in range(n, len(s))])
    return out


def max_diff(a, b):
    return max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))


@torch.no_grad()
def assert_greedy(model, prompts, completions):
    """Every completion token is the model's argmax after the prompt and the tokens before it."""
    for p, c in zip(prompts, completions):
        s = list(p)
        for t in c:
            assert model(input_ids=torch.tensor([s])).logits[0, -1].argmax().item() == t
            s.append(t)
