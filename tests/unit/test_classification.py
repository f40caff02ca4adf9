"""Sequence classification without a cluster: pairwise rendering and labels, truncation budgets and
k-fold splits with sentinel ids, record and label checks with clear errors, the config rules, and the
LoRA count of a 4-bit classifier (the new head is trained whole, not counted as LoRA)."""
import json

import pytest
import torch

from qlora import classification as cls
from qlora import modeling, tasks
from qlora.config import DataSection, JobConfig, load_config
from qlora.data import classification as formats
from qlora.data import collate, kfold_indices, prepare_in_memory
from qlora.errors import ConfigError, DataError
from qlora.model_source import ModelSource

from conftest import ROOT


def test_parse_turns_reads_arena_json_lists_and_plain_strings():
    assert formats.parse_turns('["Hi", "And then?"]') == ["Hi", "And then?"]
    assert formats.parse_turns('["Hi", null]') == ["Hi", ""]  # arena files hold nulls for failed turns
    assert formats.parse_turns("just text") == ["just text"]
    assert formats.parse_turns("[not json]") == ["[not json]"]
    assert formats.parse_turns('[1, 2]') == ['[1, 2]']  # a list of numbers is text, not turns
    assert formats.parse_turns(None) is None and formats.parse_turns(3) is None


@pytest.mark.parametrize("flags, label", [((1, 0, 0), 0), ((0, 1, 0), 1), ((0, 0, 1), 2), (("0", "0", "1"), 2),
                                          ((True, False, False), 0), ((0.0, 1.0, 0.0), 1)])
def test_pairwise_label_follows_the_winner_flag(flags, label):
    record = dict(zip(formats.PAIRWISE_LABELS, flags), prompt="p", response_a="a", response_b="b")
    assert formats.record_problem(record, "pairwise", DataSection(path="x")) is None
    assert formats.pairwise_label(record) == label


@pytest.mark.parametrize("change, problem", [
    ({"winner_model_b": 1}, "not exactly one 1"),
    ({"winner_model_a": 0}, "not exactly one 1"),
    ({"winner_tie": "yes"}, "not exactly one 1"),
    ({"response_b": None}, "'response_b' is null or missing"),
    ({"prompt": 5}, "'prompt' is int, not a string"),
])
def test_bad_pairwise_records_are_named(change, problem):
    record = {"prompt": "p", "response_a": "a", "response_b": "b", "winner_model_a": 1, "winner_model_b": 0,
              "winner_tie": 0, **change}
    assert problem in formats.record_problem(record, "pairwise", DataSection(path="x"))


def test_class_labels():
    assert [formats.class_label(v) for v in (0, 3, "2", 1.0)] == [0, 3, 2, 1]
    assert [formats.class_label(v) for v in (-1, "pos", 1.5, None, True)] == [None] * 5


def test_part_budgets_keep_short_parts_and_share_the_rest():
    assert formats.part_budgets([3, 4, 5], 20) == [3, 4, 5]          # everything fits
    assert formats.part_budgets([2, 50, 50], 20) == [2, 9, 9]        # the short prompt stays whole
    assert formats.part_budgets([50, 50, 50], 31) == [11, 10, 10]    # remainder one token each
    assert sum(formats.part_budgets([7, 100, 3, 40], 33)) == 33


def test_build_input_cuts_each_text_not_the_markers():
    parts = [([91], False), ([1, 1, 1, 1, 1, 1], True), ([92], False), ([2, 2, 2, 2], True), ([93], False),
             ([3, 3, 3, 3, 3], True)]
    ex = formats.build_input([0], parts, max_length=10)
    # 4 fixed tokens (BOS + 3 markers) leave 6 for the texts: 2 each; response B keeps its tail marker intact
    assert ex["input_ids"] == [0, 91, 1, 1, 92, 2, 2, 93, 3, 3]
    assert ex["truncated"] and ex["length"] == 19
    assert formats.build_input([], [([5, 6], True)], 8) == {"input_ids": [5, 6], "length": 2, "truncated": False}
    with pytest.raises(DataError, match="raise data.max_length"):
        formats.build_input([0], parts, max_length=3)


def test_pairwise_texts_mark_the_three_parts():
    record = {"prompt": '["Q1", "Q2"]', "response_a": '["A1", "A2"]', "response_b": "B"}
    text = "".join(t for t, _ in formats.pairwise_texts(record))
    assert text == "Prompt:\nQ1\n\nQ2\n\nResponse A:\nA1\n\nA2\n\nResponse B:\nB"


