"""Preference tuning wired into the job: pairs rendered with SmolLM2's real chat template, checked, indexed (ties
counted), collated; the training loss on a real bitsandbytes 4-bit tiny Llama with LoRA, its reference pass
(the adapter off) against a separately computed base; and our DPO loss against TRL's DPOTrainer on TRL's own
batch. The full job (Ray Train, MLflow, SmolLM2) is tests/e2e/test_preference_e2e.py."""
import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from qlora import modeling, preference, preference_loss, tasks
from qlora.config import JobConfig
from qlora.data import IGNORE, records, to_tensors
from qlora.data.examples import build_index, make_encoder, meta, meta_table
from qlora.data.preference import TIE
from qlora.model_source import ModelSource

PAIR = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}
ARENA = {"prompt": json.dumps(["Hi"]), "response_a": json.dumps(["Hello"]), "response_b": json.dumps(["Hey"])}


def config(**sections) -> JobConfig:
    raw = {"model": {"task": "preference"}, "data": {"path": "x.jsonl", "format": "preference", "max_length": 64}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return JobConfig.model_validate(raw)


def test_the_encoder_renders_the_chat_template_and_masks_the_prompt(smollm_tokenizer):
    cfg = config()
    (e,) = make_encoder("preference", cfg.data, smollm_tokenizer)([PAIR], [True])
    prompt = smollm_tokenizer.apply_chat_template([{"role": "user", "content": PAIR["prompt"]}], tokenize=False,
                                                  add_generation_prompt=True)
    assert smollm_tokenizer.decode(e["input_ids"]).startswith(prompt)
    chosen = [t for t, label in zip(e["input_ids"], e["labels"]) if label != IGNORE]
    rejected = [t for t, label in zip(e["rejected_input_ids"], e["rejected_labels"]) if label != IGNORE]
    assert smollm_tokenizer.decode(chosen) == "Paris.<|im_end|>\n"  # the end of turn is trained: the model stops
    assert smollm_tokenizer.decode(rejected) == "Rome.<|im_end|>\n"
    n = len(e["input_ids"]) - len(chosen)
    assert e["input_ids"][:n] == e["rejected_input_ids"][:n] == e["prompt_ids"]
    assert e["reference"] == "Paris." and e["label"] == -1 and e["prompt_cut"] == 0


def test_ties_are_dropped_and_counted_apart_from_truncation(smollm_tokenizer):
    cfg = config()
    rows = [PAIR, {**ARENA, "winner_model_a": 0, "winner_model_b": 0, "winner_tie": 1},
            {**ARENA, "winner_model_a": 0, "winner_model_b": 1, "winner_tie": 0}]
    examples = make_encoder("preference", cfg.data, smollm_tokenizer)(rows, [False] * 3)
    assert [e["label"] for e in examples] == [-1, TIE, -1]
    table = meta_table([meta(e, i, i) for i, e in enumerate(examples)])
    index = build_index("preference", cfg.data, table, table)
    assert index.train == [0, 2] and index.stats["ties_dropped"] == 1 and index.stats["dropped_no_labels"] == 0
    assert table["tokens"][0] == len(examples[0]["input_ids"]) + len(examples[0]["rejected_input_ids"])


def test_bad_records_and_columns_name_the_layouts(smollm_tokenizer):
    cfg = config()
    assert records.record_problem({"prompt": "x", "chosen": None, "rejected": "y"}, "preference", cfg.data)
    assert records.record_problem({**ARENA, "winner_model_a": 0, "winner_model_b": 0, "winner_tie": 1},
                                  "preference", cfg.data) is None  # a tie is dropped later, not an error
    with pytest.raises(Exception, match=r"(?s)lacks column\(s\) \['rejected'\].*prompt / chosen / rejected"):
        records.check_columns(["prompt", "chosen"], "preference", cfg.data, "pairs.jsonl")


def test_config_refusals_name_the_fix():
    with pytest.raises(ValidationError, match="model.task=preference needs pairs.*set data.format=preference"):
        JobConfig.model_validate({"model": {"task": "preference"}, "data": {"path": "x.jsonl"}})
    with pytest.raises(ValidationError, match="data.format=preference holds answer pairs.*set model.task=preference"):
        JobConfig.model_validate({"data": {"path": "x.jsonl", "format": "preference"}})
    with pytest.raises(ValidationError, match="data.packing=true is for next-token training"):
        config(data={"packing": True})
    with pytest.raises(ValidationError, match="label_smoothing applies to the dpo loss"):
        config(preference={"loss": "orpo", "label_smoothing": 0.1})
    with pytest.raises(ValidationError, match="preference section is set but model.task is causal_lm"):
        JobConfig.model_validate({"data": {"path": "x.jsonl"}, "preference": {"beta": 0.5}})
    with pytest.raises(ValidationError, match="scaling.strategy=deepspeed is not verified"):
        config(scaling={"strategy": "deepspeed"})
    assert config(preference={"loss": "simpo"}).preference.beta == 2.0 and config().preference.beta == 0.1


@pytest.fixture(scope="module")
def four_bit(tiny_model_dir):
    """The tiny Llama in bitsandbytes NF4 with LoRA whose B matrices are non-zero (policy differs from the base)."""
    cfg = config(model={"name": str(tiny_model_dir)}, lora={"dropout": 0.0})
    torch.manual_seed(0)
    base = modeling.load_base_model(cfg, ModelSource(str(tiny_model_dir), True, "tiny"), torch.device("cpu"))
    model = modeling.attach_lora(base, cfg.lora, cfg.model.task)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return cfg, model


def pair_batch(smollm_tokenizer, cfg):
    rows = [PAIR, {"prompt": "2+2?", "chosen": "4", "rejected": "Five, I think."}]
    examples = make_encoder("preference", cfg.data, smollm_tokenizer)(rows, [False, False])
    return to_tensors(tasks.for_config(cfg).train_batch(examples, smollm_tokenizer.pad_token_id, cfg), "cpu")


def test_the_reference_is_the_base_without_the_adapter(four_bit, smollm_tokenizer):
    cfg, model = four_bit
    b = pair_batch(smollm_tokenizer, cfg)
    inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    with preference.reference_policy(model):
        reference = preference.pair_logps(model, inputs, b["labels"])[0]
    with torch.no_grad():
        base = preference_loss.sequence_logps(model.get_base_model()(**inputs).logits, b["labels"])[0]
        lora_b = {n: p.clone() for n, p in model.named_parameters() if "lora_B" in n}
        for n, p in model.named_parameters():
            if n in lora_b:
                p.zero_()  # B = 0: the adapted model is the base
        zeroed = preference.pair_logps(model, inputs, b["labels"])[0]
        for n, p in model.named_parameters():
            if n in lora_b:
                p.copy_(lora_b[n])
    policy = preference.pair_logps(model, inputs, b["labels"])[0]
    torch.testing.assert_close(reference, zeroed, rtol=0, atol=1e-5)
    assert not torch.allclose(policy.detach(), reference, atol=1e-3)  # the adapter was on again
    assert base.shape == reference.shape
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())  # flags restored


