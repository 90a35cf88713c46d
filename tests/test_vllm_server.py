"""Server mode against a real vLLM OpenAI-compatible server started here on 127.0.0.1 (the suite's
only server start, ~20 s), with 2 ZeRO-3 ranks.

The server starts from a model with other weights than the student. After the first push the
server's log-probabilities of sampled sequences equal the student's (fp32, 1e-4); after a training
step and a second push they equal the new student's and moved; prompts of both ranks (1 and 3, then
3 and 0) go out in one request per rollout and each rank gets exactly its own prompts' samples
(greedy samples checked against the student's argmax).
"""
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from conftest import ds_section, free_port, run_ranks
from vllm_helpers import assert_greedy, max_diff, model_logprobs, plain_copy, require_vllm, student_cfg

require_vllm()


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read().decode())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM
    from gold_ds.data.tasks import train_arithmetic_tokenizer
    model_dir = str(tmp_path_factory.mktemp("server-model"))
    kw = dict(student_cfg()["config"])
    torch.manual_seed(123)  # not the student's init: the first push must change the server's weights
    AutoModelForCausalLM.from_config(AutoConfig.for_model(kw.pop("model_type"), **kw)).save_pretrained(model_dir)
    train_arithmetic_tokenizer().save_pretrained(model_dir)
    port = free_port()
    log = open(os.path.join(model_dir, "server.log"), "w")
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                             "--served-model-name", "student", "--host", "127.0.0.1", "--port", str(port),
                             "--dtype", "float32", "--enforce-eager", "--max-model-len", "128"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except Exception:
                pass
            if proc.poll() is not None:
                pytest.fail("vLLM server died:\n" + open(os.path.join(model_dir, "server.log")).read()[-3000:])
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _server_logprobs(url, seqs, plens):
    out = []
    for s, n in zip(seqs, plens):
        choice = _post(url + "/v1/completions", {"model": "student", "prompt": s, "max_tokens": 1,
                                                 "temperature": 0, "prompt_logprobs": 0})["choices"][0]
        out.append([choice["prompt_logprobs"][i][str(s[i])]["logprob"] for i in range(n, len(s))])
    return out


def _server_mode(tmp, url):
    import deepspeed
    import torch.distributed as dist
    from gold_ds.config import ModelConfig
    from gold_ds.data.tasks import train_arithmetic_tokenizer
    from gold_ds.engine.models import build_training_engine
    from gold_ds.engine.weights import gathered_weight_buckets
    from gold_ds.rollout.vllm_server import VLLMServerGenerator

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    tok = train_arithmetic_tokenizer()
    engine = build_training_engine(ModelConfig(**student_cfg()), ds_section(2, 1, lr=5e-2), 2)
    gen = VLLMServerGenerator(tok, url=url, weights_path=os.path.join(tmp, "weights"), max_new_tokens=6)
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"{10 + i}+{20 + 3 * i}="}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False)
               for i in range(4 * rank, 4 * rank + 1 + 2 * rank)]  # rank 0: 1 prompt, rank 1: 3

    samples = gen.generate(prompts, 2, weights=gathered_weight_buckets(engine.module, 100_000))
    assert len(samples) == 2 * len(prompts) and all(1 <= len(c) <= 6 for c in samples)
    assert gen.loaded_tensors == len(list(engine.module.parameters()))
    if rank == 0:
        assert list(gen.events) == ["/collective_rpc", "/reset_prefix_cache", f"load({gen.loaded_tensors})",
                              "/v1/completions"], gen.events
    seqs = [p + c for i, p in enumerate(prompts) for c in samples[2 * i:2 * i + 2]]
    plens = [len(p) for p in prompts for _ in range(2)]
    before = model_logprobs(plain_copy(engine), seqs, plens)
    diff0 = max_diff(_server_logprobs(url, seqs, plens), before)
    assert diff0 <= 1e-4, f"after the first push server and trainer differ by {diff0:.2e}"

    L = max(len(s) for s in seqs)
    ids = torch.tensor([s + [tok.pad_token_id] * (L - len(s)) for s in seqs[:2]])
    labels = ids.clone()
    labels[labels == tok.pad_token_id] = -100
    engine.backward(engine(input_ids=ids, labels=labels).loss)
    engine.step()
    model = plain_copy(engine)
    after = model_logprobs(model, seqs, plens)
    assert max_diff(after, before) > 1e-3

    mine = prompts if rank == 1 else []  # rank 0 has none this time
    greedy = gen.generate(mine, 1, greedy=True, max_new_tokens=3, weights=gathered_weight_buckets(engine.module, 100_000))
    assert len(greedy) == len(mine)
    diff1 = max_diff(_server_logprobs(url, seqs, plens), after)
    assert diff1 <= 1e-4, f"after a step and a push server and trainer differ by {diff1:.2e}"
    assert_greedy(model, mine, greedy)
    dist.barrier()


def test_server_mode(tmp_path, server):
    run_ranks(_server_mode, 2, str(tmp_path), server, err_dir=str(tmp_path / "errors"))
