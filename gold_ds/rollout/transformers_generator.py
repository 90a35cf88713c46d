"""Generation with transformers ``generate``: on a ZeRO-3 partitioned model, or on a plain copy of
the student's weights.

``TransformersGenerator`` generates with the model it is given. Under ZeRO-3 every forward pass
gathers parameters collectively, so all ranks must run the same number of forward passes:
``synced_gpus=True`` keeps ranks that have finished stepping until the last rank is done (without
it, ranks whose samples end at different lengths crash or hang). transformers only turns it on by
itself while an ``HfDeepSpeedConfig`` is alive, so it is passed explicitly here.

``StudentCopyGenerator`` (``rollout.student_copy``) generates with a plain, unpartitioned copy of
the student on every rank, loaded from the gathered ZeRO-3 weights before a rollout (the
``WeightSyncedRollout`` cadence, as vLLM's): one gather of the weights per rollout instead of one
per layer per generated token, and no collective while generating, so each rank stops when its own
samples end. It costs one full copy of the student's weights per rank.

Vision-language prompts: a prompt may be an id list that also has ``model_inputs()`` (a
``gold_ds.data.vlm.MultimodalPrompt``: its ids with the image tokens expanded, and its raw images).
``model_inputs()`` returns ``(per_token, stacked)``: per-token lists left-padded like the ids (e.g.
``mm_token_type_ids``) and tensors concatenated over the batch on dim 0 (``pixel_values``,
``image_grid_thw``). Such prompts are generated ``multimodal_chunk`` at a time (None: all at once),
so that only one chunk's pixel tensors exist at any time; every rank has the same number of prompts,
hence of chunks.
"""
import torch
import torch.distributed as dist

from .base import Rollout, WeightSyncedRollout


def left_padded(prompts: list, pad_id: int) -> dict:
    """Left-padded prompts for generation."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        attn[b, T - len(p):] = 1
    return {"input_ids": ids, "attention_mask": attn}


class TransformersGenerator(Rollout):
    """Generates with the model itself (the ZeRO-3 engine's module): its weights are always the
    current ones, so ``sample`` never syncs."""

    def __init__(self, module, tokenizer, *, device, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, multimodal_chunk: int = None, suppress_tokens=None,
                 synced: bool = True):
        """``synced``: the model is partitioned (ZeRO-3), so ranks generate in lock-step (see the module
        docstring); a plain model on every rank generates unsynced. ``multimodal_chunk``:
        vision-language prompts per ``generate`` call of the model (None: all;
        see the module docstring). ``suppress_tokens``: token ids never sampled (vision-language
        models: image placeholder tokens, which only a processor may place)."""
        self.module, self.device = module, device  # the device the model computes on (params may be offloaded)
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        self.max_new_tokens = max_new_tokens
        self.sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
        self.multimodal_chunk, self.suppress_tokens = multimodal_chunk, suppress_tokens
        self.synced = synced

    @torch.no_grad()
    def generate(self, prompts: list, num_generations: int = 1, greedy: bool = False,
                 max_new_tokens: int = None) -> list:
        """Completion ids per prompt x completion (cut after the first EOS; a completion that reaches
        the token limit ends without EOS). Collective under ZeRO-3: all ranks call it together, each
        with at least one prompt."""
        if not prompts:
            raise ValueError("generate needs at least one prompt on every rank (ZeRO-3 forward passes are collective)")
        prompts = [p for p in prompts for _ in range(num_generations)]
        # remove_invalid_values: NaN/inf logits (weights gone bad) sample instead of crashing every rank;
        # the loss of such samples is NaN, which the trainer's non-finite guard skips and reports
        kwargs = dict(max_new_tokens=max_new_tokens or self.max_new_tokens, pad_token_id=self.pad_id,
                      eos_token_id=self.eos_id,
                      synced_gpus=self.synced and dist.is_initialized() and dist.get_world_size() > 1,
                      remove_invalid_values=True)
        if self.suppress_tokens:
            kwargs.update(suppress_tokens=list(self.suppress_tokens))
        if greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, **self.sampling)
        multimodal = any(hasattr(p, "model_inputs") for p in prompts)
        chunk = (self.multimodal_chunk if multimodal else None) or len(prompts)
        was_training = self.module.training
        self.module.eval()
        completions = []
        for i in range(0, len(prompts), chunk):
            part = prompts[i:i + chunk]
            batch = {k: v.to(self.device) for k, v in left_padded(part, self.pad_id).items()}
            if multimodal:
                batch.update({k: v.to(self.device) for k, v in _multimodal_inputs(part, batch["input_ids"].shape[1]).items()})
            width = batch["input_ids"].shape[1]
            out = self.module.generate(**batch, **kwargs)
            del batch  # this chunk's pixel tensors
            for row in out[:, width:].tolist():
                if self.eos_id in row:  # everything after the first EOS is padding
                    row = row[:row.index(self.eos_id) + 1]
                completions.append(row)
        self.module.train(was_training)
        return completions


class StudentCopyGenerator(WeightSyncedRollout):
    """Generates with ``model``, a plain copy of the student's architecture on this rank, whose
    weights ``sample`` refreshes from the student's ZeRO-3 partitions (see the module docstring).
    ``make_model()`` builds the copy at the first sync, so a run without on-policy micro-steps never
    holds one. ``sampling``: ``TransformersGenerator``'s keyword arguments. Which ranks call it: every
    rank calls ``sample`` in the same steps (the weight gather is collective); ``generate`` itself is
    local."""

    def __init__(self, make_model, tokenizer, *, device, sync_every: int, bucket_bytes: int, **sampling):
        super().__init__(sync_every, bucket_bytes)
        self.model = self.generator = None
        self._make = lambda: TransformersGenerator(make_model().requires_grad_(False), tokenizer, device=device,
                                                   synced=False, **sampling)

    @torch.no_grad()
    def generate(self, prompts: list, num_generations: int = 1, greedy: bool = False, max_new_tokens: int = None,
                 weights=None) -> list:
        if weights is not None:
            if self.generator is None:
                self.generator = self._make()
                self.model = self.generator.module
            self._sync_weights(weights)
        if not self.has_weights:
            raise RuntimeError("the student copy has no weights yet: its first rollout must come with them")
        return self.generator.generate(prompts, num_generations, greedy, max_new_tokens)

    @torch.no_grad()
    def _load_weights(self, weights) -> int:
        params = dict(self.model.named_parameters())
        loaded = set()
        for bucket in weights:
            for name, tensor in bucket:
                if name not in params:
                    raise KeyError(f"the student's weight {name!r} has no place in its copy for generation")
                params[name].copy_(tensor)
                loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise KeyError(f"the student's weights left {len(missing)} tensors of its copy unset, e.g. {missing[:3]}")
        return len(loaded)


def _multimodal_inputs(prompts: list, width: int) -> dict:
    """The extra model inputs of left-padded multimodal prompts (see the module docstring); a prompt's
    inputs are computed once even when it repeats (num_generations)."""
    cache, per_token, stacked = {}, {}, {}
    for p in prompts:
        if id(p) not in cache:
            cache[id(p)] = p.model_inputs() if hasattr(p, "model_inputs") else ({}, {})
        tokens, tensors = cache[id(p)]
        for k, v in tokens.items():
            per_token.setdefault(k, []).append([0] * (width - len(v)) + list(v))
        for k, v in tensors.items():
            stacked.setdefault(k, []).append(v)
    out = {k: torch.tensor(v, dtype=torch.long) for k, v in per_token.items()}
    out.update({k: torch.cat(v) for k, v in stacked.items()})
    return out
