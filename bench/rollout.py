"""Rollout throughput: colocated vLLM vs transformers `generate` on the ZeRO-3 student, same prompts,
and the time of one weight sync (ZeRO-3 gather in buckets + in-place load into vLLM).

    python bench/rollout.py [--world 2] [--prompts 64] [--new-tokens 64] [--repeats 3]

The prompts are split over the ranks (64 prompts on 2 ranks: 32 each); every sample runs to
--new-tokens (no EOS), so both sides generate the same number of tokens. Tokens/s = all ranks' new
tokens / the slowest rank's wall time; the best of --repeats runs is kept. CPU, gloo, fp32, a tiny
Llama (4 layers, hidden 256, head size 64). Prints a markdown table.
"""
import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _model_cfg():
    return {"config": {"model_type": "llama", "vocab_size": 274, "hidden_size": 256, "intermediate_size": 512,
                       "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
                       "max_position_embeddings": 256, "tie_word_embeddings": False, "bos_token_id": None,
                       "eos_token_id": None, "pad_token_id": 0},
            "tokenizer": "builtin:arithmetic", "init_seed": 1, "dtype": "float32"}


def _rank(rank, world, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    import deepspeed
    import torch
    import torch.distributed as dist
    from gold_ds.config import ModelConfig
    from gold_ds.data.tasks import train_arithmetic_tokenizer
    from gold_ds.engine.models import build_training_engine
    from gold_ds.engine.weights import gathered_weight_buckets
    from gold_ds.rollout import TransformersGenerator
    from gold_ds.rollout.vllm_colocate import VLLMColocateGenerator

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    tok = train_arithmetic_tokenizer()
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
    engine = build_training_engine(ModelConfig(**_model_cfg()), ds, world)
    per_rank = args.prompts // world
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"{10 + i}+{11 + (7 * i) % 89}="}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False)
               for i in range(rank * per_rank, (rank + 1) * per_rank)]
    N = args.new_tokens

    def timed(fn):
        best = None
        for _ in range(args.repeats):
            dist.barrier()
            t0 = time.perf_counter()
            res = fn()
            dt = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            best = dt.item() if best is None else min(best, dt.item())
        return best, res

    tgen = TransformersGenerator(engine.module, tok, device=engine.device, max_new_tokens=N)
    tgen.eos_id = None  # every sample runs to N tokens
    t_hf, out = timed(lambda: tgen.generate(prompts, 1))
    assert all(len(c) == N for c in out), [len(c) for c in out]

    vgen = VLLMColocateGenerator(engine.module.config, tok, workdir=os.path.join(out_dir_of(args), "vllm"),
                                 dtype="float32", max_new_tokens=N, max_model_len=256, sleep_level=1,
                                 enforce_eager=True, kv_cache_memory_bytes=256 << 20, seed=0,
                                 bucket_bytes=args.bucket_mb << 20)
    vgen.stop_ids = []  # every sample runs to N tokens
    sync, steps = {}, itertools.count()  # a new step each repeat: sync_every 1 syncs every time
    t_sync, _ = timed(lambda: sync.update(vgen.sample(
        [], 1, step=next(steps), weights=lambda bucket_bytes: gathered_weight_buckets(engine.module, bucket_bytes))[1]))
    t_vllm, out = timed(lambda: vgen.generate(prompts, 1))
    assert all(len(c) == N for c in out), [len(c) for c in out]
    if rank == 0:
        params = sum(p.ds_numel for p in engine.module.parameters())
        tokens = args.prompts * N
        with open(os.path.join(out_dir_of(args), "result.txt"), "w") as f:
            f.write(f"{params}\t{tokens}\t{t_hf}\t{t_vllm}\t{t_sync}\t{sync['time/weight_sync']}\n")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def out_dir_of(args):
    return args.out_dir


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=int, default=512)
    ap.add_argument("--out-dir", default="/tmp/gold_ds_bench_rollout")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    import socket
    import torch.multiprocessing as mp
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    mp.spawn(_rank, args=(args.world, port, args, None), nprocs=args.world)
    params, tokens, t_hf, t_vllm, t_sync, t_load = open(os.path.join(args.out_dir, "result.txt")).read().split("\t")
    tokens, t_hf, t_vllm, t_sync, t_load = int(tokens), float(t_hf), float(t_vllm), float(t_sync), float(t_load)
    print(f"rollout: {args.prompts} prompts x {args.new_tokens} new tokens on {args.world} CPU ranks, "
          f"student {int(params) / 1e6:.2f}M params (ZeRO-3), best of {args.repeats}")
    print("| generator | wall s | tokens/s | speed-up |")
    print("|---|---|---|---|")
    print(f"| transformers generate (ZeRO-3, synced) | {t_hf:.2f} | {tokens / t_hf:.0f} | 1.0x |")
    print(f"| vLLM colocated (external_launcher) | {t_vllm:.2f} | {tokens / t_vllm:.0f} | {t_hf / t_vllm:.1f}x |")
    print(f"weight sync (gather in {args.bucket_mb} MiB buckets + in-place load, incl. wake/sleep calls): "
          f"{t_sync * 1000:.0f} ms per sync (best; the last sync's load call on rank 0: {t_load * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
