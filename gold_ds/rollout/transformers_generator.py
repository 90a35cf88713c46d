"""Generation with transformers ``generate`` on a (ZeRO-3 partitioned) model.

Under ZeRO-3 every forward pass gathers parameters collectively, so all ranks must run the same
number of forward passes: ``synced_gpus=True`` keeps ranks that have finished stepping until the
last rank is done (without it, ranks whose samples end at different lengths crash or hang).
transformers only turns it on by itself while an ``HfDeepSpeedConfig`` is alive, so it is passed
explicitly here.
"""
import torch
import torch.distributed as dist


def left_padded(prompts: list, pad_id: int) -> dict:
    """Left-padded prompts for generation."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        attn[b, T - len(p):] = 1
    return {"input_ids": ids, "attention_mask": attn}


class TransformersGenerator:
    def __init__(self, module, tokenizer, *, device, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0):
        self.module, self.device = module, device  # the device the model computes on (params may be offloaded)
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        self.max_new_tokens = max_new_tokens
        self.sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k}

    @torch.no_grad()
    def generate(self, prompts: list, num_generations: int = 1, greedy: bool = False,
                 max_new_tokens: int = None) -> list:
        """Completion ids per prompt x sample (cut after the first EOS; a sample that reaches the
        token limit ends without EOS). Collective under ZeRO-3: all ranks call it together, each
        with at least one prompt."""
        if not prompts:
            raise ValueError("generate needs at least one prompt on every rank (ZeRO-3 forward passes are collective)")
        prompts = [p for p in prompts for _ in range(num_generations)]
        batch = {k: v.to(self.device) for k, v in left_padded(prompts, self.pad_id).items()}
        kwargs = dict(max_new_tokens=max_new_tokens or self.max_new_tokens, pad_token_id=self.pad_id,
                      eos_token_id=self.eos_id, synced_gpus=dist.is_initialized() and dist.get_world_size() > 1)
        if greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, **self.sampling)
        was_training = self.module.training
        self.module.eval()
        out = self.module.generate(**batch, **kwargs)
        self.module.train(was_training)
        completions = []
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            if self.eos_id in row:  # everything after the first EOS is padding
                row = row[:row.index(self.eos_id) + 1]
            completions.append(row)
        return completions
