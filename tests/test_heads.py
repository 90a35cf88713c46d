"""distill.logits=sharded in training: the loss and the full gradient of a micro-step equal the
``full`` path's and an fp64 reference's (2 and 3 ZeRO-3 gloo ranks, one rank with zero completion
rows), for jsd, uld and hybrid_uld, tied and untied heads, a head bias, softcapping, Cohere's and
Granite's logit scales, a model vocabulary padded beyond the tokenizer (ZeRO-3 partitions off row
boundaries), and one vision-language pair (on 2 ranks also with a LoRA student whose head trains as
peft's modules_to_save copy: the gradient of every parameter that trains); and a sharded step never calls a head module nor
allocates more than a chunk of rows as wide as the full vocabulary."""
import copy
import dataclasses
import json
import os

import pytest
import torch
import torch.distributed as dist

import reference_losses as ref
from conftest import assert_close, ds_section, llama_config, run_ranks, tiny_raw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5  # relative to the largest |value| of each compared tensor


def _phi(vocab, hidden=32):
    return {"model_type": "phi", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 64,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False}


def _gemma2(vocab, hidden=32, softcap=3.0):
    return {"model_type": "gemma2", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
            "max_position_embeddings": 64, "final_logit_softcapping": softcap, "sliding_window": 16,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": True}


def _cohere(vocab, hidden=32):
    return dict(llama_config(hidden, vocab=vocab), model_type="cohere", logit_scale=0.5, tie_word_embeddings=True)


def _granite(vocab, hidden=64):
    return dict(llama_config(hidden, vocab=vocab), model_type="granite", logits_scaling=4.0)


def _tied(config):
    return dict(config, tie_word_embeddings=True)


def _text_case(tmp, student, teacher, **distill):
    raw = tiny_raw(tmp, micro=3, ga=1)
    raw["student"]["model"]["config"] = student
    raw["teacher"]["model"]["config"] = teacher
    raw["distill"] = {"beta": 0.3, "temperature": 1.3, "ce_weight": 0.3, "divergence_weight": 1.5, **distill}
    if distill.get("loss", "jsd") != "jsd":
        raw["student"]["model"]["tokenizer"] = "builtin:arithmetic-unigram"
        raw["distill"]["teacher_temperature"] = 0.8
    return raw


def _vlm_case(tmp):
    from gold_ds.data.vlm_tasks import shapes_rows
    raw = json.load(open(os.path.join(REPO, "ds_configs", "vlm-cross-family-uld.json")))
    raw.update(output_dir=tmp, max_steps=1)
    raw["student"]["deepspeed"] = ds_section(2, 1)
    raw["teacher"]["sft"]["max_steps"] = 0
    os.makedirs(tmp, exist_ok=True)
    path = os.path.join(tmp, "shapes.jsonl")
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            for i, row in enumerate(shapes_rows(6, 5)):
                row["images"][0].save(os.path.join(tmp, f"img{i}.png"))
                f.write(json.dumps({**row, "images": [os.path.join(tmp, f"img{i}.png")]}) + "\n")
    dist.barrier()
    raw["data"] = {"train": {"path": path}, "max_prompt_length": 64, "max_completion_length": 10}
    raw["distill"].update(ce_weight=0.2, temperature=1.2)
    raw["export"]["enabled"] = False
    raw["logging"]["progress_bar"] = False
    return raw


def _lora_vlm_case(tmp):
    """The vision-language pair with a LoRA student: adapters on the language model, the head trained
    fully as peft's ``modules_to_save`` copy."""
    raw = _vlm_case(tmp)
    raw["student"]["lora"] = {"rank": 4, "alpha": 8.0, "modules_to_save": ["lm_head"]}
    return raw


def _cases(tmp, world):
    """(name, raw preset or a function of a directory): every head feature and loss at least once."""
    unigram = 299  # builtin:arithmetic-unigram's vocabulary; arithmetic's is 274
    lora = [("vlm-hybrid_uld-lora", _lora_vlm_case)] if world == 2 else []
    return [
        ("jsd-untied", _text_case(f"{tmp}/a", llama_config(32), llama_config(64))),
        # phi: a head bias; gemma2: softcapping and a tied head; 301 > 274: a padded model vocabulary
        ("jsd-bias-padded", _text_case(f"{tmp}/b", _phi(301), _gemma2(274, 64))),
        ("jsd-softcap-tied", _text_case(f"{tmp}/c", _gemma2(274), _tied(llama_config(64, vocab=290)))),
        # Cohere multiplies its logits by logit_scale, Granite divides them by logits_scaling
        ("jsd-logit-scales", _text_case(f"{tmp}/f", _cohere(274), _granite(274))),
        ("uld", _text_case(f"{tmp}/d", llama_config(32, vocab=unigram), llama_config(64), loss="uld")),
        ("hybrid_uld-tied-padded", _text_case(f"{tmp}/e", _tied(llama_config(32, vocab=unigram + 5)),
                                              _phi(274, 64), loss="hybrid_uld")),
        ("vlm-hybrid_uld", _vlm_case),
    ] + lora


def _plain(model_cfg, state, lora=None):
    """The engine's model as a plain fp64 module with the engine's weights (with ``lora``: the same
    peft adapter)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from gold_ds.engine.lora import apply_lora
    kw = copy.deepcopy(model_cfg.config)
    config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    auto = AutoModelForImageTextToText if model_cfg.processor else AutoModelForCausalLM
    model = auto.from_config(config)
    if lora is not None:
        model = apply_lora(model, lora, 0)
    missing, unexpected = model.load_state_dict({k: v.double() for k, v in state.items()}, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)  # tied heads
    model.tie_weights()
    return model.double().eval()


def _inputs(batch):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items() if k != "loss_mask"}


def _reference_loss(distill, asm, mb, student, teacher, matched):
    """The micro-step's summed loss in fp64 from the plain models (formulas of objective.py, with
    the plain references of reference_losses)."""
    s_logits = student(**_inputs(mb.student)).logits
    with torch.no_grad():
        t_logits = teacher(**_inputs(mb.teacher)).logits
    if not distill.cross_tokenizer:
        v = len(asm.student.tokenizer)
        mask = mb.student["loss_mask"]
        s, t = s_logits[:, :-1][mask][:, :v], t_logits[:, :-1][mask][:, :v]
        tokens = mb.student["input_ids"][:, 1:][mask]
        nll = -torch.log_softmax(s, -1).gather(1, tokens[:, None]).sum()
        return (distill.divergence_weight * ref.generalized_jsd(s, t, distill.beta, distill.temperature, reduction="sum")
                + distill.ce_weight * nll)
    a, tt = mb.alignment, distill.teacher_temperature or distill.temperature

    def side(logits, rows, tokens, start, end, vocab, temperature):
        z = logits[rows[:, 0], rows[:, 1], :vocab]
        logp = torch.log_softmax(z / temperature, -1).gather(1, tokens[:, None]).squeeze(1)
        scale = torch.stack([logp[s + 1:e].sum() for s, e in zip(start.tolist(), end.tolist())]) if len(start) \
            else logp.new_zeros(0)
        return z, z[start], scale

    s_rows, s_first, s_scale = side(s_logits, a.student_rows, a.student_tokens, a.student_start, a.student_end,
                                    len(asm.student.tokenizer), distill.temperature)
    _, t_first, t_scale = side(t_logits, a.teacher_rows, a.teacher_tokens, a.teacher_start, a.teacher_end,
                               len(asm.teacher.tokenizer), tt)
    kw = dict(student_temperature=distill.temperature, teacher_temperature=tt, student_log_scale=s_scale,
              teacher_log_scale=t_scale, reduction="sum")
    if distill.loss == "uld":
        div = ref.uld(s_first, t_first, **kw)
    else:
        div = ref.hybrid_uld(s_first, t_first, matched[0].cpu(), matched[1].cpu(), beta=distill.beta, **kw)
    counted = mb.student["loss_mask"][a.student_rows[:, 0], a.student_rows[:, 1]]
    nll = -torch.log_softmax(s_rows[counted], -1).gather(1, a.student_tokens[counted][:, None]).sum()
    return distill.divergence_weight * div + distill.ce_weight * nll


CHUNK = 4  # rows per kernel chunk in the fused losses here (their default would cover a whole micro-step)


class _WideTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape of every op output with more than CHUNK rows of a full vocabulary (one of
    the sizes ``vocabs``: the tokenizers' and the models' own) as its last dimension."""

    def __init__(self, vocabs):
        super().__init__()
        self.vocabs, self.seen = set(vocabs), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] in self.vocabs \
                    and t.shape[:-1].numel() > CHUNK:
                self.seen.append(tuple(t.shape))
        return out


