"""The vLLM rollout settings: every invalid value fails at start-up naming key, value and what is
valid; a vLLM backend without vllm installed fails with the install command (runs without vllm)."""
import builtins
import sys

import pytest

from conftest import tiny_raw
from gold_ds.config import ConfigError, load_config, validate_world


@pytest.mark.parametrize("override,words", [
    ("rollout.backend=vllm", ["rollout.backend", "'vllm_colocate'", "'vllm_server'"]),
    ("rollout.colocate.sleep_level=3", ["rollout.colocate.sleep_level", "3", "0 (never sleep)"]),
    ("rollout.colocate.gpu_memory_utilization=1.5", ["rollout.colocate.gpu_memory_utilization", "(0, 1]"]),
    ("rollout.colocate.tensor_parallel_size=0", ["rollout.colocate.tensor_parallel_size", "positive"]),
    ("rollout.colocate.max_model_len=16", ["rollout.colocate.max_model_len", "16", "36"]),
    ("rollout.colocate.kv_cache_memory_bytes=-1", ["rollout.colocate.kv_cache_memory_bytes"]),
    ("rollout.sync_every=0", ["rollout.sync_every", "positive"]),
    ("rollout.sync_bucket_mb=0", ["rollout.sync_bucket_mb"]),
    ("rollout.stop_token_ids=[1,-2]", ["rollout.stop_token_ids", "token ids"]),
    ("rollout.server.url=localhost:8000", ["rollout.server.url", "http://"]),
    ("rollout.server.timeout_s=0", ["rollout.server.timeout_s"]),
    ("rollout.colocate.unknown=1", ["rollout.colocate.unknown", "sleep_level"]),
])
def test_invalid_vllm_values(tmp_path, override, words):
    with pytest.raises(ConfigError) as e:
        load_config(raw=tiny_raw(tmp_path), overrides=[override])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_sleep_level_2_needs_sync_every_step(tmp_path):
    with pytest.raises(ConfigError, match="rollout.sync_every.*sleep_level 2"):
        load_config(raw=tiny_raw(tmp_path), overrides=["rollout.colocate.sleep_level=2", "rollout.sync_every=2"])
    cfg = load_config(raw=tiny_raw(tmp_path), overrides=["rollout.colocate.sleep_level=2"])
    assert cfg.rollout.colocate.sleep_level == 2 and cfg.rollout.sync_every == 1


def test_tensor_parallel_divides_world(tmp_path):
    cfg = load_config(raw=tiny_raw(tmp_path), overrides=["rollout.colocate.tensor_parallel_size=2"])
    validate_world(cfg, 4)  # the transformers backend ignores it
    cfg.rollout.backend = "vllm_colocate"
    validate_world(cfg, 4)
    with pytest.raises(ConfigError, match="rollout.colocate.tensor_parallel_size.*divide the number of ranks \\(3\\)"):
        validate_world(cfg, 3)


def test_missing_vllm_names_the_extra(tmp_path, monkeypatch):
    """Without vllm: the preset fails at load naming the extra; the generator's import too."""
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    for backend in ("vllm_colocate", "vllm_server"):
        with pytest.raises(ConfigError) as e:
            load_config(raw=tiny_raw(tmp_path), overrides=[f"rollout.backend={backend}"])
        assert 'pip install -e ".[vllm]"' in str(e.value) and "torchvision" in str(e.value)

    from gold_ds.rollout.vllm_common import import_vllm
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[vllm\]"'):
        import_vllm()
    real_import = builtins.__import__

    def broken(name, *a, **k):  # a CUDA torchvision against a CPU torch fails at import like this
        if name == "vllm":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *a, **k)
    monkeypatch.delitem(sys.modules, "vllm")
    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(ImportError, match="torchvision::nms.*torchvision torchaudio torchcodec"):
        import_vllm()


def test_gold_ds_imports_without_vllm():
    """vllm is imported only when a vLLM backend is built (a fresh interpreter that cannot import it)."""
    import subprocess
    code = ("import sys; sys.modules['vllm'] = None\n"
            "import gold_ds, gold_ds.config, gold_ds.rollout, gold_ds.engine, gold_ds.engine.weights\n"
            "import gold_ds.rollout.vllm_colocate, gold_ds.rollout.vllm_server, gold_ds.rollout.factory\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]
