"""Output heads applied by the loss (``distill.logits=sharded``): a model's final hidden states, and
each rank's vocabulary slice of its head, read from the ZeRO-3 partition it already holds.

The fact this rests on (DeepSpeed 0.19.8, checked by tests/test_heads.py): ZeRO-3 flattens a
``[V, H]`` weight, pads it to a multiple of the world size W and gives rank r the flat range
``[r * P, (r + 1) * P)``, P = ceil(V * H / W). When W divides V that range is exactly rows
``[r * V / W, (r + 1) * V / W)``: a vocabulary slice, so no rank gathers the head and nothing
moves. Otherwise rank r takes the rows that *start* in its range, ``[ceil(r P / H), ceil((r + 1)
P / H))``, and the tail of its last row (fewer than H values) comes from rank r + 1. Rows past the
tokenizer's vocabulary (a padded model vocabulary) are dropped. Under jsd the teacher takes the
student's rows (one vocabulary), wherever its own partitions fall. Any values a rank needs from
another's partition move in one all_to_all per micro-step (``_fetch_rows``); a bias is a [V]
parameter handled the same way.

Gradient: the slice is an autograd view of the parameter. Its backward hands DeepSpeed a
full-shape gradient that is zero outside the slice, so DeepSpeed's own reduce-scatter and
optimizer run unchanged (a tied embedding's gradient adds to it as usual).

Which ranks call what: ``HeadSlice.weight``/``bias`` and ``final_hidden_states`` are called by every
rank of the engine (collectives).
"""
import dataclasses

import torch
import torch.distributed as dist

from ..config import ConfigError
from .lora import transformers_model

# model_type -> how the CausalLM forward turns the head's output into logits (transformers 5.19):
# "plain" (lm_head only), "softcap" (final_logit_softcapping), "scale" (logits * logit_scale),
# "divide" (logits / logits_scaling). A model outside this table is refused under sharded logits.
HEAD_FORMS = {
    **dict.fromkeys(["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "phi",
                     "phi3", "olmo2", "smollm3", "starcoder2", "gpt_neox", "llava", "qwen2_vl", "qwen2_5_vl",
                     "idefics3", "smolvlm"], "plain"),
    **dict.fromkeys(["gemma2", "gemma3", "gemma3_text"], "softcap"),
    **dict.fromkeys(["cohere", "cohere2"], "scale"),
    "granite": "divide",
}


class UnsupportedHead(ConfigError):
    """A head ``distill.logits=sharded`` cannot apply (the message names the model and the fallback)."""


@dataclasses.dataclass
class HeadSpec:
    """What the loss needs of a model's output head: the ``nn.Linear`` and its logit transform."""
    module: torch.nn.Linear
    logit_scale: float
    softcap: float | None

    def options(self, prefix: str) -> dict:
        return {f"{prefix}logit_scale": self.logit_scale, f"{prefix}softcap": self.softcap}


def head_spec(model, who: str) -> HeadSpec:
    """The output head of a transformers causal LM or image-text-to-text model, or UnsupportedHead
    naming the model (``who``: "student" or "teacher") and the fallback."""
    model = transformers_model(model)
    model_type = model.config.model_type
    form = HEAD_FORMS.get(model_type)
    head = model.get_output_embeddings()
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):  # peft's trained copy (LoRA)
        head = next(iter(head.modules_to_save.values()))
    fallback = f"set distill.logits=full to compute the {who}'s logits with the model's own forward"
    if form is None:
        raise UnsupportedHead(f"distill.logits=sharded: the {who} model ({type(model).__name__}, model_type "
                              f"{model_type!r}) has an output head gold_ds does not know how to apply; {fallback} "
                              f"(known: {', '.join(sorted(HEAD_FORMS))})")
    if type(head) is not torch.nn.Linear:
        raise UnsupportedHead(f"distill.logits=sharded: the {who} model's output head is a {type(head).__name__}, "
                              f"not a plain Linear layer; {fallback}")
    text = model.config.get_text_config()
    if form == "softcap":
        return HeadSpec(head, 1.0, getattr(text, "final_logit_softcapping", None))
    if form == "scale":
        return HeadSpec(head, float(text.logit_scale), None)
    if form == "divide":
        return HeadSpec(head, 1.0 / float(text.logits_scaling), None)
    return HeadSpec(head, 1.0, None)


def final_hidden_states(engine, inputs: dict) -> torch.Tensor:
    """[B, T, H] hidden states after the final norm, from the engine's forward with the model's
    base (decoder, or vision-language model) in place of the full forward: DeepSpeed's hooks run
    as for any forward, the head is never called."""
    model = engine.module
    base = transformers_model(model).base_model
    model.forward = lambda **kw: base(**kw, use_cache=False).last_hidden_state
    try:
        return engine(**{k: v.to(engine.device) for k, v in inputs.items() if k != "loss_mask"})
    finally:
        del model.forward


