"""Sequence classification: labelled records -> token ids + class label, and the held-out metrics.

Two data formats (model.task=sequence_classification):
- classification: one text column and one integer label column (e.g. SST-2's sentence / label).
- pairwise: which of two responses to a prompt is preferred (LMSYS Chatbot Arena columns prompt,
  response_a, response_b, winner_model_a, winner_model_b, winner_tie) -> label 0 (A), 1 (B) or 2 (tie).
  Arena files store each text as a JSON-encoded list of turns ('["Hi", "And then?"]'); plain strings
  work too.

The pure core (`parse_turns`, `pairwise_label`, `part_budgets`, `build_input`, `record_problem`) works on
plain values and is tested with sentinel ids; `prepare` wires it to files and a real tokenizer. The model
pools the last non-padding token (transformers' *ForSequenceClassification), so inputs get no EOS.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Optional, Sequence

from qlora.config import DataSection, JobConfig
from qlora.errors import DataError

PAIRWISE_COLUMNS = ("prompt", "response_a", "response_b", "winner_model_a", "winner_model_b", "winner_tie")
PAIRWISE_LABELS = ("winner_model_a", "winner_model_b", "winner_tie")  # label i <- flag i
# Markers around the three texts of a pairwise record; never truncated.
PAIRWISE_MARKERS = ("Prompt:\n", "\n\nResponse A:\n", "\n\nResponse B:\n")
LOG_LOSS_EPS = 1e-15  # probabilities are clipped to [eps, 1 - eps] for log_loss (the Kaggle / sklearn definition)


# --- pure functions ----------------------------------------------------------------------------------

def parse_turns(value) -> Optional[list[str]]:
    """The turns of a prompt or response: a JSON-encoded list of strings (nulls become "") or a plain
    string (one turn). None if the value is neither."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            turns = json.loads(text)
        except ValueError:
            return [value]  # a plain text that happens to be bracketed
        if isinstance(turns, list) and all(t is None or isinstance(t, str) for t in turns):
            return ["" if t is None else t for t in turns]
    return [value]


def flag(value) -> Optional[int]:
    """A winner flag as 0/1 (ints, bools, "0"/"1", 0.0/1.0), else None."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value.strip())
    return None


def pairwise_label(record: dict) -> int:
    """0 if A won, 1 if B won, 2 for a tie. The caller has checked (record_problem) that one flag is 1."""
    return [flag(record[c]) for c in PAIRWISE_LABELS].index(1)


def class_label(value) -> Optional[int]:
    """A class label as a non-negative int (ints, integral floats, digit strings), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    return value if isinstance(value, int) and value >= 0 else None


def record_problem(record: dict, fmt: str, cfg: DataSection) -> Optional[str]:
    """What is wrong with one record (None if nothing), in words a user can act on."""
    if fmt == "classification":
        text, label = record.get(cfg.text_column), record.get(cfg.label_column)
        if not isinstance(text, str):
            return f"'{cfg.text_column}' is {'null or missing' if text is None else type(text).__name__}, not a string"
        if class_label(label) is None:
            return f"'{cfg.label_column}' is {label!r}, not a non-negative integer class"
        return None
    for column in PAIRWISE_COLUMNS[:3]:
        if parse_turns(record.get(column)) is None:
            value = record.get(column)
            return f"'{column}' is {'null or missing' if value is None else type(value).__name__}, not a string"
    flags = [flag(record.get(c)) for c in PAIRWISE_LABELS]
    if None in flags or sum(flags) != 1:
        shown = ", ".join(f"{c}={record.get(c)!r}" for c in PAIRWISE_LABELS)
        return f"the winner flags ({shown}) are not exactly one 1 and two 0s"
    return None


def part_budgets(lengths: Sequence[int], budget: int) -> list[int]:
    """How many tokens each part keeps so that the total fits `budget`: short parts keep everything and
    the long ones share the rest equally (so a long prompt cannot crowd out both responses)."""
    keep = list(lengths)
    left, open_parts = budget, sorted(range(len(lengths)), key=lambda i: lengths[i])
    while open_parts:
        share = left // len(open_parts)
        i = open_parts[0]
        if lengths[i] <= share:  # fits within an equal share: keep whole, give the rest to the others
            left -= lengths[i]
            open_parts.pop(0)
            continue
        for j in open_parts:  # every remaining part is longer than an equal share
            keep[j] = share
        for j in open_parts[:left - share * len(open_parts)]:
            keep[j] += 1  # the remainder, one token each
        break
    return keep


