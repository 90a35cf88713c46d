"""On-policy rollouts from a vLLM OpenAI-compatible server started by the user.

The server must run with ``VLLM_SERVER_DEV_MODE=1`` (it enables ``POST /collective_rpc`` and
``/reset_prefix_cache``); see the README for the command. Plain HTTP with the standard library:
the trainer needs no vllm install for this backend.

One rollout, ``generate(prompts, ..., weights=buckets or None)`` (``sample`` of the rollout
interface passes the buckets when a sync is due), called by every rank together:
  1. weight sync (when given): every rank takes part in gathering each bucket from ZeRO-3; rank 0 writes
     each bucket as one safetensors file into a fresh ``<weights_path>/sync-N`` directory, then asks
     the server to ``reload_weights`` from it (``POST /collective_rpc``; vLLM reads the files and
     loads them in place) and to reset its prefix cache, then removes the previous directory.
     The server must see ``weights_path`` (same machine or a shared filesystem). NCCL transfer to a
     server on other GPUs is not implemented (see the README);
  2. prompts are gathered to rank 0 (ranks may hold different numbers, none included), sent in one
     ``POST /v1/completions`` request (token-id prompts, ``n`` completions each, ``return_token_ids``),
     and each rank gets its own prompts' completions back (scatter from rank 0).
"""
import json
import os
import shutil
import time
import urllib.error
import urllib.request

import torch.distributed as dist

from .base import WeightSyncedRollout
from .vllm_common import cut_after_stop, sampling_kwargs


class VLLMServerGenerator(WeightSyncedRollout):
    def __init__(self, tokenizer, *, url: str, weights_path: str, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop_token_ids=(),
                 timeout_s: float = 600.0, sync_every: int = 1, bucket_bytes: int = 512 << 20):
        super().__init__(sync_every, bucket_bytes)
        self.url = url.rstrip("/")
        self.weights_path = os.path.abspath(weights_path)
        self.timeout_s = timeout_s
        self.eos_id = tokenizer.eos_token_id
        self.stop_ids = [t for t in [self.eos_id, *stop_token_ids] if t is not None]
        self.max_new_tokens = max_new_tokens
        self.sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        # events: requests sent to the server (rank 0) and "load(n)" (every rank)
        self._syncs = 0
        self._requests = 0
        self.model = None
        if self.rank == 0:
            self._wait_ready()
            self.model = self._request("GET", "/v1/models")["data"][0]["id"]

    # ------------------------------------------------------------------------------------- HTTP
    def _request(self, method: str, path: str, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as e:
            hint = (" (start the server with VLLM_SERVER_DEV_MODE=1 to enable the weight-update endpoints)"
                    if e.code == 404 and path in ("/collective_rpc", "/reset_prefix_cache") else "")
            raise RuntimeError(f"vLLM server {self.url}{path}: HTTP {e.code}: {e.read().decode()[:500]}{hint}") from None
        if method != "GET":
            self.events.append(path)
        return json.loads(text) if text.strip() else None

    def _wait_ready(self):
        t0 = time.time()
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.time() - t0 > self.timeout_s:
                raise RuntimeError(f"rollout.server.url={self.url!r}: no vLLM server answered /health within "
                                   f"{self.timeout_s:.0f}s (rollout.server.timeout_s); start it as the README shows")
            time.sleep(1.0)

    # ------------------------------------------------------------------------------ weight push
    def _load_weights(self, weights) -> int:
        """Every rank consumes the buckets (collective gathers); rank 0 writes and triggers the load."""
        from safetensors.torch import save_file
        self._syncs += 1
        target = os.path.join(self.weights_path, f"sync-{self._syncs}")
        if self.rank == 0:
            shutil.rmtree(target, ignore_errors=True)
            os.makedirs(target)
        count = 0
        for i, bucket in enumerate(weights):
            count += len(bucket)
            if self.rank == 0:
                save_file({n: t.detach().contiguous() for n, t in bucket},
                          os.path.join(target, f"model-{i:05d}.safetensors"))
        if self.rank == 0:
            self._request("POST", "/collective_rpc", {"method": "reload_weights",
                                                       "kwargs": {"weights_path": target}})
            self._request("POST", "/reset_prefix_cache")
            shutil.rmtree(os.path.join(self.weights_path, f"sync-{self._syncs - 1}"), ignore_errors=True)
        return count

    # ---------------------------------------------------------------------------------- interface
    def generate(self, prompts: list, num_generations: int = 1, greedy: bool = False,
                 max_new_tokens: int = None, weights=None) -> list:
        """Completion ids per prompt x completion (prompt 0's first), cut after the first stop token.
        ``weights``: buckets of (checkpoint name, full tensor) synced to the server first.
        Collective: every rank calls it, each with its own prompts (possibly none)."""
        if weights is not None:
            self._sync_weights(weights)
        everyone = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(everyone, [list(p) for p in prompts])
        else:
            everyone = [[list(p) for p in prompts]]
        results = [None] * self.world
        if self.rank == 0:
            flat = [p for ps in everyone for p in ps]
            completions = self._complete(flat, num_generations, greedy, max_new_tokens) if flat else []
            start = 0
            for r, ps in enumerate(everyone):
                n = len(ps) * num_generations
                results[r] = completions[start:start + n]
                start += n
        if self.world > 1:
            mine = [None]
            dist.scatter_object_list(mine, results if self.rank == 0 else None, src=0)
            return mine[0]
        return results[0]

    def _complete(self, prompts: list, n: int, greedy: bool, max_new_tokens) -> list:
        self._requests += 1
        # no per-request seed: one seed would be shared by every prompt of the batch (correlated completions)
        body = dict(model=self.model, prompt=prompts, return_token_ids=True,
                    **sampling_kwargs(n=n, greedy=greedy, max_tokens=max_new_tokens or self.max_new_tokens,
                                      stop_token_ids=self.stop_ids, **self.sampling))
        choices = sorted(self._request("POST", "/v1/completions", body)["choices"], key=lambda c: c["index"])
        if len(choices) != len(prompts) * n:
            raise RuntimeError(f"vLLM server returned {len(choices)} completions for {len(prompts)} prompts x {n}")
        stop = set(self.stop_ids)
        return [cut_after_stop(c["token_ids"], stop) for c in choices]