def slice_rows(param, vocab: int) -> list:
    """Per rank, its (lo, hi) rows of the ``[V, H]`` weight ``param`` (ZeRO-3 or plain), clipped to
    ``vocab`` (the tokenizer's), in rank order."""
    world = dist.get_world_size()
    if hasattr(param, "ds_tensor"):
        rows, width = param.ds_shape
        size = param.ds_tensor.numel()
        return [(min(vocab, -(-r * size // width)), min(vocab, -(-(r + 1) * size // width))) for r in range(world)]
    return [(r * vocab // world, (r + 1) * vocab // world) for r in range(world)]


class _VocabSlice(torch.autograd.Function):
    """forward(ctx, param, lo, hi, local) -> ``local`` (this rank's rows lo..hi of the weight);
    backward: a full-shape gradient for ``param``, zero outside the rows."""

    @staticmethod
    def forward(ctx, param, lo, hi, local):
        ctx.param, ctx.lo, ctx.hi = param, lo, hi
        return local.view_as(local)

    @staticmethod
    def backward(ctx, grad):
        p = ctx.param
        shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
        full = grad.new_zeros(shape)
        full[ctx.lo:ctx.hi] = grad
        if p.data.numel() == 0:  # ZeRO-3 released it: AccumulateGrad wants the full shape, just for this
            released = p.data
            p.data = full

            def restore(param):
                if param.data.data_ptr() == full.data_ptr():
                    param.data = released
                handle.remove()
            handle = p.register_post_accumulate_grad_hook(restore)  # runs after DeepSpeed's reduce hook
        return full, None, None, None


class HeadSlice:
    """This rank's vocabulary slice of an engine's output head, for the fused losses. ``rows``: every
    rank's (lo, hi), in rank order; default ``slice_rows`` of this head (two heads over one
    vocabulary, as under jsd, pass the same rows)."""

    def __init__(self, engine, spec: HeadSpec, vocab: int, who: str, rows: list = None):
        self.engine, self.spec, self.vocab = engine, spec, vocab
        self.rows = rows if rows is not None else slice_rows(spec.module.weight, vocab)
        self.lo, self.hi = self.rows[dist.get_rank()]
        if any(hi <= lo for lo, hi in self.rows):
            raise UnsupportedHead(f"distill.logits=sharded: the {who}'s vocabulary ({vocab} tokens) leaves a rank "
                                  f"with no rows of its head ({self.rows}); use fewer ranks or distill.logits=full")

    def weight(self) -> torch.Tensor:
        """[hi - lo, H]: this rank's rows, differentiable into the parameter when it trains."""
        return self._slice(self.spec.module.weight)

    def bias(self):
        b = self.spec.module.bias
        return None if b is None else self._slice(b)

    def _slice(self, param):
        if not hasattr(param, "ds_tensor"):  # not partitioned: autograd slices it
            return param[self.lo:self.hi]
        local = _fetch_rows(param, self.rows, self.engine.device)
        if not param.requires_grad or not torch.is_grad_enabled():
            return local
        saved = param.data  # the autograd input must have the full shape (a stride-0 view: no memory)
        param.data = torch.zeros((), dtype=saved.dtype, device=saved.device).expand(param.ds_shape)
        try:
            return _VocabSlice.apply(param, self.lo, self.hi, local)
        finally:
            param.data = saved


def _overlap(a, b):
    return max(a[0], b[0]), min(a[1], b[1])


def _fetch_rows(param, rows: list, device) -> torch.Tensor:
    """This rank's rows ``rows[rank]`` of a ZeRO-3 parameter ([V, H] or [V]), from the partitions
    that hold them: a local copy when every rank's rows lie in its own partition, else one
    all_to_all moving only the values outside it (called by every rank, with the same ``rows``)."""
    flat = param.ds_tensor.reshape(-1)
    size, width = flat.numel(), (param.ds_shape[1] if len(param.ds_shape) == 2 else 1)
    world, rank = dist.get_world_size(), dist.get_rank()
    held = [(q * size, min((q + 1) * size, param.ds_numel)) for q in range(world)]
    need = [(lo * width, hi * width) for lo, hi in rows]
    lo, hi = rows[rank]
    shape = (hi - lo, width) if len(param.ds_shape) == 2 else (hi - lo,)
    if all(h[0] <= n[0] and n[1] <= h[1] for h, n in zip(held, need)):
        return flat[need[rank][0] - held[rank][0]:need[rank][1] - held[rank][0]].view(shape).to(device)
    send = [_overlap(held[rank], n) for n in need]
    recv = [_overlap(h, need[rank]) for h in held]
    send_sizes = [max(0, b - a) for a, b in send]
    recv_sizes = [max(0, b - a) for a, b in recv]
    parts = [flat[a - held[rank][0]:a - held[rank][0] + n] for (a, _), n in zip(send, send_sizes)]
    out = torch.empty(sum(recv_sizes), dtype=flat.dtype, device=device)
    dist.all_to_all_single(out, torch.cat(parts).to(device), recv_sizes, send_sizes)
    return out.view(shape)
