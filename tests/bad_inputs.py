"""The bad-input table: what a new user gets wrong, and what gold_ds must answer (exit code 2 and one
message naming the key or file; for row-level problems under ``on_bad_row: report``, a counted
skip; for NaN/inf training, exit code 4 after the skips).

Each case builds its files under a directory and says how the launcher is called. The tests run
them without the launcher (``tests/test_bad_inputs.py``: the checks before the process group in
one process, the others on 2 spawned ranks); this script runs every one through the real launcher,
as users do, and prints the table (outcome, first line of the message, seconds to fail):

    DS_ACCELERATOR=cpu python tests/bad_inputs.py [--only NAME ...]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import REPO, ds_section, free_port, tiny_raw  # noqa: E402

TRAIN = os.path.join(REPO, "launch", "train.py")


@dataclass
class Setup:
    preset: object  # a preset dict, or the preset file's text
    args: list = field(default_factory=list)
    code: int = 2
    says: tuple = ()  # fragments of the message
    trained_first: bool = False  # a 2-step run with a checkpoint is made in the output dir first


@dataclass
class Case:
    name: str
    what: str  # the input, as the table names it
    when: str  # "start": found before the process group; "ranks": after it; "run": needs a run
    make: object  # make(directory) -> Setup


def _write(path, text, mode="w"):
    with open(path, mode) as f:
        f.write(text)
    return str(path)


def _jsonl(d, name, rows):
    return _write(os.path.join(d, name), "".join(json.dumps(r) + "\n" for r in rows))


def _chat(q="1+2=", a="3"):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def _base(d, **top):
    return tiny_raw(os.path.join(d, "run"), **top)


def _with_data(d, path, **data):
    raw = _base(d)
    raw["data"].update({"train": {"path": path}, **data})
    return raw


def _model_dir(d, tokenizer: bool, chat_template: bool = True):
    """A local model directory (tiny Llama, weights saved), with or without tokenizer files."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from conftest import llama_config
    from gold_ds.data.builtin import builtin_tokenizer
    out = os.path.join(d, "model")
    kw = llama_config(32)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(kw.pop("model_type"), **kw)).save_pretrained(out)
    if tokenizer:
        tok = builtin_tokenizer("arithmetic")
        if not chat_template:
            tok.chat_template = None
        tok.save_pretrained(out)
    return out


def _model_case(d, **model):
    raw = _base(d)
    raw["student"]["model"] = {k: v for k, v in model.items() if v is not None}
    return raw


def _vlm_missing_images(d):
    from gold_ds.data.vlm_tasks import shapes_rows
    raw = json.load(open(os.path.join(REPO, "ds_configs", "vlm-same-family-jsd.json")))
    rows = []
    for i, r in enumerate(shapes_rows(6, 0)):
        rows.append({"messages": r["messages"], "images": [os.path.join(d, f"missing-{i}.png")]})
    raw.update(output_dir=os.path.join(d, "run"), max_steps=2)
    raw["teacher"]["sft"]["max_steps"] = 0
    raw["data"] = {"train": {"path": _jsonl(d, "vlm.jsonl", rows)}, "max_prompt_length": 64,
                   "max_completion_length": 10}
    raw["logging"]["progress_bar"] = False
    return raw