def test_held_out_reference_logps_are_computed_once_per_run(four_bit, smollm_tokenizer):
    """A run's first evaluation keeps the reference policy's log-probabilities of the held-out pairs; later ones
    reuse them (the base is frozen) and give what a full evaluation gives, after the adapter has changed."""
    from qlora import distributed
    cfg, model = four_bit
    rows = [PAIR, {"prompt": "2+2?", "chosen": "4", "rejected": "Five, I think."}, {**PAIR, "prompt": "France?"}]
    examples = make_encoder("preference", cfg.data, smollm_tokenizer)(rows, [False] * 3)
    ctx, pad = distributed.Context(0, 1, torch.device("cpu")), smollm_tokenizer.pad_token_id
    cache: dict = {}
    assert preference.evaluate(model, examples, pad, cfg, ctx, cache) == preference.evaluate(model, examples, pad,
                                                                                              cfg, ctx)
    assert len(cache) == 1
    saved = {n: p.clone() for n, p in model.named_parameters() if "lora_B" in n}
    try:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.add_(torch.randn_like(p), alpha=0.02)  # as a few training steps would
        full = preference.evaluate(model, examples, pad, cfg, ctx)
        reused = preference.evaluate(model, examples, pad, cfg, ctx, cache)
        assert reused == pytest.approx(full, rel=1e-6, abs=1e-7) and full["reward_margin"] != 0
        for key in cache:
            cache[key] = cache[key] + 1.0  # the cached values are the ones used: rewards move by -beta
        shifted = preference.evaluate(model, examples, pad, cfg, ctx, cache)
        assert shifted["chosen_reward"] == pytest.approx(full["chosen_reward"] - cfg.preference.beta, abs=1e-6)
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])


