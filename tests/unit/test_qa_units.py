"""Question/answer and multiple-choice formats, QLoRA's source/target caps, the GSM8K answer metric,
MMLU-style letter scoring, the added [PAD] token and fp32 norms: pure parts with sentinel ids, the model
parts on the tiny 4-bit Llama and the real SmolLM2."""
import json

import pytest
import torch

from qlora import adapters, checkpoint, distributed, evaluation, modeling, multiple_choice
from qlora.config import DataSection, JobConfig, load_config
from qlora.data import records
from qlora.data import (IGNORE, answer_letter, as_alpaca, build_example, cap_segments, choice_prompt,
                        detect_format, prepare_in_memory)
from qlora.errors import ConfigError, DataError
from qlora.model_source import ModelSource

from conftest import ROOT

CPU = distributed.Context(0, 1, torch.device("cpu"))


# --- pure functions --------------------------------------------------------------------------------

def test_cap_segments_keeps_source_end_and_target_start():
    segs = [([1, 2, 3, 4, 5], False), ([10, 11, 12, 13], True), ([6, 7], False), ([14, 15, 16], True)]
    assert cap_segments(segs, 3, 2) == [([3, 4, 5], False), ([10, 11], True), ([6, 7], False), ([14, 15], True)]
    assert cap_segments(segs, None, None) == [(list(i), t) for i, t in segs]
    assert cap_segments(segs, 1, None)[0] == ([5], False) and cap_segments(segs, 1, None)[1] == ([10, 11, 12, 13], True)
    ex = build_example(cap_segments(segs[:2], 2, 3), max_length=100)
    assert ex["input_ids"] == [4, 5, 10, 11, 12] and ex["labels"] == [IGNORE, IGNORE, 10, 11, 12]


def test_caps_must_fit_max_length():
    with pytest.raises(ConfigError, match="raise data.max_length to 300"):
        load_config(None, ["data.path=x", "data.max_source_length=200", "data.max_target_length=100",
                           "data.max_length=256"])


def test_multiple_choice_and_qa_map_onto_alpaca():
    assert choice_prompt(" Is it? ", ["no", "yes"]) == "Is it?\nA. no\nB. yes\nAnswer with the letter of the correct choice."
    assert [answer_letter(a, 4) for a in ("b", "C", 0, 3)] == ["B", "C", "A", "D"]
    for bad in ("E", 4, -1, "AB", True, None, 1.0):
        with pytest.raises(ValueError):
            answer_letter(bad, 4)
    assert as_alpaca({"question": "2+2?", "answer": "4 #### 4"}, "qa") == {"instruction": "2+2?", "input": "",
                                                                        "output": "4 #### 4"}
    mc = as_alpaca({"question": "Q", "choices": ["x", "y", "z"], "answer": 2}, "multiple_choice")
    assert mc["output"] == "C" and mc["instruction"].startswith("Q\nA. x\nB. y\nC. z")
    assert detect_format(["question", "answer"]) == "qa"
    assert detect_format(["question", "choices", "answer"]) == "multiple_choice"


@pytest.mark.parametrize("record, fmt, problem", [
    ({"question": "q", "answer": None}, "qa", "'answer' is null"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "multiple_choice", "at least 2 strings"),
    ({"question": "q", "choices": ["a", "b"], "answer": "C"}, "multiple_choice", "names no choice"),
    ({"question": 3, "choices": ["a", "b"], "answer": 0}, "multiple_choice", "'question' is int"),
])
def test_bad_records_are_named(record, fmt, problem):
    with pytest.raises(DataError, match=problem):
        records.check_records([record], fmt, DataSection(path="f.jsonl"), "f.jsonl")


def test_final_number_reads_gsm8k_answers():
    fn = evaluation.final_number
    assert fn("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18") == 18
    assert fn("#### 1,250") == 1250 and fn("so 72.0") == 72 and fn("-3 degrees") == -3
    assert fn("12 apples #### 7") == 7 and fn("no number") is None
    recs = evaluation.prediction_records([{"prompt_ids": [1], "reference": "3 + 4 = 7\n#### 7"}] * 2,
                                         ["The answer is 7.", "#### 8"], type("T", (), {"decode": lambda s, i: "p"})(),
                                         "final_number")
    assert [r["final_number_correct"] for r in recs] == [True, False] and not recs[0]["correct"]
    assert evaluation.generation_metrics(recs) == (2, 0, 1)


