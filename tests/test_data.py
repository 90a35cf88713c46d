"""Data: row formats from local files, chat rendering, label masks, bad rows, per-rank streams."""
import json

import pytest

from gold_ds.config import ConfigError, DatasetSource
from gold_ds.data import BadRowError, RankSampler, TextSide, concat_batches, open_source, sequence_tensors
from gold_ds.data import encode_dataset as _encode_dataset
from gold_ds.data.builtin import builtin_tokenizer


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer("arithmetic")


CONV = [
    {"messages": [{"role": "user", "content": "12+30="}, {"role": "assistant", "content": "42"}], "answer": "42"},
    {"messages": [{"role": "system", "content": "add"}, {"role": "user", "content": "1+1="},
                  {"role": "assistant", "content": "2"}]},
]


def encode_dataset(tok, rows, *args, **kw):
    return _encode_dataset(TextSide(tok), rows, *args, **kw)


def _rows(source) -> list:
    return list(open_source(source))


def _write(tmp_path, name, rows):
    path = tmp_path / name
    if name.endswith(".parquet"):
        import datasets
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return str(path)


def _expected_completion(tok, text):
    """Independent: the completion's own tokens then the end-of-turn token."""
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.json", "rows.parquet"])
def test_conversational_rows_from_local_files(tmp_path, tok, name):
    rows = _rows(DatasetSource(path=_write(tmp_path, name, CONV)))
    data = encode_dataset(tok, rows, 64, 16)
    assert len(data) == 2 and not data.bad_rows
    first = list(data)[0]
    assert first.example.answer == "42"
    rendered = tok.apply_chat_template(CONV[0]["messages"][:1], add_generation_prompt=True, tokenize=False)
    assert tok.decode(first.prompt_ids) == rendered
    assert first.completion_ids == _expected_completion(tok, "42")
    assert list(data)[1].completion_ids == _expected_completion(tok, "2")


def test_label_mask_covers_exactly_the_completion(tok):
    data = encode_dataset(tok, CONV, 64, 16)
    seqs = [(r.prompt_ids, r.completion_ids) for r in data]
    b = sequence_tensors(seqs, tok.pad_token_id)
    for i, (p, c) in enumerate(seqs):
        predicted = b["input_ids"][i, 1:][b["loss_mask"][i]].tolist()  # row t predicts token t + 1
        assert predicted == list(c)
        assert b["attention_mask"][i].sum() == len(p) + len(c)
    assert b["loss_mask"].sum() == sum(len(c) for _, c in seqs)


def test_prompt_completion_formats(tmp_path, tok):
    rows = [{"prompt": "7+8=", "completion": "15"},
            {"prompt": [{"role": "user", "content": "7+8="}], "completion": [{"role": "assistant", "content": "15"}]}]
    (plain,) = encode_dataset(tok, _rows(DatasetSource(path=_write(tmp_path, "pc.jsonl", rows[:1]))), 64, 16)
    (chat,) = encode_dataset(tok, rows[1:], 64, 16)
    assert plain.prompt_ids == tok("7+8=")["input_ids"]  # plain text: no chat template
    assert plain.completion_ids == _expected_completion(tok, "15")
    assert chat.prompt_ids == tok.apply_chat_template(rows[1]["prompt"], add_generation_prompt=True,
                                                      tokenize=True, return_dict=True)["input_ids"]
    assert chat.completion_ids == _expected_completion(tok, "15")
    with pytest.raises(ValueError, match="both must be strings or both message lists"):
        encode_dataset(tok, [{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}], 64, 16)
    with pytest.raises(ValueError, match="expected a 'messages' column"):
        encode_dataset(tok, [{"text": "a"}], 64, 16)


BAD = [
    {"messages": [{"role": "user", "content": "1+2="}]},                                       # no assistant turn
    {"messages": [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "  "}]},  # empty
    {"messages": [{"role": "user", "content": "1+2=" * 40}, {"role": "assistant", "content": "3"}]},  # long
]


def test_bad_rows_are_counted_and_reported(tok):
    data = encode_dataset(tok, CONV + BAD, max_prompt_length=32, max_completion_length=16)
    assert len(data) == 2
    assert dict(data.bad_rows) == {"no_assistant_turn": 1, "empty_completion": 1, "prompt_too_long": 1}
    assert "no_assistant_turn=1" in data.report() and "prompt_too_long=1" in data.report()