def _worker(tmp):
    from deepspeed.utils import safe_get_full_grad
    from gold_ds.config import load_config
    from gold_ds.data import Sample
    from gold_ds.trainer import build_trainer
    from gold_ds.trainer.collective import global_sum
    from gold_ds.trainer.objective import build_objective
    from gold_ds.engine.heads import head_spec
    from gold_ds.losses import _base, linear
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # a few rows per head chunk, at most CHUNK per kernel sub-chunk (the smallest vocabulary below: 274)
    linear.LINEAR_CHUNK_BYTES = 4 * 2 * CHUNK * 333
    _base.CHUNK_BYTES = 4 * CHUNK * 274
    for name, raw in _cases(tmp, world):
        if callable(raw):
            raw = raw(f"{tmp}/{name}")
        cfg = load_config(raw=raw)
        tr = build_trainer(cfg)
        sharded, full = (build_objective(dataclasses.replace(cfg.distill, logits=mode), tr.student, tr.teacher,
                                         tr.assembler, lambda _: None) for mode in ("sharded", "full"))
        rows = tr.train_data
        samples = [Sample(r.prompt_ids, r.completion_ids, r.example)
                   for r in (rows[(rank * 3 + i) % len(rows)] for i in range(2 + rank % 2))]
        counted = 0 if rank == world - 1 else None  # the last rank has no completion rows at all
        params = [(n, p) for n, p in tr.student.module.named_parameters() if p.requires_grad]
        heads = [head_spec(m, "").module for m in (tr.student.module, tr.teacher.module)]  # peft: the trained copy
        got = {}
        for mode, objective in (("full", full), ("sharded", sharded)):
            calls = []
            hooks = [h.register_forward_pre_hook(lambda *_: calls.append(1)) for h in heads]
            probe = _WideTensors([len(tr.assembler.student.tokenizer), len(tr.assembler.teacher.tokenizer)]
                                 + [h.weight.ds_shape[0] for h in heads])
            mb = tr.assembler.assemble(samples, counted=counted)
            with probe:
                loss, share = objective.loss(mb, objective.teacher_targets([mb])[0])
                tr.student.backward(loss * world, scale_wrt_gas=False)  # DeepSpeed averages: the sum's gradient
            for h in hooks:
                h.remove()
            if mode == "sharded":
                assert not calls, f"{name}: a head module ran in a sharded micro-step"
                assert not probe.seen, f"{name}: sharded, more than {CHUNK} rows of the vocabulary: {probe.seen[:5]}"
            else:
                assert calls and probe.seen  # the probes can fail: the full path trips both
            got[mode] = (global_sum([share], tr.student.device)[0],
                         {n: safe_get_full_grad(p).double().clone() for n, p in params})
            tr.student.optimizer.zero_grad()  # the next backward starts afresh (no accumulation)
        everyone = [None] * world
        dist.all_gather_object(everyone, (samples, counted))
        s_state = tr.student._zero3_consolidated_16bit_state_dict()
        t_state = tr.teacher._zero3_consolidated_16bit_state_dict()
        if rank == 0:
            student, teacher = _plain(cfg.student.model, s_state, cfg.student.lora), _plain(cfg.teacher.model, t_state)
            matched = tr.assembler.matched_vocabulary()[:2] if cfg.distill.loss == "hybrid_uld" else None
            total = sum(_reference_loss(cfg.distill, tr.assembler, tr.assembler.assemble(s, counted=c), student,
                                        teacher, matched) for s, c in everyone)
            total.backward()
            want = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in student.named_parameters()
                    if p.requires_grad}
            floor = max(g.abs().max().item() for g in want.values())
            for mode in ("full", "sharded"):
                loss, grads = got[mode]
                assert_close(torch.tensor(loss, dtype=torch.float64), total.detach(), f"{name} {mode} loss", TOL)
                for n, _ in params:
                    assert_close(grads[n], want[n], f"{name} {mode} grad {n}", TOL, floor)
                    assert_close(grads[n], got["full"][1][n], f"{name} {mode} grad {n} vs full", TOL, floor)
        tr.student.destroy()
        tr.teacher.destroy()
        dist.barrier()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_heads_match_full_and_fp64(world, tmp_path):
    run_ranks(_worker, world, str(tmp_path), err_dir=str(tmp_path / "errors"))


def test_unknown_head_is_refused_naming_the_model_and_the_fallback():
    from transformers import GPT2Config, GPT2LMHeadModel
    from gold_ds.config import ConfigError
    from gold_ds.engine.heads import head_spec
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(ConfigError, match=r"teacher model \(GPT2LMHeadModel, model_type 'gpt2'\).*distill.logits=full"):
        head_spec(model, "teacher")
    llama = __import__("conftest").plain_model(llama_config(16, vocab=50), dtype="float32")
    llama.lm_head = torch.nn.Sequential(llama.lm_head)  # a head that is not a plain Linear
    with pytest.raises(ConfigError, match=r"student model's output head is a Sequential.*distill.logits=full"):
        head_spec(llama, "student")