def test_letter_scoring_with_sentinel_ids():
    ids = multiple_choice.letter_token_ids({"A": [7, 99], "B": [8, 99], "C": [9]}.__getitem__, "ABC")
    assert ids == [7, 8, 9]
    with pytest.raises(DataError, match="distinct tokens"):
        multiple_choice.letter_token_ids({"A": [7], "B": [7]}.__getitem__, "AB")
    logits = torch.full((12,), -5.0)
    logits[8], logits[11] = 2.0, 9.0  # 11 is no letter: ignored
    assert multiple_choice.pick(logits, ids) == 1


def test_gather_shards_restores_order_on_one_rank():
    assert distributed.gather_shards([3, 1, 2], CPU) == [3, 1, 2]


def test_lockstep_shares_are_equal_in_length_and_count_each_item_once():
    """Under FSDP every rank runs the same forwards: shorter shares are padded, and the padding is marked."""
    items = list(range(7))
    for world in (2, 3, 4):
        shares = [distributed.lockstep_share(items, distributed.Context(r, world, CPU.device, sharded=True))
                  for r in range(world)]
        assert len({len(share) for share, _ in shares}) == 1  # lockstep: same number of items everywhere
        assert sorted(i for share, real in shares for i in share[:real]) == items  # each real item once
    assert distributed.lockstep_share(items, distributed.Context(1, 2, CPU.device)) == ([1, 3, 5], 3)  # DDP: as is
    assert distributed.lockstep_share([], distributed.Context(1, 2, CPU.device, sharded=True)) == ([], 0)


# --- tokenizer, model and data -------------------------------------------------------------------

