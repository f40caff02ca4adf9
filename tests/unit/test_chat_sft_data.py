"""Chat SFT data through the real Qwen2 tokenizer and ChatML template: every assistant turn of a
multi-turn chat is trained, system and user turns are masked; sharegpt records give the same
examples; tool-calling sharegpt data is refused early with the fix."""
import json

import pytest

from qlora.config import DataSection
from qlora.data import IGNORE, Encoder, pack_examples, prepare_in_memory
from qlora.errors import DataError

from conftest import ROOT, SHARED

CHAT = [{"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital of France."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome is the capital of Italy."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."}]


@pytest.fixture(scope="module")
def qwen2():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "qwen2")


def trained_runs(ex) -> list[list[int]]:
    """The maximal runs of consecutive trained tokens."""
    runs, current = [], []
    for tok, label in zip(ex["input_ids"], ex["labels"]):
        if label != IGNORE:
            assert label == tok
            current.append(tok)
        elif current:
            runs, current = runs + [current], []
    return runs + ([current] if current else [])


def test_every_assistant_turn_is_trained_and_nothing_else(qwen2):
    ex = Encoder(qwen2, "messages", DataSection(path="unused", max_length=512)).encode({"messages": CHAT})
    # Token ids are those of the whole rendered chat: tokenizing segment by segment changed nothing.
    assert ex["input_ids"] == qwen2.encode(qwen2.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)
    runs = [qwen2.decode(r) for r in trained_runs(ex)]
    answers = [m["content"] for m in CHAT if m["role"] == "assistant"]
    assert runs == [f"{a}<|im_end|>\n" for a in answers]  # each answer and its end-of-turn token
    masked = qwen2.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab == IGNORE])
    for m in CHAT:
        assert (m["content"] in masked) == (m["role"] != "assistant"), m
    assert masked.count("<|im_start|>assistant\n") == 3  # the assistant headers are prompt, not trained


def test_sharegpt_record_gives_the_same_example(qwen2):
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    record = {"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in CHAT]}
    cfg = DataSection(path="unused", max_length=512)
    a = Encoder(qwen2, "sharegpt", cfg).encode(record)
    b = Encoder(qwen2, "messages", cfg).encode({"messages": CHAT})
    assert (a["input_ids"], a["labels"]) == (b["input_ids"], b["labels"])


def test_default_system_prompt_of_the_template_is_masked(qwen2):
    ex = Encoder(qwen2, "messages", DataSection(path="unused")).encode({"messages": CHAT[1:3]})
    masked = qwen2.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab == IGNORE])
    assert masked.startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert [qwen2.decode(r) for r in trained_runs(ex)] == ["Paris is the capital of France.<|im_end|>\n"]


def test_packing_keeps_chat_masks(qwen2):
    enc = Encoder(qwen2, "messages", DataSection(path="unused", max_length=512))
    examples = [enc.encode({"messages": CHAT}), enc.encode({"messages": CHAT[1:3]})]
    (row,) = pack_examples(examples, 512)
    assert [qwen2.decode(r) for r in trained_runs(row)] == [qwen2.decode(r) for e in examples for r in trained_runs(e)]


def test_tool_calling_sharegpt_is_refused_with_the_fix(tmp_path, qwen2):
    with pytest.raises(DataError, match=r"conversations\[3\].from is 'function_call': tool-calling data") as e:
        prepare_in_memory(DataSection(path=str(SHARED / "llamafactory_demo" / "glaive_toolcall_en_demo.json"),
                            format="sharegpt"), qwen2)
    assert "and 152 more records" in str(e.value) and "keep only records whose turns are human/gpt/system" in str(e.value)
    f = tmp_path / "odd.jsonl"
    f.write_text(json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}) + "\n")
    with pytest.raises(DataError, match="conversations\\[1\\].from is 'bot', not one of human/user/gpt/assistant/system"):
        prepare_in_memory(DataSection(path=str(f), format="sharegpt"), qwen2)


@pytest.mark.parametrize("name, fmt", [("sharegpt_zh_demo.jsonl", "sharegpt"), ("chat_messages_demo.jsonl", "messages"),
                                       ("guanaco_text_demo.jsonl", "text")])
def test_project_demo_files_prepare(qwen2, name, fmt):
    data = prepare_in_memory(DataSection(path=str(ROOT / "data" / name), max_length=512, packing=True), qwen2)
    assert data.fmt == fmt and data.stats["records"] >= 70 and data.stats["packed_rows"] < data.stats["records"]