@pytest.mark.parametrize("i, reason", [(0, "no_assistant_turn"), (1, "empty_completion"), (2, "prompt_too_long")])
def test_bad_rows_fail_clearly_when_asked(tok, i, reason):
    with pytest.raises(BadRowError, match=f"row 2 is bad: {reason}.*on_bad_row=report"):
        encode_dataset(tok, CONV + [BAD[i]], 32, 16, on_bad_row="error")


def test_completion_truncation_keeps_the_start(tok):
    long = [{"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "123456789"}]}]
    data = encode_dataset(tok, long, 64, max_completion_length=4)
    assert list(data)[0].completion_ids == tok("1234", add_special_tokens=False)["input_ids"]
    assert data.truncated_completions == 1
    with pytest.raises(BadRowError, match="no usable rows"):
        encode_dataset(tok, BAD[:1], 64, 16)


def test_rank_sampler_splits_resumes_and_reshuffles():
    world, n = 3, 20
    samplers = [RankSampler(n, r, world, seed=5) for r in range(world)]
    per_epoch = n // world
    first = [s.take(per_epoch) for s in samplers]
    seen = [i for f in first for i in f]
    assert len(set(seen)) == len(seen) == per_epoch * world  # disjoint within an epoch
    second = [s.take(per_epoch) for s in samplers]
    assert second != first and len({i for f in second for i in f}) == per_epoch * world
    fresh = RankSampler(n, 1, world, seed=5)
    fresh.load_state_dict(samplers[1].state_dict())
    assert fresh.take(4) == samplers[1].take(4)  # resumable from its state
    assert RankSampler(n, 0, world, 5, shuffle=False).take(3) == [0, 3, 6]
    with pytest.raises(ValueError, match="cannot be split over 3 ranks"):
        RankSampler(2, 0, 3, 0)


def test_builtin_splits_are_disjoint():
    train = _rows(DatasetSource(builtin="arithmetic", split="train", num_examples=3000))
    held_out = _rows(DatasetSource(builtin="arithmetic", split="eval", num_examples=500))
    questions = lambda rows: {r["messages"][0]["content"] for r in rows}  # noqa: E731
    assert len(questions(train)) == 3000 and len(questions(held_out)) == 500
    assert not questions(train) & questions(held_out)
    for r in held_out:
        a, b = r["messages"][0]["content"].rstrip("=").split("+")
        assert r["answer"] == str(int(a) + int(b))
    whole = _rows(DatasetSource(builtin="arithmetic", split="train"))
    assert len(whole) == 7100 and not questions(whole) & questions(held_out)
    with pytest.raises(ValueError, match="num_examples=1001 but its 'eval' split has 1000"):
        _rows(DatasetSource(builtin="arithmetic", split="eval", num_examples=1001))


def test_dataset_by_name_goes_through_load_dataset(tmp_path):
    """A name that is not a file goes to datasets.load_dataset(name, config, split): a hub id, or (as
    here, offline) a local dataset directory with a split file."""
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    _write(folder, "train.jsonl", CONV)
    rows = _rows(DatasetSource(path=str(folder), split="train", num_examples=1))
    assert rows == [CONV[0]]
    with pytest.raises(ConfigError, match="'data.train.path': the dataset file .*missing.jsonl' does not exist"):
        _rows(DatasetSource(path=str(tmp_path / "missing.jsonl")))


def test_concat_batches_stacks_rows_each_equal_to_its_own_batch():
    import torch
    a = sequence_tensors([([1, 2], [3]), ([4], [5, 6, 7])], pad_id=9)  # T = 4
    b = sequence_tensors([([8], [2])], pad_id=9)  # T = 2
    c = sequence_tensors([([1, 2, 3, 4], [5, 6])], pad_id=9)  # T = 6
    got = concat_batches([a, b, c])
    assert got["input_ids"].shape == (4, 6) and got["loss_mask"].shape == (4, 5)
    start = 0
    for part in (a, b, c):
        rows, length = part["input_ids"].shape
        for key in ("input_ids", "attention_mask", "loss_mask"):
            width = length - 1 if key == "loss_mask" else length
            assert torch.equal(got[key][start:start + rows, :width], part[key]), key
            if key != "input_ids":  # the padding added by the stacking is masked out
                assert not got[key][start:start + rows, width:].any(), key
        start += rows
    assert got["loss_mask"].dtype == torch.bool and got["attention_mask"].sum() == 3 + 4 + 2 + 6
    with pytest.raises(ValueError, match="only text batches"):
        concat_batches([dict(a, pixel_values=torch.zeros(2, 3)), a])