def test_kfold_folds_are_disjoint_cover_everything_and_are_seeded():
    labels = [i % 3 for i in range(50)]
    held = [kfold_indices(labels, 5, f, seed=1)[1] for f in range(5)]
    assert sorted(i for h in held for i in h) == list(range(50))  # every record held out exactly once
    for f in range(5):
        train, ev = kfold_indices(labels, 5, f, seed=1)
        assert not set(train) & set(ev) and len(train) + len(ev) == 50
        assert {labels[i] for i in ev} == {0, 1, 2} and len(ev) == 10  # stratified: every class in every fold
    assert kfold_indices(labels, 5, 0, seed=1) == kfold_indices(labels, 5, 0, seed=1)
    assert kfold_indices(labels, 5, 0, seed=2) != kfold_indices(labels, 5, 0, seed=1)
    with pytest.raises(DataError, match="lower data.kfold.folds"):
        kfold_indices([0, 1], 3, 0, seed=0)


def test_collate_carries_one_class_per_example():
    batch = collate([{"input_ids": [5, 6, 7], "label": 2}, {"input_ids": [8], "label": 0}], pad_id=0)
    assert batch["input_ids"] == [[5, 6, 7], [8, 0, 0]] and batch["labels"] == [2, 0]
    assert batch["attention_mask"] == [[1, 1, 1], [1, 0, 0]]


def test_metrics_from_probabilities():
    m = cls.metrics_from([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], [0, 1, 1])
    assert m["hits"] == 2 and m["n"] == 3
    assert m["ce"] == pytest.approx(-(torch.tensor([0.9, 0.8, 0.4]).log().sum().item()), rel=1e-6)
    assert cls.metrics_from([[1.0, 0.0]], [1])["log_loss"] == pytest.approx(-torch.tensor(1e-15).double().log().item())


# --- config rules --------------------------------------------------------------------------------------

