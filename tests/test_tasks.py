import re

import pytest

from gold_ds.data.tasks import arithmetic_rows, arithmetic_splits, exact_match, train_arithmetic_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_arithmetic_tokenizer()


def test_rows_are_deterministic_and_seed_dependent():
    assert arithmetic_rows(50, seed=3) == arithmetic_rows(50, seed=3)
    assert arithmetic_rows(50, seed=3) != arithmetic_rows(50, seed=4)
    assert arithmetic_rows(50, seed=3, digits=3) == arithmetic_rows(50, seed=3, digits=3)


@pytest.mark.parametrize("digits", [1, 2, 3])
def test_answers_are_the_sums(digits):
    rows = arithmetic_rows(100 if digits > 1 else 60, seed=0, digits=digits)
    for row in rows:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        match = re.fullmatch(r"(\d+)\+(\d+)=", user["content"])
        assert match, user["content"]
        a, b = int(match.group(1)), int(match.group(2))
        low = 10 ** (digits - 1) if digits > 1 else 0
        assert low <= a < 10**digits and low <= b < 10**digits
        assert row["answer"] == assistant["content"] == "%d" % (a + b)
    assert len({row["messages"][0]["content"] for row in rows}) == len(rows)


def test_splits_are_disjoint_and_sized():
    train, held_out = arithmetic_splits(7100, 1000, seed=7)  # all 90 * 90 two-digit questions
    assert (len(train), len(held_out)) == (7100, 1000)
    train_questions = {row["messages"][0]["content"] for row in train}
    held_out_questions = {row["messages"][0]["content"] for row in held_out}
    assert len(train_questions) == 7100 and len(held_out_questions) == 1000
    assert not train_questions & held_out_questions
    assert train == arithmetic_rows(7100, seed=7)


def test_too_many_questions_is_refused():
    with pytest.raises(ValueError, match="only 8100"):
        arithmetic_rows(8101, seed=0)


def test_exact_match():
    assert exact_match(" 85\n", "85")
    assert not exact_match("850", "85")
    assert not exact_match("8 5", "85")


def test_builtin_tokenizers_are_the_same_in_every_process():
    """Every rank trains the builtin tokenizers itself: separate processes (as ranks are) must build
    identical ones. (The tokenizers library's UnigramTrainer alone does not: its scores and ids
    follow per-process hash-map order.)"""
    import subprocess
    import sys
    code = ("import hashlib\n"
            "from gold_ds.data.tasks import train_arithmetic_tokenizer, train_arithmetic_unigram_tokenizer\n"
            "from gold_ds.data.vlm_tasks import llava_tokenizer, qwen_vl_tokenizer\n"
            "for f in (train_arithmetic_tokenizer, train_arithmetic_unigram_tokenizer, llava_tokenizer, "
            "qwen_vl_tokenizer):\n"
            "    print(f.__name__, hashlib.sha256(f().backend_tokenizer.to_str().encode()).hexdigest())\n")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120) for _ in range(3)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    outputs = [r.stdout for r in runs]
    assert len(outputs[0].splitlines()) == 4 and outputs[0] == outputs[1] == outputs[2], outputs


def test_special_tokens(tokenizer):
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 0
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.bos_token is None


def test_digits_and_operators_are_single_tokens(tokenizer):
    ids = tokenizer("907+13=920", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == list("907+13=920")


@pytest.mark.parametrize("text", ["37+48=85", "user\nassistant\n", "Hello, world! 12 * 3 - 4 = 32", "é ∑ 漢字"])
def test_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_chat_rendering(tokenizer):
    row = arithmetic_rows(1, seed=0)[0]
    question, answer = row["messages"][0]["content"], row["answer"]
    prompt = tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
    assert prompt == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    assert full == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>"


def test_completion_tokens_follow_the_generation_prompt(tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row in arithmetic_rows(200, seed=1, digits=3):
        prompt = tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True, tokenize=True)
        full = tokenizer.apply_chat_template(row["messages"], tokenize=True)
        prompt_ids, full_ids = prompt["input_ids"], full["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids
        completion = full_ids[len(prompt_ids):]
        assert tokenizer.convert_ids_to_tokens(completion) == list(row["answer"]) + ["<|im_end|>"]
        assert completion[-1] == im_end
        assert tokenizer.decode(completion, skip_special_tokens=True) == row["answer"]
