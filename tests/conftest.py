"""Shared test helpers: tiny model configs, a tiny preset, plain (unpartitioned) fp64 models, and
running a function on N DeepSpeed ranks from pytest."""
import copy
import os
import socket
import sys
import traceback

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one cache for DeepSpeed's C++ ops (the shared-memory comm op is built once, ~60 s, then reused)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "gold_ds_torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_SILENT", "true")


def llama_config(hidden=32, layers=2, heads=2, vocab=274, max_positions=64) -> dict:
    """A tiny Llama as a config dict (``ModelConfig.config``); vocab 274 is the arithmetic tokenizer's."""
    return {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
            "max_position_embeddings": max_positions, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def plain_model(config, state=None, seed=0, dtype="float64"):
    """A plain (unpartitioned) causal LM in eval mode, fp64 by default, from a config (a dict with
    ``model_type``, or a transformers config), with the weights ``state`` (else a seeded random init)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    if isinstance(config, dict):
        kw = dict(config)
        config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if state is not None:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return model.to(getattr(torch, dtype)).eval()


def ds_section(micro, ga, lr=1e-3):
    """A student DeepSpeed config: ZeRO-3 with every parameter partitioned, torch AdamW."""
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": ga,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "optimizer": {"type": "AdamW", "params": {"lr": lr, "torch_adam": True}}}


def tiny_raw(output_dir, micro=2, ga=2, **top) -> dict:
    """A complete preset with tiny models (student 32 wide, teacher 64 wide) on the arithmetic task."""
    raw = {
        "name": "tiny", "output_dir": str(output_dir), "seed": 0, "max_steps": 2,
        "student": {"model": {"config": llama_config(32), "tokenizer": "builtin:arithmetic", "init_seed": 1},
                    "deepspeed": ds_section(micro, ga)},
        "teacher": {"model": {"config": llama_config(64), "tokenizer": "builtin:arithmetic", "init_seed": 7},
                    "deepspeed": {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}},
        "data": {"train": {"builtin": "arithmetic", "split": "train", "num_examples": 64},
                 "max_prompt_length": 32, "max_completion_length": 8},
        "distill": {"beta": 0.5, "lmbda": 0.5},
        "rollout": {"max_new_tokens": 4},
        "logging": {"progress_bar": False},
        "export": {"enabled": False},
    }
    raw.update(copy.deepcopy(top))
    return raw


def assert_close(got, want, what, tol, floor=0.0):
    """|got - want| <= tol x max |want| (at least ``floor``: for a tensor whose true value is 0, say
    an attention key bias's gradient, tol of the largest gradient of the model)."""
    err = (got - want).abs().max().item()
    scale = max(want.abs().max().item(), floor, 1e-12)
    assert err <= tol * scale, f"{what}: off by {err:.3e} (max |ref| {want.abs().max():.3e})"


def logged_losses(out_dir) -> dict:
    """step -> loss of a run's metrics.jsonl."""
    import json
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "step" in r and "loss" in r}


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _worker(rank, world, port, fn, args, err_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    import torch
    torch.set_num_threads(1)
    code = 0
    try:
        fn(*args)
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(err_dir, f"error-rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # see launch/train.py: interpreter teardown after gloo autograd collectives may abort


def run_ranks(fn, world, *args, err_dir):
    """Run ``fn(*args)`` on ``world`` spawned ranks (env as a launcher sets it); fail with the
    ranks' tracebacks if any rank raised."""
    import torch.multiprocessing as mp
    os.makedirs(err_dir, exist_ok=True)
    ctx = mp.spawn(_worker, args=(world, free_port(), fn, args, err_dir), nprocs=world, join=False)
    crashed = None
    try:
        while not ctx.join():
            pass
    except Exception as e:  # a rank failed; spawn has terminated the others
        crashed = e
    errors = sorted(f for f in os.listdir(err_dir) if f.startswith("error-rank"))
    if errors or crashed:
        pytest.fail("\n".join(open(os.path.join(err_dir, f)).read() for f in errors) or repr(crashed))
