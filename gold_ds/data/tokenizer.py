"""Loading a model's tokenizer."""


def load_tokenizer(model_cfg):
    """A text model's tokenizer: a hub id / local dir, or ``builtin:<task>`` trained locally
    (vision-language models use their processor's: ``gold_ds.data.vlm.load_processor``)."""
    name = model_cfg.tokenizer or model_cfg.name_or_path
    if name.startswith("builtin:"):
        from .builtin import builtin_tokenizer
        tok = builtin_tokenizer(name[len("builtin:"):])
    else:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=model_cfg.trust_remote_code)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer {name!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok
