"""The encoded-dataset cache: the table equals a plain per-row encoding, one encoder per node, cache
hits and misses, half-written caches, the source keys (globs, shard directories, column mapping)."""
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace as NS

import numpy as np
import pytest

from conftest import REPO, run_ranks, tiny_raw
from gold_ds.config import ConfigError, DataConfig, DatasetSource, load_config
from gold_ds.data import BadRowError, RankSampler, TextSide, open_source, to_example
from gold_ds.data.builtin import builtin_tokenizer
from gold_ds.data.cache import MARKER, encode_cached, open_cached
from gold_ds.data.cross_tokenizer import CrossTokenizerAssembler
from gold_ds.data.dataset import BadRow
from gold_ds.data.vlm import VLMSide, load_processor
from gold_ds.data.vlm_tasks import shapes_rows


def reference_encode(side, rows, max_prompt_length, max_completion_length):
    """The encoding rules row by row, as gold_ds applied them before the cache: (kept rows as
    (prompt ids, completion ids, example), bad-row reasons by row index, truncation count)."""
    kept, bad, truncated = [], {}, 0
    for i, row in enumerate(rows):
        ex = to_example(row)
        if isinstance(ex, str):
            bad[i] = ex
            continue
        try:
            got = side.encode_rows([ex])[0] if isinstance(side, VLMSide) else side.encode(ex)
            if isinstance(got, BadRow):
                raise got
            p, c = got
        except BadRow as e:
            bad[i] = e.reason
            continue
        if len(p) > max_prompt_length:
            bad[i] = "prompt_too_long"
            continue
        truncated += len(c) > max_completion_length
        kept.append((list(p), list(c[:max_completion_length]), ex))
    return kept, bad, truncated


CHAT = [{"messages": [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(a + b) * (a % 3 + 1)}],
         "answer": str(a + b)} for a, b in [(12, 30), (7, 5), (40, 41), (3, 99), (60, 6)]]
BAD = [{"messages": [{"role": "user", "content": "1+2="}]},
       {"messages": [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "  "}]},
       {"messages": [{"role": "user", "content": "1+2=" * 40}, {"role": "assistant", "content": "3"}]}]
PLAIN = [{"prompt": f"{a}+{a}=", "completion": str(2 * a) * 3, "answer": str(2 * a)} for a in range(5)]
PC_CHAT = [{"prompt": [{"role": "user", "content": f"{a}+1="}], "completion": [{"role": "assistant", "content": str(a + 1)}]}
           for a in range(4)] + [{"prompt": [{"role": "user", "content": "9+1="}], "completion": []}]


def _cfg(**kw):
    return DataConfig(max_prompt_length=kw.pop("max_prompt_length", 40), max_completion_length=kw.pop("max_completion_length", 5),
                      **kw)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _assert_table_equals_reference(data, side, rows, cfg):
    kept, bad, truncated = reference_encode(side, rows, cfg.max_prompt_length, cfg.max_completion_length)
    got = list(data)
    assert len(got) == len(kept) > 0
    for s, (p, c, ex) in zip(got, kept):
        assert list(s.prompt_ids) == p and s.completion_ids == c
        assert (s.example.prompt, s.example.completion, s.example.answer) == (ex.prompt, ex.completion, ex.answer)
    assert dict(data.bad_rows) == dict(sorted({r: list(bad.values()).count(r) for r in bad.values()}.items()))
    assert [i for i, _, _ in data.info["first_bad_rows"]] == sorted(bad)[:5]
    assert data.truncated_completions == truncated
    assert data.info["completion_tokens"] == sum(len(c) for _, c, _ in kept)


@pytest.mark.parametrize("fmt", ["chat", "plain", "prompt-completion-chat", "unigram-cross-student"])
def test_cached_table_equals_row_by_row_encoding(tmp_path, fmt):
    rows = {"chat": CHAT + BAD, "plain": PLAIN, "prompt-completion-chat": PC_CHAT,
            "unigram-cross-student": CHAT + BAD}[fmt]
    tok = builtin_tokenizer("arithmetic-unigram" if fmt.startswith("unigram") else "arithmetic")
    side, cfg = TextSide(tok), _cfg(num_proc=2)
    source = DatasetSource(path=_jsonl(tmp_path / "rows.jsonl", rows))
    got = encode_cached(side, source, cfg, str(tmp_path / "cache"), "train", "data.train", log=lambda _: None)
    assert not got["hit"]
    data = open_cached(got["path"], side, "data.train")
    _assert_table_equals_reference(data, side, list(open_source(source)), cfg)
    if fmt.startswith("unigram"):  # the teacher's own rendering of lazily read rows, as for teacher SFT
        teacher = TextSide(builtin_tokenizer("arithmetic"), "teacher.model.tokenizer")
        asm = CrossTokenizerAssembler(side, teacher, cfg.max_completion_length)
        for s in data:
            p, c = teacher.encode(s.example)
            assert asm.teacher_sample(s).prompt_ids == p and asm.teacher_sample(s).completion_ids == c[:5]


@pytest.mark.parametrize("name", ["tiny-qwen2vl", "tiny-llava"])
def test_cached_vision_language_table(tmp_path, name):
    side = VLMSide(load_processor(NS(processor=f"builtin:{name}", trust_remote_code=False)), "student.model.processor")
    rows = shapes_rows(5, 1)
    for i, r in enumerate(rows):  # images as files (kept as paths) and one row whose image is missing
        r["images"] = [str(tmp_path / f"{i}.png")]
        if i != 3:
            shapes_rows(5, 1)[i]["images"][0].save(r["images"][0])
    source = DatasetSource(path=_jsonl(tmp_path / "vlm.jsonl", rows))
    cfg = _cfg(max_prompt_length=64, max_completion_length=3)
    got = encode_cached(side, source, cfg, str(tmp_path / "cache"), "train", "data.train", log=lambda _: None)
    data = open_cached(got["path"], side, "data.train")
    _assert_table_equals_reference(data, side, rows, cfg)
    assert data.bad_rows == {"missing_images": 1}
    s = data[0]
    assert s.example.images == [{"bytes": None, "path": rows[0]["images"][0]}]  # the path, not the pixels
    assert s.prompt_ids.images is s.example.images  # a MultimodalPrompt: generators get the raw images
    assert side.batch([s])["pixel_values"].numel() > 0


def test_hits_misses_and_what_invalidates(tmp_path):
    tok = builtin_tokenizer("arithmetic")
    path = _jsonl(tmp_path / "rows.jsonl", CHAT)
    root, quiet = str(tmp_path / "cache"), (lambda _: None)

    def run(side=None, source=None, **cfg):
        return encode_cached(side or TextSide(tok), source or DatasetSource(path=path), _cfg(**cfg), root, "train",
                             "data.train", log=quiet)
    first = run()
    again = run()
    assert not first["hit"] and again["hit"] and again["path"] == first["path"]
    misses = [run(max_completion_length=6), run(max_prompt_length=39),
              run(side=TextSide(builtin_tokenizer("arithmetic-unigram"))),
              run(source=DatasetSource(path=path, num_examples=2)),
              run(source=DatasetSource(path=path, columns={"messages": "messages"}))]
    other = builtin_tokenizer("arithmetic")
    other.chat_template = other.chat_template.replace("<|im_start|>", "<|im_start|> ")
    misses.append(run(side=TextSide(other)))
    assert all(not m["hit"] for m in misses)
    assert len({first["path"]} | {m["path"] for m in misses}) == 1 + len(misses)
    time.sleep(0.01)
    _jsonl(tmp_path / "rows.jsonl", CHAT[:3])  # the data file changed
    changed = run()
    assert not changed["hit"] and len(open_cached(changed["path"], TextSide(tok), "data.train")) == 3


def test_half_written_cache_is_detected_and_rebuilt(tmp_path):
    """An encoder killed (SIGKILL) after writing the table but before its report leaves a partial
    directory: the next encoder removes it and writes a complete cache; a directory that lacks the
    report under the final name is rebuilt too."""
    root = tmp_path / "cache"
    path = _jsonl(tmp_path / "rows.jsonl", CHAT)
    script = f"""
import json, sys, time
sys.path.insert(0, {REPO!r})
import gold_ds.data.cache as cache
from gold_ds.config import DataConfig, DatasetSource
from gold_ds.data import TextSide
from gold_ds.data.builtin import builtin_tokenizer
def stuck(*a, **k):
    print("TABLE WRITTEN", flush=True)
    time.sleep(600)
cache.json.dump = stuck
cache.encode_cached(TextSide(builtin_tokenizer("arithmetic")), DatasetSource(path={path!r}),
                    DataConfig(max_prompt_length=40, max_completion_length=5), {str(root)!r}, "train", "data.train")
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "TABLE WRITTEN"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    partial = [d for d in os.listdir(root) if ".partial-" in d]
    assert len(partial) == 1 and os.path.isdir(root / partial[0] / "table") and not (root / partial[0] / MARKER).exists()
    side, said = TextSide(builtin_tokenizer("arithmetic")), []
    got = encode_cached(side, DatasetSource(path=path), _cfg(), str(root), "train", "data.train", log=said.append)
    assert not got["hit"] and os.listdir(root) == [os.path.basename(got["path"])]
    assert any("half written" in s for s in said)
    _assert_table_equals_reference(open_cached(got["path"], side, "data.train"), side, CHAT, _cfg())
    os.remove(os.path.join(got["path"], MARKER))  # not a complete cache any more
    said.clear()
    again = encode_cached(side, DatasetSource(path=path), _cfg(), str(root), "train", "data.train", log=said.append)
    assert not again["hit"] and any("incomplete cache" in s for s in said)
    assert os.path.isfile(os.path.join(again["path"], MARKER))


def _two_ranks(tmp, path):
    import torch
    import torch.distributed as dist
    import gold_ds.data.cache as cache
    from gold_ds.trainer.build import _load_data
    from gold_ds.trainer.collective import init_distributed
    init_distributed()
    rank = dist.get_rank()
    os.environ["LOCAL_RANK"] = str(rank)
    calls, real = [], cache.encode_table
    cache.encode_table = lambda *a, **k: calls.append(1) or real(*a, **k)
    cfg = load_config(raw=tiny_raw(os.path.join(tmp, "run"), data={"train": {"path": path}, "max_prompt_length": 40,
                                                                    "max_completion_length": 5}))
    side, said = TextSide(builtin_tokenizer("arithmetic")), []
    device = torch.device("cpu")
    first = _load_data(cfg, side, "train", device, said.append)
    assert calls == ([1] if rank == 0 else [])  # local rank 0 encodes; rank 1 only opens its files
    second = _load_data(cfg, side, "train", device, said.append)  # a relaunch
    assert len(calls) == (1 if rank == 0 else 0)
    assert "encoded in" in said[0] and "found in the cache" in said[1]
    assert first.table.cache_files and first.table.cache_files[0]["filename"].startswith(os.path.join(tmp, "run", "data_cache"))
    assert len(second) == len(first) == len(CHAT)
    mine = [first[i].completion_ids for i in RankSampler(len(first), rank, 2, 0).take(2)]
    everyone = [None, None]
    dist.all_gather_object(everyone, mine)
    flat = [tuple(c) for ids in everyone for c in ids]
    assert len(set(flat)) == len(flat) == 4  # disjoint rows


def test_two_ranks_one_encoder(tmp_path):
    path = _jsonl(tmp_path / "rows.jsonl", CHAT)
    run_ranks(_two_ranks, 2, str(tmp_path), path, err_dir=str(tmp_path / "errors"))


def test_source_keys_and_their_errors(tmp_path, monkeypatch):
    tok = builtin_tokenizer("arithmetic")
    side, cfg = TextSide(tok), _cfg()
    (tmp_path / "shards").mkdir()
    for k in range(3):
        _jsonl(tmp_path / "shards" / f"part-{k}.jsonl", CHAT[k::3])
    want = reference_encode(side, CHAT, 40, 5)[0]

    def kept(source):
        got = encode_cached(side, source, cfg, str(tmp_path / "cache"), "train", "data.train", log=lambda _: None)
        return sorted(tuple(s.completion_ids) for s in open_cached(got["path"], side, "data.train"))
    assert kept(DatasetSource(path=str(tmp_path / "shards"))) == sorted(tuple(c) for _, c, _ in want)
    assert kept(DatasetSource(path=str(tmp_path / "shards" / "part-[01].jsonl"))) == sorted(
        tuple(c) for _, c, ex in want if ex.answer in {r["answer"] for r in CHAT[0::3] + CHAT[1::3]})
    renamed = [{"question": r["prompt"], "response": r["completion"], "solution": r["answer"], "extra": 1} for r in PLAIN]
    mapped = DatasetSource(path=_jsonl(tmp_path / "qa.jsonl", renamed),
                           columns={"prompt": "question", "completion": "response", "answer": "solution"})
    assert kept(mapped) == sorted(tuple(c) for _, c, _ in reference_encode(side, PLAIN, 40, 5)[0])
    assert open_source(mapped).column_names == ["prompt", "completion", "answer"]

    # a dataset with several configs and splits (a hub repository's layout, here a local copy of one)
    repo = tmp_path / "repo"
    for cfg_name, rows in (("easy", CHAT[:2]), ("hard", CHAT[2:])):
        (repo / cfg_name).mkdir(parents=True)
        _jsonl(repo / cfg_name / "train.jsonl", rows[:1])
        _jsonl(repo / cfg_name / "test.jsonl", rows[1:])
    (repo / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.jsonl\n"
        f"  - split: test\n    path: {c}/test.jsonl\n" for c in ("easy", "hard")) + "---\n")
    assert [r["answer"] for r in open_source(DatasetSource(path=str(repo), name="hard", split="test"))] == [
        r["answer"] for r in CHAT[3:]]
    assert kept(DatasetSource(path=str(repo), name="easy", split="train")) == [tuple(want[0][1])]

    errors = [(DatasetSource(path=str(tmp_path / "nothing-*.jsonl")), "'data.train.path': the pattern .* matches no file"),
              (DatasetSource(path=mapped.path, columns={"prompt": "query", "completion": "response"}),
               r"'data.train.columns': the dataset has no column 'query' \(mapped to 'prompt'\); its columns are"),
              (DatasetSource(path=mapped.path), r"rows need a 'messages' column .* map yours with data.train.columns"),
              (DatasetSource(path=mapped.path, revision="v1"), "'data.train.revision': got 'v1'.*local data"),
              (DatasetSource(path=str(tmp_path / "empty-dir")), "holds no .json, .jsonl or .parquet file")]
    (tmp_path / "empty-dir").mkdir()
    for source, message in errors:
        with pytest.raises(ConfigError, match=message):
            kept(source)
    import datasets
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network here: fail at once, not after retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=r"'data.train.path': 'no-such-org/no-such-set' is no local file or directory, "
                                          r"and cannot be loaded as a hub dataset \(split='train', revision='nope'; "
                                          r"keys data.train.name/.split/.revision\)"):
        open_source(DatasetSource(path="no-such-org/no-such-set", revision="nope"))
    for data, message in [({"train": {"path": "a.jsonl", "columns": {"question": "q"}}}, "'question' is not a column"),
                          ({"train": {"builtin": "arithmetic", "revision": "x"}}, "builtin task has no revision"),
                          ({"num_proc": 0}, "'data.num_proc': got 0")]:
        with pytest.raises(ConfigError, match=message):
            load_config(raw=tiny_raw(tmp_path, data={"train": {"path": "a.jsonl"}, **data}))


def test_bad_rows_error_names_the_row(tmp_path):
    side = TextSide(builtin_tokenizer("arithmetic"))
    got = encode_cached(side, DatasetSource(path=_jsonl(tmp_path / "r.jsonl", CHAT[:2] + BAD)), _cfg(),
                        str(tmp_path / "c"), "train", "data.train", log=lambda _: None)
    data = open_cached(got["path"], side, "data.train")
    assert "row 2 no_assistant_turn; row 3 empty_completion" in data.report()
    with pytest.raises(BadRowError, match="data.train: dataset row 2 is bad: no_assistant_turn.*on_bad_row=report"):
        data.check("error")
    assert np.array_equal([len(s.completion_ids) for s in data], [len(c) for _, c, _ in reference_encode(side, CHAT[:2], 40, 5)[0]])


def test_rows_that_cannot_be_read_stop_the_run(tmp_path):
    """Conversational data for a tokenizer without a chat template, and a row of no known format,
    stop at start naming the key or the row (the launcher turns both into one message, exit 2)."""
    plain = builtin_tokenizer("arithmetic")
    plain.chat_template = None
    with pytest.raises(ConfigError, match="'student.model.tokenizer': the tokenizer has no chat template"):
        encode_cached(TextSide(plain), DatasetSource(path=_jsonl(tmp_path / "chat.jsonl", CHAT)), _cfg(),
                      str(tmp_path / "c"), "train", "data.train", log=lambda _: None)
    assert len(open_cached(encode_cached(TextSide(plain), DatasetSource(path=_jsonl(tmp_path / "p.jsonl", PLAIN)), _cfg(),
                                         str(tmp_path / "c"), "train", "data.train", log=lambda _: None)["path"],
                           TextSide(plain), "data.train")) == len(PLAIN)  # plain text needs no template
    mixed = PLAIN[:2] + [{"prompt": "1+1=", "completion": None, "answer": "2"}]
    with pytest.raises(BadRowError, match="dataset row 2: row has prompt of type str and completion of type NoneType"):
        encode_cached(TextSide(builtin_tokenizer("arithmetic")), DatasetSource(path=_jsonl(tmp_path / "m.jsonl", mixed)),
                      _cfg(num_proc=2), str(tmp_path / "c"), "train", "data.train", log=lambda _: None)


def test_tokenizers_that_cannot_be_loaded_name_the_key(tmp_path):
    from gold_ds.config import ModelConfig
    from gold_ds.data import load_tokenizer
    with pytest.raises(ConfigError, match=r"'teacher.model.name_or_path': cannot load a tokenizer from .*missing' "
                                          r"\(no such directory\)"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "missing")), "teacher.model")
    (tmp_path / "weights-only").mkdir()
    (tmp_path / "weights-only" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match=r"'student.model.tokenizer': cannot load a tokenizer from .*weights-only'"):
        load_tokenizer(ModelConfig(name_or_path="x", tokenizer=str(tmp_path / "weights-only")), "student.model")
