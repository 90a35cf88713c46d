"""Generator helpers that need no process group (generation itself is tested on 2 ranks in test_engine)."""
from gold_ds.rollout.transformers_generator import left_padded


def test_prompts_are_left_padded():
    b = left_padded([[5, 6, 7], [8]], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
