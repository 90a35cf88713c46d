"""Loading a model's tokenizer."""
from ..config import ConfigError, missing_local_path


def tokenizer_key(model_cfg, key: str) -> str:
    """The config key the tokenizer of model section ``key`` comes from."""
    return f"{key}.tokenizer" if model_cfg.tokenizer else f"{key}.name_or_path"


def load_tokenizer(model_cfg, key: str = "student.model"):
    """A text model's tokenizer: a hub id / local dir, or ``builtin:<task>`` trained locally
    (vision-language models use their processor's: ``gold_ds.data.vlm.load_processor``). ``key``:
    the model's config section, named when the tokenizer cannot be loaded."""
    name, where = model_cfg.tokenizer or model_cfg.name_or_path, tokenizer_key(model_cfg, key)
    if name.startswith("builtin:"):
        from .builtin import builtin_tokenizer
        tok = builtin_tokenizer(name[len("builtin:"):])
    else:
        from transformers import AutoTokenizer
        try:
            if missing_local_path(name):
                raise FileNotFoundError(name)
            tok = AutoTokenizer.from_pretrained(name, trust_remote_code=model_cfg.trust_remote_code)
        except Exception as e:  # noqa: BLE001 - not found, no tokenizer files, offline: name the key
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            what = "no such directory" if missing_local_path(name) else f"{type(e).__name__}: {first}"
            raise ConfigError(f"config key '{where}': cannot load a tokenizer from {name!r} ({what}); give a local "
                              "directory with tokenizer files (tokenizer.json or tokenizer.model, "
                              "tokenizer_config.json) or a hub id") from e
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer {name!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok
