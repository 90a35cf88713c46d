"""Helpers of the vLLM tests: skip without vllm (fail instead when GOLD_DS_REQUIRE_VLLM=1, as CI
sets it), a tiny student vLLM can run (head size >= 32), and the trainer-side references the tests
compare vLLM with (a plain fp64 copy of the ZeRO-3 student, its logprobs and greedy choices), and
the colocated engine's own log-probabilities of given sequences."""
import os

import pytest
import torch

from conftest import llama_config, plain_model


def require_vllm():
    """Skip the calling test module when vllm is not importable; with GOLD_DS_REQUIRE_VLLM=1 fail."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken torchvision raising at import
        if os.environ.get("GOLD_DS_REQUIRE_VLLM") == "1":
            raise RuntimeError(f"GOLD_DS_REQUIRE_VLLM=1 but vllm does not import: {e!r}") from e
        pytest.skip(f"vllm not importable ({e!r}): pip install -e '.[vllm]'", allow_module_level=True)


def student_llama():
    """A tiny Llama vLLM can run: head size hidden / heads = 32 (vLLM needs >= 32)."""
    return llama_config(hidden=64, max_positions=128)


def student_cfg():
    """ModelConfig fields of the student (fp32, built from a config)."""
    return {"config": student_llama(), "tokenizer": "builtin:arithmetic", "init_seed": 1, "dtype": "float32"}


def plain_copy(engine):
    """The ZeRO-3 student's current weights in a plain (unpartitioned) fp64 copy of the model, so
    that ranks can run different numbers of forwards. Collective (every rank calls it)."""
    import deepspeed
    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        state = {n: p.data.clone() for n, p in engine.module.named_parameters()}
    return plain_model(engine.module.config, state)


@torch.no_grad()
def vllm_logprobs(gen, sequences, prompt_lengths):
    """Log-probabilities a colocated engine gives each sequence's tokens after its prompt, from its
    current weights (woken first when it sleeps). With tensor parallelism every rank of a group
    must pass the same sequences."""
    if gen.sleep_level:
        gen._wake("weights")
        gen._wake("kv_cache")
    sp = gen._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = gen.llm.generate([gen._vllm.TokensPrompt(prompt_token_ids=list(s)) for s in sequences], sp, use_tqdm=False)
    gen.llm.reset_prefix_cache()
    if gen.sleep_level:
        gen._sleep()
    return [[o.prompt_logprobs[i][s[i]].logprob for i in range(n, len(s))]
            for o, s, n in zip(outs, sequences, prompt_lengths)]


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