CASES = [
    Case("malformed-json", "malformed JSON preset", "start",
         lambda d: Setup('{"name": "x",', says=("not valid JSON",))),
    Case("unknown-key", "an unknown key (distill.betta)", "start",
         lambda d: Setup(_base(d), ["distill.betta=0.3"], says=("distill.betta",))),
    Case("wrong-type", "a wrong type (max_steps=ten)", "start",
         lambda d: Setup(_base(d), ["max_steps=ten"], says=("max_steps",))),
    Case("lmbda-range", "lmbda out of range (1.5)", "start",
         lambda d: Setup(_base(d), ["distill.lmbda=1.5"], says=("distill.lmbda",))),
    Case("negative-lr", "a negative learning rate", "start",
         lambda d: Setup(_base(d), ["student.deepspeed.optimizer.params.lr=-0.001"],
                         says=("student.deepspeed.optimizer.params.lr",))),
    Case("string-lr", "a string learning rate", "start",
         lambda d: Setup(_base(d), ["student.deepspeed.optimizer.params.lr=fast"],
                         says=("student.deepspeed.optimizer.params.lr",))),
    Case("optimizer-typo", "an optimizer name with a typo (AdamWW)", "start",
         lambda d: Setup(_base(d), ["student.deepspeed.optimizer.type=AdamWW"],
                         says=("student.deepspeed.optimizer.type", "AdamWW"))),
    Case("model-no-tokenizer", "a model directory with no tokenizer", "start",
         lambda d: Setup(_model_case(d, name_or_path=_model_dir(d, tokenizer=False)),
                         says=("student.model.name_or_path", "tokenizer"))),
    Case("model-path-missing", "a model path that does not exist (tokenizer given)", "start",
         lambda d: Setup(_model_case(d, name_or_path=os.path.join(d, "no", "such", "model"),
                                     tokenizer="builtin:arithmetic"),
                         says=("student.model.name_or_path", "no such directory"))),
    Case("model-relative-missing", "a relative model path that does not exist (models/x/y)", "start",
         lambda d: Setup(_model_case(d, name_or_path="models/student/final", tokenizer="builtin:arithmetic"),
                         says=("student.model.name_or_path", "no such directory"))),
    Case("jsd-two-vocabularies", "two vocabularies under loss: jsd", "start",
         lambda d: Setup(_base(d), ["student.model.tokenizer=builtin:arithmetic-unigram",
                                    "student.model.config.vocab_size=299"], says=("distill.loss",))),
    Case("no-chat-template", "a tokenizer with no chat template, conversational data", "ranks",
         lambda d: Setup(_model_case(d, name_or_path=_model_dir(d, tokenizer=True, chat_template=False)),
                         says=("student.model", "chat template"))),
    Case("data-missing", "a data path that does not exist", "ranks",
         lambda d: Setup(_with_data(d, os.path.join(d, "nothing.jsonl")), says=("data.train", "nothing.jsonl"))),
    Case("data-no-extension", "a data path without an extension (not a file, not on the hub)", "ranks",
         lambda d: Setup(_with_data(d, os.path.join(d, "mydata")), says=("data.train", "mydata"))),
    Case("data-empty", "an empty dataset", "ranks",
         lambda d: Setup(_with_data(d, _write(os.path.join(d, "empty.jsonl"), "")), says=("data.train",))),
    Case("data-all-bad", "a dataset whose rows are all bad", "ranks",
         lambda d: Setup(_with_data(d, _jsonl(d, "bad.jsonl", [{"messages": [{"role": "user", "content": "1+1="}]}] * 4)),
                         says=("data.train", "no_assistant_turn"))),
    Case("data-broken-line", "a JSONL with a broken line", "ranks",
         lambda d: Setup(_with_data(d, _write(os.path.join(d, "broken.jsonl"),
                                              json.dumps(_chat()) + "\n{\"messages\": [\n" + json.dumps(_chat()) + "\n")),
                         says=("data.train", "broken.jsonl"))),
    Case("data-not-utf8", "non-UTF-8 bytes in a JSONL", "ranks",
         lambda d: Setup(_with_data(d, _write(os.path.join(d, "latin1.jsonl"),
                                              json.dumps(_chat()).encode() + b"\n" +
                                              '{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'.encode("latin-1"),
                                              "wb")),
                         says=("data.train", "latin1.jsonl"))),
    Case("data-mixed-prompts", "rows with mixed prompt types (text and messages)", "ranks",
         lambda d: Setup(_with_data(d, _jsonl(d, "mixed.jsonl", [{"prompt": "1+1=", "completion": "2"},
                                                                {"prompt": [{"role": "user", "content": "1+2="}],
                                                                 "completion": [{"role": "assistant", "content": "3"}]}])),
                         says=("data.train",))),
    Case("data-other-columns", "rows with other columns (question/answer)", "ranks",
         lambda d: Setup(_with_data(d, _jsonl(d, "qa.jsonl", [{"question": "1+1=", "answer": "2"}] * 4)),
                         says=("data.train", "columns"))),
    Case("data-bad-row-error", "a bad row under on_bad_row: error", "ranks",
         lambda d: Setup(_with_data(d, _jsonl(d, "one-bad.jsonl", [_chat(), {"messages": [{"role": "user", "content": "1"}]}]),
                                    on_bad_row="error"),
                         says=("data.train", "row 1", "no_assistant_turn"))),
    Case("data-some-bad", "some bad rows, on_bad_row: report (the run goes on)", "ranks",
         lambda d: Setup(_with_data(d, _jsonl(d, "some-bad.jsonl", [_chat()] * 6 + [{"messages": [{"role": "user",
                                                                                           "content": "1"}]}])),
                         code=0, says=("bad rows skipped: no_assistant_turn=1", "row 6"))),
    Case("vlm-images-missing", "a vision-language dataset whose images are all missing", "ranks",
         lambda d: Setup(_vlm_missing_images(d), says=("data.train", "missing-0.png"))),
    Case("batch-vs-world", "train_batch_size contradicting the world size", "ranks",
         lambda d: Setup(_base(d), ["student.deepspeed.train_batch_size=7"],
                         says=("student.deepspeed.train_batch_size",))),
    Case("resume-nothing", "--resume with no checkpoint", "ranks",
         lambda d: Setup(_base(d), ["--resume"], says=("--resume", "no complete checkpoint"))),
    Case("resume-after-overrides", "--resume written after the overrides (no checkpoint)", "ranks",
         lambda d: Setup(_base(d), ["distill.beta=0.3", "--resume"], says=("--resume", "no complete checkpoint"))),
    Case("resume-other-model", "--resume on another model's checkpoint", "run",
         lambda d: Setup(_base(d, max_steps=4, checkpoint={"every": 1}),
                         ["--resume", "student.model.config.hidden_size=48"], trained_first=True,
                         says=("--resume", "another run", "student.model.config.hidden_size"))),
    Case("resume-at-max-steps", "--resume on a checkpoint already at max_steps", "run",
         lambda d: Setup(_base(d, max_steps=2, checkpoint={"every": 1}), ["--resume"], trained_first=True,
                         says=("--resume", "nothing left to train"))),
    Case("lr-1e30", "learning rate 1e30 (weights become inf/NaN)", "run",
         lambda d: Setup(_base(d, max_steps=20), ["student.deepspeed.optimizer.params.lr=1e30"], code=4,
                         says=("optimizer steps in a row skipped",))),
    Case("sft-lr-1e30", "teacher SFT at learning rate 1e30", "run",
         lambda d: Setup(_base(d, teacher={**_base(d)["teacher"], "sft": {"max_steps": 20,
                                                                           "deepspeed": ds_section(2, 1, lr=1e30)}}),
                         code=4, says=("teacher SFT: 3 optimizer steps in a row skipped",))),
]


