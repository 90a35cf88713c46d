"""The run config: presets load, overrides apply, and every invalid value fails at start with a
message naming the key, the value and what is valid."""
import glob
import json
import os

import pytest

from conftest import REPO, tiny_raw
from gold_ds.config import ConfigError, load_config, validate_world


def test_every_preset_loads():
    presets = glob.glob(os.path.join(REPO, "ds_configs", "*.json"))
    assert presets
    for path in presets:
        cfg = load_config(path)
        assert cfg.student.deepspeed["zero_optimization"]["stage"] == 3


def test_overrides_reach_any_key(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(tiny_raw(tmp_path)))
    cfg = load_config(str(path), ["distill.beta=0.25", "max_steps=7", "name=abc",
                                  "student.deepspeed.optimizer.params.lr=0.5",
                                  "teacher.deepspeed.zero_optimization.offload_param={\"device\": \"cpu\"}",
                                  "data.eval={\"builtin\": \"arithmetic\", \"split\": \"eval\"}"])
    assert cfg.distill.beta == 0.25 and cfg.max_steps == 7 and cfg.name == "abc"
    assert cfg.student.deepspeed["optimizer"]["params"]["lr"] == 0.5
    assert cfg.teacher.deepspeed["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert cfg.data.eval.split == "eval"
    assert json.loads(path.read_text())["distill"]["beta"] == 0.5  # the preset file is untouched


def _error(tmp_path, overrides=(), mutate=None):
    raw = tiny_raw(tmp_path)
    if mutate:
        mutate(raw)
    with pytest.raises(ConfigError) as e:
        load_config(raw=raw, overrides=overrides)
    return str(e.value)


@pytest.mark.parametrize("override, words", [
    ("distill.bta=0.3", ["distill.bta", "unknown", "beta"]),
    ("nonsense=1", ["nonsense", "unknown"]),
    ("distill.beta=\"high\"", ["distill.beta", "'high'", "number"]),
    ("distill.beta=1.5", ["distill.beta", "1.5", "[0, 1]"]),
    ("distill.lmbda=-0.1", ["distill.lmbda", "-0.1", "[0, 1]"]),
    ("distill.temperature=0", ["distill.temperature", "0", "> 0"]),
    ("max_steps=2.5", ["max_steps", "2.5", "integer"]),
    ("distill.seq_kd=1", ["distill.seq_kd", "1", "true or false"]),
    ("distill.loss=\"kl\"", ["distill.loss", "'kl'", "'jsd'"]),
    ("data.on_bad_row=\"skip\"", ["data.on_bad_row", "'skip'", "'report'", "'error'"]),
    ("distill.num_generations=3", ["distill.num_generations", "3", "must divide"]),
    ("student.deepspeed.zero_optimization.stage=2", ["student.deepspeed.zero_optimization.stage", "2", "3"]),
    ("student.deepspeed.train_micro_batch_size_per_gpu=0", ["train_micro_batch_size_per_gpu", "0", "positive"]),
    ("teacher.deepspeed.optimizer={\"type\": \"AdamW\"}", ["teacher.deepspeed.optimizer", "frozen"]),
    ("teacher.deepspeed.zero_optimization.offload_param={\"device\": \"disk\"}", ["offload_param.device", "'disk'", "'nvme'"]),
    ("teacher.deepspeed.zero_optimization.offload_param={\"device\": \"nvme\"}", ["nvme_path", "required"]),
    (["distill.logits=sharded",
      "teacher.deepspeed.zero_optimization.offload_param={\"device\": \"nvme\", \"nvme_path\": \"/tmp\"}"],
     ["offload_param.device", "'nvme'", "distill.logits 'full'"]),
    ("distill.logits=\"dense\"", ["distill.logits", "'dense'", "'sharded'", "'full'"]),
    ("rollout.top_p=0", ["rollout.top_p", "0", "(0, 1]"]),
    ("teacher.forward_micro_steps=0", ["teacher.forward_micro_steps", "0", "positive"]),
    ("checkpoint.keep_last=0", ["checkpoint.keep_last", "0", "positive"]),
    ("student.model.name_or_path=\"x\"", ["student.model.name_or_path", "exactly one"]),
    ("data.train.path=\"x.jsonl\"", ["data.train.path", "exactly one"]),
    ("student=3", ["student", "3", "section"]),
    ("student.deepspeed.optimizer.type=\"AdamWW\"", ["student.deepspeed.optimizer.type", "'AdamWW'", "adamw", "torch.optim"]),
    ("student.deepspeed.optimizer.params.lr=-0.001", ["student.deepspeed.optimizer.params.lr", "-0.001", "positive number"]),
    ("student.deepspeed.optimizer.params.lr=\"fast\"", ["student.deepspeed.optimizer.params.lr", "'fast'", "positive number"]),
])
def test_invalid_values_name_key_value_and_fix(tmp_path, override, words):
    msg = _error(tmp_path, override if isinstance(override, list) else [override])
    for w in words:
        assert w in msg, (w, msg)


def test_structural_errors(tmp_path):
    msg = _error(tmp_path, mutate=lambda r: r["student"]["deepspeed"].pop("optimizer"))
    assert "student.deepspeed.optimizer" in msg and "required" in msg
    msg = _error(tmp_path, mutate=lambda r: r["teacher"]["model"].pop("tokenizer"))
    assert "teacher.model.tokenizer" in msg
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(raw=tiny_raw(tmp_path), overrides=["distill.beta"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(str(bad))


def test_world_size_checks(tmp_path):
    raw = tiny_raw(tmp_path, micro=2, ga=2)
    raw["student"]["deepspeed"]["train_batch_size"] = 8
    cfg = load_config(raw=raw)
    validate_world(cfg, 2)
    with pytest.raises(ConfigError, match=r"student.deepspeed.train_batch_size.*= 12 on 3 ranks"):
        validate_world(cfg, 3)


def test_optimizer_names_deepspeed_and_torch(tmp_path):
    """DeepSpeed's names in any case and torch.optim class names are accepted."""
    for name in ("AdamW", "adam", "Lion", "SGD", "RMSprop"):
        cfg = load_config(raw=tiny_raw(tmp_path), overrides=[f"student.deepspeed.optimizer.type=\"{name}\""])
        assert cfg.student.deepspeed["optimizer"]["type"] == name


def test_schedule_length_follows_max_steps(tmp_path):
    raw = tiny_raw(tmp_path, max_steps=40)
    raw["student"]["deepspeed"]["scheduler"] = {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 2}}
    raw["teacher"]["sft"] = {"max_steps": 7, "deepspeed": {**raw["student"]["deepspeed"],
                                                          "scheduler": {"type": "WarmupDecayLR", "params": {}}}}
    cfg = load_config(raw=raw)
    assert cfg.student.deepspeed["scheduler"]["params"] == {"warmup_num_steps": 2, "total_num_steps": 40}
    assert cfg.teacher.sft.deepspeed["scheduler"]["params"] == {"total_num_steps": 7}
    raw["student"]["deepspeed"]["scheduler"]["params"]["total_num_steps"] = 100  # set: kept
    assert load_config(raw=raw).student.deepspeed["scheduler"]["params"]["total_num_steps"] == 100


def test_teacher_forward_micro_steps_one_for_vision_language_models(tmp_path):
    raw = json.load(open(os.path.join(REPO, "ds_configs", "vlm-same-family-jsd.json")))
    raw["teacher"]["forward_micro_steps"] = 2
    with pytest.raises(ConfigError, match=r"teacher.forward_micro_steps.*2.*1 \(or null\) for vision-language"):
        load_config(raw=raw)
    raw["teacher"]["forward_micro_steps"] = 1
    load_config(raw=raw)


def test_logits_auto_by_vocabulary_size_and_offload():
    from gold_ds.config.schema import DistillConfig
    from gold_ds.trainer.objective import SHARDED_FROM_VOCAB, logits_path
    plain, nvme = {}, {"zero_optimization": {"offload_param": {"device": "nvme", "nvme_path": "/x"}}}
    auto = DistillConfig(logits="auto")
    assert SHARDED_FROM_VOCAB == 16384
    assert logits_path(auto, (274, 299), plain, plain)[0] == "full"
    assert logits_path(auto, (274, 16383), plain, plain)[0] == "full"
    assert logits_path(auto, (16384, 274), plain, plain)[0] == "sharded"
    assert logits_path(auto, (32000, 151936), plain, plain)[0] == "sharded"
    assert logits_path(auto, (32000, 151936), plain, nvme) == ("full", "a model's parameters are offloaded to NVMe")
    for fixed in ("full", "sharded"):  # an explicit path is kept whatever the sizes
        assert logits_path(DistillConfig(logits=fixed), (274, 151936), plain, plain)[0] == fixed
