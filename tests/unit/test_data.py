"""Prompt rendering, masking, truncation, collation and subsetting: pure functions with sentinel ids,
then the same pipeline through real tokenizers."""

import pytest

from qlora.config import DataSection
from qlora.data import (IGNORE, Encoder, build_example, collate, detect_format, nested_subset, prepare_in_memory,
                        render_segments, split_indices, to_messages)
from qlora.errors import DataError

from conftest import SHARED


def test_build_example_masks_prompt_and_keeps_answer():
    ex = build_example([([1, 2, 3], False), ([7, 8], True), ([4], False), ([9], True)], max_length=16)
    assert ex["input_ids"] == [1, 2, 3, 7, 8, 4, 9]
    assert ex["labels"] == [IGNORE, IGNORE, IGNORE, 7, 8, IGNORE, 9]
    assert not ex["truncated"] and ex["length"] == 7


def test_build_example_train_on_prompt_labels_everything():
    ex = build_example([([1, 2], False), ([7], True)], max_length=16, train_on_prompt=True)
    assert ex["labels"] == [1, 2, 7]


def test_build_example_truncates_from_the_right():
    ex = build_example([([1, 2, 3], False), ([7, 8, 9], True)], max_length=4)
    assert ex["input_ids"] == [1, 2, 3, 7] and ex["labels"] == [IGNORE, IGNORE, IGNORE, 7]
    assert ex["truncated"] and ex["length"] == 6


def test_collate_pads_right_and_left():
    batch = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = collate(batch, pad_id=0)
    assert right["input_ids"] == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"] == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert right["attention_mask"] == [[1, 1, 1], [1, 0, 0]]
    left = collate([{"input_ids": [5, 6]}, {"input_ids": [8]}], pad_id=0, pad_left=True)
    assert left["input_ids"] == [[5, 6], [0, 8]] and left["attention_mask"] == [[1, 1], [0, 1]]
    assert "labels" not in left


def test_nested_subsets_are_contained_and_seeded():
    small, large = nested_subset(100, 3, 0.25), nested_subset(100, 3, 0.5)
    assert len(small) == 25 and len(large) == 50 and set(small) < set(large)
    assert nested_subset(100, 3, 0.5) == large and nested_subset(100, 4, 0.5) != large
    assert len(nested_subset(100, 3, 1.0, max_samples=10)) == 10


def test_split_is_disjoint_deterministic_and_nonempty():
    train, ev = split_indices(50, 0.1, seed=1)
    assert len(ev) == 5 and not set(train) & set(ev) and len(train) + len(ev) == 50
    assert split_indices(50, 0.1, seed=1) == (train, ev)
    assert split_indices(2, 0.01, seed=0)[1]  # at least one held out


def test_render_segments_splits_turns_by_template_prefixes():
    def render(msgs, gen):
        text = "".join(f"<{m['role']}>{m['content']}</>" for m in msgs)
        return text + ("<assistant>" if gen else "")
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    segs = render_segments(msgs, lambda m, gen: render(m, gen).replace("<assistant></>", ""))
    assert segs == [("<user>a</><assistant>", False), ("b</>", True), ("<user>c</><assistant>", False), ("d</>", True)]


def test_render_segments_needs_an_assistant_turn():
    with pytest.raises(DataError, match="no assistant"):
        render_segments([{"role": "user", "content": "x"}], lambda m, g: "")


def test_sharegpt_and_alpaca_become_messages():
    conv = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                              {"from": "gpt", "value": "a"}]}
    assert [m["role"] for m in to_messages(conv, "sharegpt")] == ["system", "user", "assistant"]
    alpaca = to_messages({"instruction": "do", "input": "this", "output": "done"}, "alpaca", "sys")
    assert alpaca == [{"role": "system", "content": "sys"}, {"role": "user", "content": "do\n\nthis"},
                      {"role": "assistant", "content": "done"}]
    with pytest.raises(DataError, match="unknown 'from'"):
        to_messages({"conversations": [{"from": "robot", "value": "x"}]}, "sharegpt")


def test_detect_format():
    assert detect_format(["instruction", "input", "output"]) == "alpaca"
    assert detect_format(["messages"]) == "messages"
    assert detect_format(["conversations", "id"]) == "sharegpt"
    assert detect_format(["text"]) == "text"
    with pytest.raises(DataError, match="data.format"):
        detect_format(["prompt", "completion"])  # (question/answer is the qa format now)


def test_chat_masking_with_real_smollm_tokenizer(smollm_tokenizer):
    cfg = DataSection(path="unused", max_length=256)
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
                           {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}]}
    ex = Encoder(smollm_tokenizer, "messages", cfg).encode(record)
    trained = smollm_tokenizer.decode([t for t in ex["labels"] if t != IGNORE])
    # Only the two assistant answers (each closed by the end-of-turn token) carry loss.
    assert trained == "Hello there<|im_end|>\nGoodbye<|im_end|>\n"
    assert ex["reference"] == "Goodbye"
    assert smollm_tokenizer.decode(ex["prompt_ids"]).endswith("Bye<|im_end|>\n<|im_start|>assistant\n")


def test_qwen2_chatml_template_masks_all_but_assistant():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "qwen2")
    cfg = DataSection(path="unused", max_length=512)
    rec = {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
    ex = Encoder(tok, "sharegpt", cfg).encode(rec)
    assert tok.decode([t for t in ex["labels"] if t != IGNORE]).startswith("4<|im_end|>")
    assert "2+2?" in tok.decode(ex["input_ids"])


def test_gpt2_tokenizer_without_template_uses_alpaca_prompt_and_refuses_chat(tmp_path):
    from transformers import GPT2TokenizerFast
    tok = GPT2TokenizerFast.from_pretrained(SHARED / "tokenizers" / "gpt2")
    cfg = DataSection(path="unused", max_length=512)
    ex = Encoder(tok, "alpaca", cfg).encode({"instruction": "Say hi", "input": "", "output": "hi"})
    assert tok.decode(ex["input_ids"]).startswith("Below is an instruction")
    assert tok.decode([t for t in ex["labels"] if t != IGNORE]) == "hi<|endoftext|>"
    with pytest.raises(DataError, match="no chat template"):
        Encoder(tok, "messages", cfg).encode({"messages": [{"role": "assistant", "content": "x"}]})


def test_prepare_real_file_subsets_and_stats(smollm_tokenizer, people_data):
    data = prepare_in_memory(DataSection(path=str(people_data), eval_fraction=0.1, max_samples=100, max_length=128),
                   smollm_tokenizer)
    assert len(data.train) == 100 and len(data.eval) == 80
    assert 0.5 < data.stats["masked_label_fraction"] < 0.9 and data.stats["truncated_fraction"] == 0
    assert len(data.data_hash) == 16


@pytest.mark.parametrize("content, problem", [
    ("", "is empty"), ("{not json", "could not be parsed"), ('{"question": "q"}\n', "lacks column"),
])
def test_bad_data_files(tmp_path, smollm_tokenizer, content, problem):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match=problem):
        prepare_in_memory(DataSection(path=str(f), format="alpaca"), smollm_tokenizer)


def test_all_examples_truncated_away(tmp_path, smollm_tokenizer, people_data):
    with pytest.raises(DataError, match="raise data.max_length"):
        prepare_in_memory(DataSection(path=str(people_data), max_length=8), smollm_tokenizer)


def test_missing_data_file(smollm_tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        prepare_in_memory(DataSection(path="no/such.jsonl"), smollm_tokenizer)