@pytest.mark.parametrize("loss", ["dpo", "orpo", "simpo"])
def test_training_loss_and_gradients_follow_the_formulas(four_bit, smollm_tokenizer, loss):
    cfg, model = four_bit
    cfg = cfg.with_changes({"preference.loss": loss})
    b = pair_batch(smollm_tokenizer, cfg)
    inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    model.zero_grad()
    total, pairs = tasks.for_config(cfg).forward_loss(model, inputs, b["labels"], cfg)
    (total / pairs).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # Independently: per-token log-probabilities by a Python loop over the labelled positions.
    model.zero_grad()
    logits = model(**inputs).logits.float()
    with torch.no_grad(), model.disable_adapter():
        ref_logits = model(**inputs).logits.float()
    rows, n = b["labels"].shape[0], b["labels"].shape[0] // 2
    sums, refs, counts = [], [], []
    for i in range(rows):
        at = [t for t in range(1, b["labels"].shape[1]) if b["labels"][i, t] != IGNORE]
        sums.append(sum(torch.log_softmax(logits[i, t - 1], -1)[b["labels"][i, t]] for t in at))
        refs.append(sum(torch.log_softmax(ref_logits[i, t - 1], -1)[b["labels"][i, t]] for t in at))
        counts.append(len(at))
    p = cfg.preference
    losses = []
    for i in range(n):
        if loss == "dpo":
            m = p.beta * ((sums[i] - refs[i]) - (sums[n + i] - refs[n + i]))
            losses.append(-torch.nn.functional.logsigmoid(m))
        else:
            a_w, a_l = sums[i] / counts[i], sums[n + i] / counts[n + i]
            if loss == "simpo":
                losses.append(-torch.nn.functional.logsigmoid(p.beta * (a_w - a_l) - p.simpo_gamma))
            else:
                odds = lambda a: a - torch.log(1 - torch.exp(a))  # noqa: E731
                losses.append(-a_w - p.orpo_lambda * torch.nn.functional.logsigmoid(odds(a_w) - odds(a_l)))
    expected = torch.stack(losses).mean()
    expected.backward()
    assert pairs.item() == n
    torch.testing.assert_close((total / pairs).detach(), expected.detach(), rtol=1e-4, atol=1e-5)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=1e-3, atol=1e-6)


def test_dpo_loss_equals_trl_dpo_trainer(four_bit, smollm_tokenizer, tmp_path):
    """TRL's DPOTrainer on the same peft model, its own tokenization and collation of the same pairs, the same
    beta: its loss on its batch equals ours on that batch (prompt masked by its completion_mask). The reference
    log-probabilities are handed to TRL as precomputed ones (ours, from the adapter toggle tested above): TRL
    1.16's own toggle on this model gave reference == policy (loss log 2), which would compare nothing."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    cfg, model = four_bit
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=0.1, per_device_train_batch_size=2, report_to=[],
                         max_length=64, use_cpu=True, remove_unused_columns=False)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]}
                              for r in (PAIR, {"prompt": "2+2?", "chosen": "4", "rejected": "Five, I think."})])
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=data, processing_class=smollm_tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()  # no dropout either way
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        with preference.reference_policy(model):
            reference = preference.pair_logps(model, inputs, labels)[0]
        total, pairs = preference.forward_loss(model, inputs, labels, cfg.preference)
        trainer.precompute_ref_logps = True
        n = reference.shape[0] // 2
        theirs = trainer.compute_loss(model, {**batch, "ref_chosen_logps": reference[:n],
                                              "ref_rejected_logps": reference[n:]}).item()
    assert theirs == pytest.approx((total / pairs).item(), rel=1e-5, abs=1e-6)
    assert np.isfinite(theirs) and theirs != pytest.approx(np.log(2), abs=1e-4)  # the adapter moved the policy
