"""Benchmark gold_ds.align on one batch: 64 completions x 512 student tokens.

Student: Mistral v1 SentencePiece (32k, byte fallback); teacher: Mistral tekken byte-level BPE (131k);
both real tokenizers from the mistral-common package. Text: the license texts Debian ships in
/usr/share/common-licenses (English prose with punctuation, digits, indentation), cut into 64 windows.
Phases (median of --repeats runs, ms):
  tokenize        teacher text -> ids (the backend's batch encode), reported apart
  spans (ids)     byte_spans from ids, student and teacher, 64 sequences each
  spans (text)    byte_spans from text (tokenizes again inside), teacher
  group           group_spans over the batch
  merge fwd       merge_log_scales on student logits [64*512, V] (random), the groups' student ranges
  merge fwd+bwd   the same with the backward pass
Run: python3 bench/align.py [--repeats 5] [--vocab 32000] [--threads N]
"""
import argparse
import glob
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gold_ds.align import byte_spans, group_spans, merge_log_scales  # noqa: E402


def tokenizers():
    import mistral_common
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast
    from transformers.integrations.mistral.tokenizer import MistralConverter
    data = os.path.join(os.path.dirname(mistral_common.__file__), "data")
    d = tempfile.mkdtemp()
    shutil.copy(os.path.join(data, "tokenizer.model.v1"), os.path.join(d, "tokenizer.model"))
    student = LlamaTokenizer.from_pretrained(d, add_bos_token=True)
    teacher = PreTrainedTokenizerFast(tokenizer_object=MistralConverter(os.path.join(data, "tekken_240911.json")).converted())
    return student, teacher


def completions(student, count, length):
    text = "\n".join(open(f, errors="ignore").read() for f in sorted(glob.glob("/usr/share/common-licenses/*"))
                     if os.path.isfile(f))
    ids = student(text, add_special_tokens=False)["input_ids"]
    step = max(1, (len(ids) - length) // count)
    windows = [ids[k * step:k * step + length] for k in range(count)]
    texts = [student.decode(w) for w in windows]
    return [student(t, add_special_tokens=False)["input_ids"][:length] for t in texts], texts


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    student, teacher = tokenizers()
    s_ids, texts = completions(student, args.sequences, args.tokens)
    byte_spans(student, ids=s_ids[0]), byte_spans(teacher, text="warm")        # build the cached tables
    rows = {}
    rows["tokenize (teacher, batch)"], enc = timed(
        lambda: teacher.backend_tokenizer.encode_batch(texts, add_special_tokens=False), args.repeats)
    t_ids = [e.ids for e in enc]
    rows["spans from ids (student)"], s_spans = timed(lambda: [byte_spans(student, ids=i) for i in s_ids], args.repeats)
    rows["spans from ids (teacher)"], t_spans = timed(lambda: [byte_spans(teacher, ids=i) for i in t_ids], args.repeats)
    rows["spans from text (teacher, incl. tokenize)"], _ = timed(
        lambda: [byte_spans(teacher, text=t) for t in texts], args.repeats)
    rows["group_spans"], groups = timed(lambda: group_spans(s_spans, t_spans), args.repeats)

    n_student = sum(len(i) for i in s_ids)
    base = torch.tensor([0] + [len(i) for i in s_ids]).cumsum(0)[:-1]
    start = base[groups.sequence] + groups.student_start
    end = base[groups.sequence] + groups.student_end
    logits = torch.randn(n_student, args.vocab)
    tokens = torch.cat([torch.as_tensor(i) for i in s_ids])
    inside = int((end - start - 1).sum())
    rows["merge_log_scales fwd"], _ = timed(lambda: merge_log_scales(logits, tokens, start, end), args.repeats)
    leaf = logits.requires_grad_()

    def fwd_bwd():
        merge_log_scales(leaf, tokens, start, end).sum().backward()
        leaf.grad = None
    rows["merge_log_scales fwd+bwd"], _ = timed(fwd_bwd, args.repeats)

    print(f"batch: {args.sequences} x {args.tokens} student tokens (Mistral v1 SPM), {sum(len(i) for i in t_ids)} "
          f"teacher tokens (tekken), {len(groups)} groups, coverage {groups.coverage:.4f}, "
          f"{inside} of {n_student} student rows inside a group (need a log-softmax); logits V={args.vocab}; "
          f"torch threads {torch.get_num_threads()}; median of {args.repeats}")
    print("| phase | ms |\n|---|---|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.1f} |")
    print(f"| group + merge fwd | {rows['group_spans'] + rows['merge_log_scales fwd']:.1f} |")


if __name__ == "__main__":
    main()