def _load(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return load_config(p)


@pytest.mark.parametrize("text, message", [
    ("model: {task: sequence_classification}\ndata: {path: x.tsv}\n", "set data.format=classification"),
    ("data: {path: x.tsv, format: pairwise}\n", "set model.task=sequence_classification"),
    ("model: {num_labels: 3}\ndata: {path: x.jsonl}\n", "model.task is causal_lm"),
    ("model: {task: sequence_classification, num_labels: 1}\ndata: {path: x, format: classification}\n",
     "model.num_labels: Input should be greater than or equal to 2"),
    ("data: {path: x, kfold: {folds: 5, fold: 5}}\n", "choose a fold from 0 to 4"),
    ("data: {path: x, kfold: {folds: 1, fold: 0}}\n", "data.kfold.folds: Input should be greater than or equal to 2"),
    ("data: {path: x, eval_path: y, kfold: {folds: 5, fold: 0}}\n", "keep one"),
    ("data: {path: x}\nlora: {skip_first_layers: 2, layers_to_transform: [3]}\n", "keep one"),
])
def test_config_refuses_contradictions(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text)
    assert message in str(err.value)


def test_shipped_classification_configs_load():
    for name in ("pairwise_preference_gemma2", "sst2_classification", "cpu/sst2_classification",
                 "cpu/pairwise_preference"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.model.task == "sequence_classification", name
    gemma = load_config(ROOT / "configs" / "pairwise_preference_gemma2.yaml")
    assert gemma.train.optimizer == "adamw_8bit" and gemma.scaling.use_gpu and gemma.lora.skip_first_layers > 0
    assert gemma.lora.target_modules == ["q_proj", "k_proj", "v_proj"] and gemma.data.kfold.folds == 5


# --- files and tokenizer -------------------------------------------------------------------------------

def _data(tmp_path, rows, fmt="classification", **extra) -> DataSection:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DataSection(path=str(path), format=fmt, **extra)


def test_sst2_sample_reads_with_its_column_names(smollm_tokenizer):
    cfg = DataSection(path=str(ROOT / "data" / "sst2_sample.tsv"), eval_path=str(ROOT / "data" / "sst2_dev_sample.tsv"),
                      format="classification", text_column="sentence", max_length=64)
    data = prepare_in_memory(cfg, smollm_tokenizer)
    assert len(data.train) == 320 and len(data.eval) == 128 and data.stats["label_counts"] == {0: 160, 1: 160}
    first = data.train[0]
    assert first["input_ids"][-1] != smollm_tokenizer.eos_token_id  # the head pools the last real token
    assert data.eval[0]["record"] == 0 and data.where["eval"] == cfg.eval_path


def test_pairwise_sample_kfold_and_labels(smollm_tokenizer):
    cfg = DataSection(path=str(ROOT / "data" / "pairwise_sample.csv"), format="pairwise", max_length=128,
                      kfold={"folds": 4, "fold": 1})
    data = prepare_in_memory(cfg, smollm_tokenizer)
    assert len(data.train) == 72 and len(data.eval) == 24
    assert {e["label"] for e in data.eval} == {0, 1, 2}
    assert all(len(e["input_ids"]) <= 128 for e in data.train)
    text = smollm_tokenizer.decode(data.eval[0]["input_ids"])
    assert text.startswith("Prompt:\n") and "\n\nResponse A:\n" in text and "\n\nResponse B:\n" in text
    other = prepare_in_memory(cfg.model_copy(update={"kfold": cfg.kfold.model_copy(update={"fold": 2})}), smollm_tokenizer)
    assert not {e["record"] for e in other.eval} & {e["record"] for e in data.eval}


def test_bad_records_and_columns_name_the_fix(tmp_path, smollm_tokenizer):
    with pytest.raises(DataError, match=r"(?s)record 2: 'label' is 'pos'.*fix or drop.*non-negative integer 'label'"):
        prepare_in_memory(_data(tmp_path, [{"text": "a", "label": 0}, {"text": "b", "label": "pos"}]), smollm_tokenizer)
    with pytest.raises(DataError, match="(?s)lacks column.*'sentence'.*set data.text_column"):
        prepare_in_memory(_data(tmp_path, [{"text": "a", "label": 0}] * 3, text_column="sentence"), smollm_tokenizer)
    with pytest.raises(DataError, match="(?s)lacks column.*Chatbot Arena names"):
        prepare_in_memory(_data(tmp_path, [{"text": "a", "label": 0}] * 3, fmt="pairwise"), smollm_tokenizer)


def test_labels_are_checked_against_num_labels(tmp_path, smollm_tokenizer):
    rows = [{"text": f"t{i}", "label": i % 3} for i in range(9)]
    data_cfg = _data(tmp_path, rows, eval_fraction=0.3)
    data = prepare_in_memory(data_cfg, smollm_tokenizer)
    job = JobConfig(model={"task": "sequence_classification"}, data=data_cfg)
    task = tasks.for_config(job)
    assert task.resolve(job, data).model.num_labels == 3  # inferred: largest label + 1
    with pytest.raises(DataError, match=r"d.jsonl, record \d: label 2 is outside 0..1 \(model.num_labels=2\)"):
        task.resolve(job.with_changes({"model.num_labels": 2}), data)
    zeros = _data(tmp_path, [{"text": "a", "label": 0}] * 4)
    with pytest.raises(DataError, match="at least two classes"):
        task.resolve(job.with_changes({"data.path": zeros.path}), prepare_in_memory(zeros, smollm_tokenizer))


# --- model ---------------------------------------------------------------------------------------------

def test_4bit_classifier_lora_count_excludes_the_trained_head(tiny_model_dir):
    cfg = JobConfig(model={"name": str(tiny_model_dir), "task": "sequence_classification", "num_labels": 3},
                    data={"path": "x", "format": "classification"},
                    lora={"target_modules": "all-linear", "skip_first_layers": 1, "r": 4})
    source = ModelSource(str(tiny_model_dir), True, "tiny")
    base = modeling.load_base_model(cfg, source, torch.device("cpu"), pad_token_id=0)
    assert type(base.score).__name__ == "Linear" and base.config.pad_token_id == 0  # head kept in full precision
    model = modeling.attach_lora(base, cfg.lora, cfg.model.task)
    per_layer = 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))  # q, k, v, o, gate, up, down
    assert modeling.lora_param_count(model) == per_layer  # layer 1 only (of 2)
    head = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert head == ["base_model.model.score.modules_to_save.default.weight"]
    logits = model(input_ids=torch.tensor([[5, 6, 7, 0]]), attention_mask=torch.tensor([[1, 1, 1, 0]])).logits
    assert logits.shape == (1, 3)
    with pytest.raises(ConfigError, match="skips every layer"):
        modeling.attach_lora(base, cfg.lora.model_copy(update={"skip_first_layers": 2}))