def preset_file(d, setup: Setup) -> str:
    text = setup.preset if isinstance(setup.preset, str) else json.dumps(setup.preset)
    return _write(os.path.join(d, "preset.json"), text)


def _env():
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=REPO)


def launch(preset: str, args: list, cwd: str, timeout=600):
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), TRAIN, "--config", preset, *args]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=cwd)
    return out.returncode, out.stdout + out.stderr, time.perf_counter() - t0


def _message(text: str, code: int) -> str:
    lines = [re.sub(r"^\[\S+\] ", "", line).strip() for line in text.splitlines()]  # no launcher prefixes
    if code == 0:  # a run that went through: its data report
        return next((line[line.index("bad rows"):] for line in lines if "bad rows skipped" in line), "")
    return next((line for line in lines if line.startswith("gold_ds:")),
                next((line for line in reversed(lines) if "Error" in line), ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="case names")
    args = parser.parse_args()
    rows = []
    for case in CASES:
        if args.only and case.name not in args.only:
            continue
        with tempfile.TemporaryDirectory() as d:
            setup = case.make(d)
            if setup.trained_first:
                code, text, _ = launch(preset_file(d, setup), [], d)
                assert code == 0, text[-3000:]
            code, text, seconds = launch(preset_file(d, setup), setup.args, d)
        message = _message(text, code)
        ok = code == setup.code and all(s in message for s in setup.says) and "Traceback" not in text
        rows.append((case.what, f"exit {code}" + ("" if ok else " (NOT AS EXPECTED)"), message[:240], seconds))
        print(f"{case.name}: exit {code}, {seconds:.1f}s: {message[:160]}", file=sys.stderr, flush=True)
    print("| input | outcome | first line of the message | seconds |\n|---|---|---|---|")
    for what, outcome, message, seconds in rows:
        print(f"| {what} | {outcome} | `{message.replace('|', '/')}` | {seconds:.0f} |")


if __name__ == "__main__":
    main()