def build_input(prefix: list[int], parts: Sequence[tuple[list[int], bool]], max_length: int) -> dict:
    """prefix + parts, where parts are (ids, truncatable); truncatable parts are cut (from their end)
    by `part_budgets` so the whole fits max_length. Returns input_ids, length (before cutting), truncated."""
    fixed = len(prefix) + sum(len(ids) for ids, cut in parts if not cut)
    cut_parts = [ids for ids, cut in parts if cut]
    if fixed > max_length:
        raise DataError(f"data.max_length={max_length} leaves no room for the text: the fixed markers alone "
                        f"take {fixed} tokens", f"raise data.max_length well above {fixed}")
    keep = iter(part_budgets([len(ids) for ids in cut_parts], max_length - fixed))
    ids = list(prefix)
    for part, cut in parts:
        ids += part[:next(keep)] if cut else part
    length = fixed + sum(len(p) for p in cut_parts)
    return {"input_ids": ids, "length": length, "truncated": length > max_length}


def pairwise_texts(record: dict) -> list[tuple[str, bool]]:
    """A pairwise record as (text, truncatable) parts: marker, prompt, marker, response A, marker, B."""
    out = []
    for marker, column in zip(PAIRWISE_MARKERS, PAIRWISE_COLUMNS[:3]):
        out += [(marker, False), ("\n\n".join(parse_turns(record[column])), True)]
    return out