def _cfg(model_dir, **sections):
    raw = {"model": {"name": str(model_dir)}, "data": {"path": str(ROOT / "data" / "gsm8k_train.jsonl")}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return JobConfig.model_validate(raw)


def test_gsm8k_sample_trains_as_qa_with_caps(smollm_tokenizer, smollm_dir):
    cfg = _cfg(smollm_dir, data={"eval_path": str(ROOT / "data" / "gsm8k_test.jsonl"), "max_source_length": 24,
                                 "max_target_length": 16, "max_length": 64})
    data = prepare_in_memory(cfg.data, smollm_tokenizer)
    assert data.fmt == "qa" and data.stats["records"] == 160 and len(data.eval) == 40
    first = json.loads((ROOT / "data" / "gsm8k_test.jsonl").read_text().splitlines()[0])
    ex = data.eval[0]  # held-out examples keep the reference answer (training examples need none)
    assert ex["reference"].endswith(first["answer"].split("####")[-1].strip())
    trained = [t for t in ex["labels"] if t != IGNORE]
    assert len(trained) == 16 and len(ex["input_ids"]) <= 24 + 16  # each segment capped
    assert "####" in ex["reference"]  # the reference is never cut by the target cap


def test_added_pad_token_rows_are_the_mean_and_the_adapter_reloads(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, model={"pad_token": "add"}, lora={"r": 4})
    source = ModelSource(str(tiny_model_dir), True, "tiny")
    tok = modeling.load_tokenizer(source, cfg)
    assert tok.pad_token == modeling.PAD_TOKEN and tok.pad_token_id == len(tok) - 1 != tok.eos_token_id
    plain = modeling.load_base_model(_cfg(tiny_model_dir), source, torch.device("cpu"))
    base = modeling.load_base_model(cfg, source, torch.device("cpu"))
    emb = base.get_input_embeddings().weight
    assert emb.shape[0] == len(tok) == plain.get_input_embeddings().weight.shape[0] + 1
    assert torch.allclose(emb[-1], plain.get_input_embeddings().weight.mean(0), atol=1e-6)
    assert torch.equal(base.get_output_embeddings().weight[-1], emb[-1])  # tied head: same row
    model = modeling.attach_lora(base, cfg.lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # a non-zero adapter, so reloading it is visible in the logits
    probe = torch.tensor([tok.encode("Question: 2 + 2?") + [tok.pad_token_id]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=probe).logits
    folder = checkpoint.save(tmp_path / "ckpt", model, cfg)
    saved = (folder / "adapter" / "adapter_model.safetensors").stat().st_size
    assert saved < 200_000  # LoRA only: no copy of the resized embedding
    reloaded, tok2 = adapters.load_for_inference(cfg, folder, torch.device("cpu"))
    assert len(tok2) == len(tok)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=probe).logits, expected, atol=1e-5)


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_norm_layers_are_fp32_on_a_4bit_base(tiny_model_dir, compute):
    cfg = _cfg(tiny_model_dir, quantization={"compute_dtype": compute})
    base = modeling.load_base_model(cfg, ModelSource(str(tiny_model_dir), True, "tiny"), torch.device("cpu"))
    norms = {n: p.dtype for n, p in base.named_parameters() if "norm" in n}
    assert len(norms) == 2 * 2 + 1 and set(norms.values()) == {torch.float32}, norms
    assert type(base.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"


def test_multiple_choice_scoring_is_deterministic_on_smollm2(smollm_dir):
    cfg = _cfg("smollm2-135m", evaluation={"multiple_choice_path": str(ROOT / "data" / "sst2_mc_eval.jsonl")},
               quantization={"bits": 16})
    source = ModelSource(str(smollm_dir), True, "smollm2")
    tok = modeling.load_tokenizer(source, cfg)
    items = multiple_choice.prepare(cfg, tok)
    assert len(items) == 100 and sum(it["answer"] for it in items) == 50
    assert items[0]["letter_ids"] == [tok.encode("A")[0], tok.encode("B")[0]]
    model = modeling.load_base_model(cfg, source, torch.device("cpu"))
    few = items[:3]  # prompts of different lengths: the batch is padded
    together = multiple_choice.letter_logits(model, few, tok.pad_token_id, 3, torch.device("cpu"))
    alone = [multiple_choice.letter_logits(model, [it], tok.pad_token_id, 1, torch.device("cpu"))[0] for it in few]
    # Left padding with matching position ids: a prompt scores the same alone or in a padded batch.
    assert torch.allclose(torch.tensor(together), torch.tensor(alone), atol=1e-3)
    assert len({len(it["prompt_ids"]) for it in few}) > 1
    acc = multiple_choice.accuracy(model, few, tok.pad_token_id, 2, CPU)["mc_accuracy"]
    picks = [max(range(2), key=lambda k: s[k]) for s in alone]
    assert acc == sum(p == it["answer"] for p, it in zip(picks, few)) / 3


def test_bad_multiple_choice_file_fails_before_ray(tmp_path, smollm_dir):
    bad = tmp_path / "mc.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": "Z"}) + "\n")
    cfg = _cfg("smollm2-135m", evaluation={"multiple_choice_path": str(bad)})
    tok = modeling.load_tokenizer(ModelSource(str(smollm_dir), True, "s"), cfg)
    with pytest.raises(DataError, match="record 1: answer 'Z'"):
        multiple_choice.prepare(cfg, tok)


def test_held_out_loss_is_the_same_when_the_batch_is_split_to_bound_its_logits(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    examples = []
    for n in (5, 17, 9, 30, 12, 3):  # ragged: padding differs between the whole batch and its parts
        ids = torch.randint(0, len(tok), (n,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE] * 2 + ids[2:]})
    ctx = distributed.Context(0, 1, torch.device("cpu"))
    vocab = model.get_output_embeddings().weight.shape[0]
    one_row = 12 * 30 * vocab  # a budget that fits the logits of exactly one 30-token row
    assert evaluation.rows_per_forward(6, 30, vocab, one_row) == 1
    assert evaluation.rows_per_forward(6, 30, vocab) == 6  # the default budget leaves small batches whole
    whole = evaluation.eval_loss(model, examples, tok.pad_token_id, 6, ctx)
    split = evaluation.eval_loss(model, examples, tok.pad_token_id, 6, ctx, logit_budget=one_row)
    assert split["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-5)
