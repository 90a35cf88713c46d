"""Cross-tokenizer distillation in the trainer: teacher inputs in the teacher's own template, the
alignment of a micro-step, and the micro-step loss against an fp64 reference computed here from the
plain formulas (groups from decoded prefixes, merged rows by explicit products, sorted L1 / hybrid).
"""
import collections
import json
import math

import pytest
import torch

from gold_ds.config.schema import DistillConfig
from gold_ds.data.cross_tokenizer import CrossTokenizerAssembler
from gold_ds.data.dataset import Example, Sample
from gold_ds.data.render import TextSide
from gold_ds.data.tasks import arithmetic_rows, train_arithmetic_tokenizer, train_arithmetic_unigram_tokenizer

import reference_losses as ref
from tokenizer_helpers import mistral_v1


def _pairs_tokenizer():
    """A Unigram tokenizer that spells numbers in multi-digit pieces, with a template that puts a
    space between ``[/INST]`` and the answer (the completion's first piece starts with ``▁``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.Unigram())
    meta = dict(replacement="\u2581", prepend_scheme="first")
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Punctuation(behavior="isolated"),
                                                 pre_tokenizers.Metaspace(**meta)])
    tok.decoder = decoders.Metaspace(**meta)
    corpus = [f"{r['messages'][0]['content']} {r['answer']}" for r in arithmetic_rows(2000, 3)]
    tok.train_from_iterator(corpus, trainer=trainers.UnigramTrainer(
        vocab_size=150, special_tokens=["<pad>", "<s>", "</s>", "<unk>", "[INST]", "[/INST]"], unk_token="<unk>",
        show_progress=False))
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}<s>[INST] {{ m['content'] }} [/INST]"
                "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", chat_template=template)


def _encode(tokenizer, example):
    return TextSide(tokenizer).encode(example)


def _assembler(student, teacher):
    return CrossTokenizerAssembler(TextSide(student), TextSide(teacher, "teacher.model.tokenizer"), 64)


def _conversation(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _samples(tokenizer, n=4, truncate_last=True):
    rows = arithmetic_rows(n, seed=11)
    out = []
    for r in rows:
        ex = Example(r["messages"][:1], r["answer"], r["answer"])
        p, c = _encode(tokenizer, ex)
        out.append(Sample(p, c, ex))
    if truncate_last:  # cut by the length limit: no EOS
        last = out[-1]
        out[-1] = Sample(last.prompt_ids, last.completion_ids[:1], last.example)
    return out


@pytest.mark.parametrize("student_name", ["unigram", "pairs"])
def test_teacher_inputs_are_the_teachers_own_template(student_name):
    student = train_arithmetic_unigram_tokenizer() if student_name == "unigram" else _pairs_tokenizer()
    teacher = train_arithmetic_tokenizer()
    samples = _samples(student, truncate_last=False)
    cb = _assembler(student, teacher).assemble(samples)
    for b, smp in enumerate(samples):
        conv = _conversation(smp.example.prompt[0]["content"], smp.example.completion)
        want = teacher.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        n = int(cb.teacher["attention_mask"][b].sum())
        assert cb.teacher["input_ids"][b, :n].tolist() == list(want)
        # the student's own rendering is untouched
        want_s = student.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        n = int(cb.student["attention_mask"][b].sum())
        assert cb.student["input_ids"][b, :n].tolist() == list(want_s)
    c = cb.counters
    assert c["align/covered_bytes"] == c["align/total_bytes"] == sum(len(s.example.completion) for s in samples)
    assert c["align/unaligned_samples"] == 0


def test_real_teacher_template_and_full_coverage(tmp_path):
    """A real pretrained teacher tokenizer (Mistral v1) and a byte-level BPE student: the teacher's
    inputs are its own apply_chat_template output, and every completion byte is aligned."""
    teacher = mistral_v1(tmp_path, chat_template=True)
    student = train_arithmetic_tokenizer()
    texts = ["Paris.", "Café au lait, s'il vous plaît.", "東京は日本の首都です。", "Done 🎉🚀!",
             "  two  spaces\n\nand lines", "3.14159 x 2 = 6.28318"]
    samples = []
    for i, text in enumerate(texts):
        ex = Example([{"role": "user", "content": f"Question {i}?"}], text)
        samples.append(Sample(*_encode(student, ex), ex))
    cb = _assembler(student, teacher).assemble(samples)
    for b, smp in enumerate(samples):
        conv = smp.example.prompt + [{"role": "assistant", "content": smp.example.completion}]
        want = teacher.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        n = int(cb.teacher["attention_mask"][b].sum())
        assert cb.teacher["input_ids"][b, :n].tolist() == list(want)
    c = cb.counters
    assert c["align/unaligned_samples"] == 0
    assert c["align/covered_bytes"] == c["align/total_bytes"] == sum(len(t.encode()) for t in texts)
    assert len(cb.alignment.student_start) > len(texts)  # byte groups plus one end-of-turn group per sample


def _boundaries(tokenizer, ids):
    """Byte offset after each completion token, from decoding prefixes (independent of gold_ds.align)."""
    return [len(tokenizer.decode(ids[:i + 1], skip_special_tokens=True).encode()) for i in range(len(ids))]


def _reference_groups(student, teacher, s_ids, t_ids):
    """Token ranges between shared byte boundaries, plus the end-of-turn pair (plain Python). A token
    that adds no byte to the decoded text (special tokens; a template's separator space that the
    decoder drops) belongs to no group."""
    def widths(tok, ids):
        ends = _boundaries(tok, ids)
        return ends, [e > (ends[i - 1] if i else 0) for i, e in enumerate(ends)]
    (s_end, s_w), (t_end, t_w) = widths(student, s_ids), widths(teacher, t_ids)
    shared = sorted(set(e for e, w in zip(s_end, s_w) if w) & set(e for e, w in zip(t_end, t_w) if w))
    groups, lo = [], 0
    for b in shared:
        s_in = [i for i, (e, w) in enumerate(zip(s_end, s_w)) if w and lo < e <= b]
        t_in = [i for i, (e, w) in enumerate(zip(t_end, t_w)) if w and lo < e <= b]
        groups.append((s_in[0], s_in[-1] + 1, t_in[0], t_in[-1] + 1))
        lo = b
    if s_ids and s_ids[-1] == student.eos_token_id and t_ids and t_ids[-1] == teacher.eos_token_id:
        groups.append((len(s_ids) - 1, len(s_ids), len(t_ids) - 1, len(t_ids)))
    return groups


def _tiny_llama(vocab, seed):
    from conftest import llama_config, plain_model
    model = plain_model(llama_config(vocab=vocab), seed=seed, dtype="float32")
    with torch.no_grad():  # sharper, less uniform distributions than the default init
        model.lm_head.weight.mul_(40)
    return model


@pytest.mark.parametrize("micro_steps", [1, 2])
@pytest.mark.parametrize("loss,student_name", [("uld", "pairs"), ("hybrid_uld", "pairs"), ("hybrid_uld", "unigram")])
def test_micro_step_loss_matches_fp64_reference(loss, student_name, micro_steps):
    """micro_steps=2: the samples are two micro-steps of different lengths whose teacher targets
    come from one forward of both (teacher.forward_micro_steps); their summed loss is compared."""
    student_tok = train_arithmetic_unigram_tokenizer() if student_name == "unigram" else _pairs_tokenizer()
    teacher_tok = train_arithmetic_tokenizer()
    # swap roles too: the pairs tokenizer as the teacher merges spans on the teacher side
    for s_tok, t_tok in ((student_tok, teacher_tok), (teacher_tok, student_tok)):
        distill = DistillConfig(loss=loss, beta=0.3, temperature=1.3, teacher_temperature=0.8, ce_weight=0.25,
                                divergence_weight=1.5, logits="full")
        s_model, t_model = _tiny_llama(len(s_tok), 0), _tiny_llama(len(t_tok), 1)
        from gold_ds.trainer.objective import CrossTokenizerObjective
        asm = _assembler(s_tok, t_tok)
        obj = CrossTokenizerObjective(distill, s_model, t_model, asm, lambda _: None)
        samples = _samples(s_tok)
        cut = len(samples) - 1 if micro_steps == 2 else len(samples)  # the last sample (no EOS) is shortest
        mbs = [asm.assemble(part) for part in (samples[:cut], samples[cut:]) if part]
        assert len(mbs) == micro_steps
        got, stats = 0.0, collections.Counter()
        for mb, targets in zip(mbs, obj.teacher_targets(mbs)):
            got = got + obj.loss(mb, targets)[0]
            stats.update(mb.counters)
        got.backward()
        got_grads = [p.grad.clone() for p in s_model.parameters()]
        s_model.zero_grad()

        total, merged_groups = torch.zeros((), dtype=torch.float64), 0
        # the reference keeps the student's graph: its gradient is checked too
        for smp in samples:
            finished = smp.completion_ids[-1] == s_tok.eos_token_id
            text = s_tok.decode(smp.completion_ids, skip_special_tokens=True)
            tp, tc = _encode(t_tok, Example(smp.example.prompt, text))
            if not finished:
                tc = tc[:-1]
            s_logits = s_model(torch.tensor([smp.prompt_ids + smp.completion_ids])).logits[0].double()
            with torch.no_grad():
                t_logits = t_model(torch.tensor([tp + tc])).logits[0].double()
            # row len(prompt) - 1 + i predicts completion token i
            s_row = lambda i: s_logits[len(smp.prompt_ids) - 1 + i]
            t_row = lambda i: t_logits[len(tp) - 1 + i]
            s_lp = lambda i: torch.log_softmax(s_row(i) / distill.temperature, -1)[smp.completion_ids[i]]
            t_lp = lambda i: torch.log_softmax(t_row(i) / distill.teacher_temperature, -1)[tc[i]]
            for s0, s1, t0, t1 in _reference_groups(s_tok, t_tok, smp.completion_ids, tc):
                merged_groups += (s1 - s0 > 1) + (t1 - t0 > 1)
                # chain rule: the first row's distribution times the other actual tokens' probabilities
                s_scale = sum((s_lp(i) for i in range(s0 + 1, s1)), torch.zeros((), dtype=torch.float64))
                t_scale = sum((t_lp(i) for i in range(t0 + 1, t1)), torch.zeros((), dtype=torch.float64))
                kw = dict(student_temperature=distill.temperature, teacher_temperature=distill.teacher_temperature,
                          student_log_scale=s_scale[None], teacher_log_scale=t_scale[None], reduction="sum")
                if loss == "uld":
                    total += distill.divergence_weight * ref.uld(s_row(s0)[None], t_row(t0)[None], **kw)
                else:
                    ids = asm.matched_vocabulary()[:2]
                    total += distill.divergence_weight * ref.hybrid_uld(
                        s_row(s0)[None], t_row(t0)[None], ids[0], ids[1], beta=distill.beta, **kw)
            for i, tok in enumerate(smp.completion_ids):
                total += distill.ce_weight * -torch.log_softmax(s_row(i), -1)[tok]
        assert merged_groups > 0 or student_name == "unigram"  # the builtin pair spells digits alike
        assert stats["align/covered_bytes"] == stats["align/total_bytes"]
        assert torch.allclose(got.double(), total, rtol=1e-5, atol=1e-6), (got.item(), total.item())
        total.backward()
        for g, p in zip(got_grads, s_model.parameters()):  # fp32 model, fp32 vs fp64 loss math
            assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max()), (g - p.grad).abs().max()
        assert got_grads[-1].abs().sum() > 0
        assert all(p.grad is None for p in t_model.parameters())


def _cross_raw(tmp, **distill):
    from conftest import ds_section, tiny_raw
    raw = tiny_raw(tmp, max_steps=3)
    raw["student"]["model"]["config"].update(vocab_size=299)
    raw["student"]["model"]["tokenizer"] = "builtin:arithmetic-unigram"
    raw["teacher"]["sft"] = {"max_steps": 2, "deepspeed": ds_section(2, 1)}
    raw["distill"] = {"loss": "hybrid_uld", "ce_weight": 0.1, **distill}
    raw["data"]["eval"] = {"builtin": "arithmetic", "split": "eval", "num_examples": 5}
    raw["eval"] = {"max_new_tokens": 4, "num_samples": 2}
    return raw


def _cross_trainer_run(tmp):
    import torch.distributed as dist
    from gold_ds.config import load_config
    from gold_ds.trainer import build_trainer
    # off-policy: digits and the end-of-turn pair align completely
    tr = build_trainer(load_config(raw=_cross_raw(f"{tmp}/off", lmbda=0.0)))
    m = tr.train_step()
    assert m["align/coverage"] == 1.0 and m["align/unaligned_samples"] == 0
    assert math.isfinite(m["loss"]) and m["loss"] > 0
    tr.student.destroy()
    tr.teacher.destroy()
    # on-policy with seq_kd and 2 completions per prompt: the student's samples are rendered for the teacher
    tr = build_trainer(load_config(raw=_cross_raw(f"{tmp}/on", lmbda=0.5, seq_kd=True, num_generations=2)))
    results = tr.train()
    assert math.isfinite(results["after"]["loss"])
    if dist.get_rank() == 0:
        rows = [json.loads(line) for line in open(f"{tmp}/on/metrics.jsonl")]
        steps = [r for r in rows if "align/coverage" in r]
        assert steps and all(0.0 < r["align/coverage"] <= 1.0 for r in steps)
        # the teacher after its SFT was exported with its own tokenizer
        from transformers import AutoTokenizer
        exported = AutoTokenizer.from_pretrained(f"{tmp}/on/teacher_sft")
        assert exported.get_vocab() == tr.assembler.teacher.tokenizer.get_vocab()


def test_cross_tokenizer_trainer_two_ranks(tmp_path):
    from conftest import run_ranks
    run_ranks(_cross_trainer_run, 2, str(tmp_path / "run"), err_dir=str(tmp_path / "err"))


def test_unsupported_tokenizer_fails_at_start():
    """A slow (Python-only) tokenizer cannot be mapped to bytes: the assembler refuses it by name at
    construction, instead of treating every sample as unaligned."""
    from gold_ds.align import UnsupportedTokenizerError
    from test_align import CharTokenizer
    with pytest.raises(UnsupportedTokenizerError, match="CharTokenizer"):
        _assembler(train_arithmetic_tokenizer(), CharTokenizer())


def _reference_events(student, teacher, s_ids, t_ids):
    """byte_prefix_jsd's events of one sample, from decoded prefixes (plain Python): (student token
    index, teacher token index, side 0/1/2, skip) at every byte offset where a side starts a token
    inside a group, then the end-of-turn pair."""
    events = []
    s_end, t_end = _boundaries(student, s_ids), _boundaries(teacher, t_ids)
    s_start = [0] + s_end[:-1]
    t_start = [0] + t_end[:-1]
    for s0, s1, t0, t1 in _reference_groups(student, teacher, s_ids, t_ids):
        if s_end[s0] == s_start[s0]:  # the end-of-turn pair (zero-width)
            events.append((s0, t0, 2, 0))
            continue
        offsets = sorted({s_start[i] for i in range(s0, s1)} | {t_start[i] for i in range(t0, t1)})
        for o in offsets:
            i = max(k for k in range(s0, s1) if s_start[k] <= o)
            j = max(k for k in range(t0, t1) if t_start[k] <= o)
            ds, dt = o - s_start[i], o - t_start[j]
            s_len, t_len = s_end[i] - s_start[i], t_end[j] - t_start[j]
            if ds == dt == 0:
                events.append((i, j, 1 if s_len < t_len else 0 if s_len > t_len else 2, 0))
            elif ds == 0 and s_end[i] <= t_end[j]:
                events.append((i, j, 1, dt))
            elif dt == 0 and t_end[j] <= s_end[i]:
                events.append((i, j, 0, ds))
    return events


@pytest.mark.parametrize("pair", ["merged-digits", "letters"])
def test_byte_prefix_micro_step_matches_fp64_reference(pair):
    """The objective's byte_prefix_jsd micro-step (events from the assembler, rows from the models)
    against events from decoded prefixes and the fp64 reference loss from the vocabularies' bytes."""
    from gold_ds.data.builtin import builtin_rows, builtin_tokenizer
    from gold_ds.trainer.objective import CrossTokenizerObjective
    from test_align_prefix import _vocab_bytes
    s_tok, t_tok = ((builtin_tokenizer("arithmetic-merged-digits"), builtin_tokenizer("arithmetic"))
                    if pair == "merged-digits" else
                    (builtin_tokenizer("arithmetic-letters"), builtin_tokenizer("arithmetic-words")))
    task = "arithmetic" if pair == "merged-digits" else "arithmetic-words"
    distill = DistillConfig(loss="byte_prefix_jsd", beta=0.3, temperature=1.3, teacher_temperature=0.8,
                            divergence_weight=1.5, logits="full")
    s_model, t_model = _tiny_llama(len(s_tok), 0), _tiny_llama(len(t_tok), 1)
    asm = _assembler(s_tok, t_tok)
    obj = CrossTokenizerObjective(distill, s_model, t_model, asm, lambda _: None)
    samples = []
    for r in builtin_rows(task, "train", 5, 3):
        ex = Example(r["messages"][:1], r["answer"], r["answer"])
        samples.append(Sample(*_encode(s_tok, ex), ex))
    mb = asm.assemble(samples)
    got = obj.loss(mb, obj.teacher_targets([mb])[0])[0]
    got.backward()
    got_grads = [p.grad.clone() for p in s_model.parameters()]
    s_model.zero_grad()

    s_vocab, t_vocab = _vocab_bytes(s_tok), _vocab_bytes(t_tok)
    total, sides = torch.zeros((), dtype=torch.float64), collections.Counter()
    for smp in samples:
        tp, tc = _encode(t_tok, Example(smp.example.prompt, smp.example.completion))
        s_logits = s_model(torch.tensor([smp.prompt_ids + smp.completion_ids])).logits[0].double()
        with torch.no_grad():
            t_logits = t_model(torch.tensor([tp + tc])).logits[0].double()
        for i, j, side, skip in _reference_events(s_tok, t_tok, smp.completion_ids, tc):
            sides[side] += 1
            total += distill.divergence_weight * ref.byte_prefix_jsd(
                s_logits[len(smp.prompt_ids) - 1 + i][None], t_logits[len(tp) - 1 + j][None], torch.tensor([side]),
                torch.tensor([skip]), torch.tensor([smp.completion_ids[i]]), torch.tensor([tc[j]]), s_vocab, t_vocab,
                s_tok.eos_token_id, t_tok.eos_token_id, beta=distill.beta, student_temperature=distill.temperature,
                teacher_temperature=distill.teacher_temperature, reduction="sum")
    assert sides[2] > 0 and sides[0 if pair == "merged-digits" else 1] > 0  # the coarser side's rows are projected
    assert len(mb.alignment.events) == sum(sides.values())
    assert torch.allclose(got.double(), total, rtol=1e-5), (got.item(), total.item())
    total.backward()
    for g, p in zip(got_grads, s_model.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max()), (g - p.grad).abs().max()
    assert got_grads[-1].abs().sum() > 0