def kfold_indices(labels: Sequence, folds: int, fold: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) indices of fold `fold` of a seeded K-fold split, stratified by `labels` (pass the
    same value for every record for a plain split). Each record is held out in exactly one fold."""
    import random
    n = len(labels)
    if n < folds:
        raise DataError(f"data.kfold.folds={folds} folds need at least {folds} records; the data has {n}",
                        "lower data.kfold.folds or add records")
    order = list(range(n))
    random.Random(seed ^ 0xF01D).shuffle(order)
    order.sort(key=lambda i: str(labels[i]))  # stable: shuffled within each label, labels dealt round-robin
    held = {i for pos, i in enumerate(order) if pos % folds == fold}
    return [i for i in range(n) if i not in held], sorted(held)


# --- files and tokenizer -----------------------------------------------------------------------------

def check_columns(records: list[dict], fmt: str, cfg: DataSection, path: str) -> None:
    need = PAIRWISE_COLUMNS if fmt == "pairwise" else (cfg.text_column, cfg.label_column)
    missing = [c for c in need if c not in records[0]]
    if missing:
        fix = ("set data.text_column / data.label_column to the file's column names" if fmt == "classification"
               else "rename the columns to the Chatbot Arena names: " + ", ".join(PAIRWISE_COLUMNS))
        raise DataError(f"data file {path} lacks column(s) {missing} needed by data.format={fmt} "
                        f"(it has {sorted(records[0])})", fix)


def check_records(records: list[dict], fmt: str, cfg: DataSection, path: str) -> None:
    bad = [(i, p) for i, r in enumerate(records) if (p := record_problem(r, fmt, cfg))]
    if bad:
        i, problem = bad[0]
        more = f" (and {len(bad) - 1} more records)" if len(bad) > 1 else ""
        shape = (f"a string '{cfg.text_column}' and a non-negative integer '{cfg.label_column}'"
                 if fmt == "classification" else "string (or JSON list of strings) prompt, response_a and "
                 "response_b, and exactly one of winner_model_a, winner_model_b, winner_tie set to 1")
        raise DataError(f"data file {path}, record {i + 1}: {problem}{more}",
                        f"fix or drop the record(s): every {fmt} record needs {shape}")


def label_of(record: dict, fmt: str, cfg: DataSection) -> int:
    return pairwise_label(record) if fmt == "pairwise" else class_label(record[cfg.label_column])


def encode(record: dict, fmt: str, cfg: DataSection, tokenizer) -> dict:
    return {**encode_input(record, fmt, cfg, tokenizer), "label": label_of(record, fmt, cfg)}


def encode_input(record: dict, fmt: str, cfg: DataSection, tokenizer) -> dict:
    """The model input of a record (its label is not needed: also used for unlabelled predictions)."""
    tok = tokenizer
    # Keep the BOS token the tokenizer adds itself (Gemma and Llama expect it); add nothing else.
    first = tok.encode("a", add_special_tokens=True)[:1]
    prefix = first if tok.bos_token_id is not None and first == [tok.bos_token_id] else []
    texts = pairwise_texts(record) if fmt == "pairwise" else [(record[cfg.text_column], True)]
    parts = [(tok.encode(text, add_special_tokens=False), cut) for text, cut in texts]
    return build_input(prefix, parts, cfg.max_length)


def prepare(cfg: DataSection, tokenizer):
    """Read, check, split (eval_path, kfold or eval_fraction), subset, encode. Raises DataError."""
    from qlora.data import PreparedData, nested_subset, read_records, split_indices
    fmt = cfg.format
    records = read_records(cfg.path)
    check_columns(records, fmt, cfg, cfg.path)
    check_records(records, fmt, cfg, cfg.path)
    sources = [(cfg.path, i + 1) for i in range(len(records))]
    if cfg.eval_path:
        if Path(cfg.eval_path).is_file() and Path(cfg.eval_path).samefile(cfg.path):
            raise DataError(f"data.eval_path is the training file itself ({cfg.path}): held-out metrics would be "
                            "measured on examples the model trains on",
                            "point data.eval_path at a separate file, or unset it to hold out part of data.path")
        eval_records = read_records(cfg.eval_path, "data.eval_path")
        check_columns(eval_records, fmt, cfg, cfg.eval_path)
        check_records(eval_records, fmt, cfg, cfg.eval_path)
        train_idx, train_records = list(range(len(records))), records
        eval_sources = [(cfg.eval_path, i + 1) for i in range(len(eval_records))]
    else:
        if cfg.kfold:
            train_idx, ev = kfold_indices([label_of(r, fmt, cfg) for r in records], cfg.kfold.folds,
                                          cfg.kfold.fold, cfg.seed)
        else:
            if len(records) < 2:
                raise DataError(f"data file {cfg.path} has {len(records)} record: too few to hold some out",
                                "add records or set data.eval_path")
            train_idx, ev = split_indices(len(records), cfg.eval_fraction, cfg.seed)
        train_records, eval_records = [records[i] for i in train_idx], [records[i] for i in ev]
        eval_sources = [sources[i] for i in ev]
    chosen = nested_subset(len(train_records), cfg.seed, cfg.fraction, cfg.max_samples)
    train_records, train_sources = [train_records[i] for i in chosen], [sources[train_idx[i]] for i in chosen]
    if cfg.eval_max_samples:
        eval_records, eval_sources = eval_records[:cfg.eval_max_samples], eval_sources[:cfg.eval_max_samples]
    train = [{**encode(r, fmt, cfg, tokenizer), "source": s} for r, s in zip(train_records, train_sources)]
    evals = [{**encode(r, fmt, cfg, tokenizer), "source": s} for r, s in zip(eval_records, eval_sources)]
    digest = hashlib.sha256(json.dumps([train_records, eval_records], sort_keys=True, default=str).encode())
    sample = tokenizer.decode(train[0]["input_ids"])
    return PreparedData(train, evals, fmt, stats(train), digest.hexdigest()[:16], [(sample, False)])


def stats(examples: list[dict]) -> dict:
    lengths = sorted(e["length"] for e in examples)

    def pct(q):
        return lengths[min(len(lengths) - 1, int(q * len(lengths)))]

    counts: dict[int, int] = {}
    for e in examples:
        counts[e["label"]] = counts.get(e["label"], 0) + 1
    truncated = sum(e["truncated"] for e in examples)
    tokens = sum(len(e["input_ids"]) for e in examples)
    # The keys of data.example_stats, so reports read both alike: a classifier's loss is on its label, so
    # truncation cuts text, never trained tokens, and drops no example.
    return {"records": len(examples), "token_length_p50": pct(0.5), "token_length_p95": pct(0.95),
            "token_length_max": lengths[-1], "truncated_fraction": truncated / len(examples),
            "truncated_examples": truncated, "trained_tokens_cut": 0, "trained_tokens_cut_fraction": 0.0,
            "masked_label_fraction": 0.0, "tokens": tokens, "trained_tokens": tokens, "dropped_no_labels": 0,
            "label_counts": dict(sorted(counts.items()))}


def with_num_labels(cfg: JobConfig, data) -> JobConfig:
    """`cfg` with model.num_labels set (inferred as the largest label + 1 when unset), after checking
    every label fits it. A no-op for causal LM jobs."""
    if cfg.model.task != "sequence_classification":
        return cfg
    examples = data.train + data.eval
    num_labels = cfg.model.num_labels
    if num_labels is None:
        num_labels = max(e["label"] for e in examples) + 1
        if num_labels < 2:
            raise DataError(f"every record of {cfg.data.path} has label 0: a classifier needs at least two classes",
                            "check data.label_column, or set model.num_labels")
    for e in examples:
        if e["label"] >= num_labels:
            path, record = e["source"]
            raise DataError(f"data file {path}, record {record}: label {e['label']} is outside 0..{num_labels - 1} "
                            f"(model.num_labels={num_labels})",
                            f"raise model.num_labels to at least {e['label'] + 1}, or fix the record")
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"num_labels": num_labels})})


# --- loss and held-out metrics -------------------------------------------------------------------------

def losses(logits, labels):
    """(summed cross-entropy over the batch, number of examples): the training loss of a classifier."""
    import torch.nn.functional as F
    return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.new_tensor(labels.numel())


def probabilities(model, examples: list[dict], pad_id: int, batch_size: int, device) -> list[list[float]]:
    """Class probabilities for each example (one process, no reduction)."""
    import torch

    from qlora.data import collate
    from qlora.evaluation import batched, to_tensors
    model.eval()
    out: list[list[float]] = []
    with torch.no_grad():
        for batch in batched(examples, batch_size):
            t = to_tensors(collate(batch, pad_id), device)
            logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
            out += torch.softmax(logits.float(), dim=-1).tolist()
    return out


def metrics_from(probs: list[list[float]], labels: list[int]) -> dict:
    """Sums over one shard: hits, cross-entropy, clipped log loss, count (summed across ranks later)."""
    hits = sum(max(range(len(p)), key=p.__getitem__) == y for p, y in zip(probs, labels))
    ce = sum(-math.log(max(p[y], 1e-45)) for p, y in zip(probs, labels))
    clipped = sum(-math.log(min(max(p[y] / sum(p), LOG_LOSS_EPS), 1 - LOG_LOSS_EPS)) for p, y in zip(probs, labels))
    return {"hits": hits, "ce": ce, "log_loss": clipped, "n": len(labels)}


def evaluate(model, examples: list[dict], pad_id: int, batch_size: int, ctx, predictions: list | None = None) -> dict:
    """accuracy, log_loss and eval_loss (mean cross-entropy, the metric sweeps use) over all ranks. This
    rank's per-record predictions are appended to `predictions` when it is given."""
    from qlora import distributed
    mine, real = distributed.lockstep_share(examples, ctx)
    probs = probabilities(model, mine, pad_id, batch_size, ctx.device)[:real]
    mine = mine[:real]
    labels = [e["label"] for e in mine]
    m = metrics_from(probs, labels)
    if predictions is not None:
        for e, y, p in zip(mine, labels, probs):
            predicted = max(range(len(p)), key=p.__getitem__)
            predictions.append({"record": f"{e['source'][0]}:{e['source'][1]}", "label": y, "predicted": predicted,
                                "probabilities": p, "correct": predicted == y})
    hits, ce, ll, n = distributed.all_sum([m["hits"], m["ce"], m["log_loss"], m["n"]], ctx)
    n = max(n, 1)
    return {"eval_loss": ce / n, "accuracy": hits / n, "log_loss": ll / n}
