"""Sequence classification, the model side: the number of classes, the training loss, and the held-out
metrics (accuracy, log loss). The formats themselves (classification, pairwise) are in qlora/data/classification.py.
"""
from __future__ import annotations

import math

import numpy as np

from qlora import distributed
from qlora.config import JobConfig
from qlora.data import batched, collate, to_tensors
from qlora.errors import DataError

LOG_LOSS_EPS = 1e-15  # probabilities are clipped to [eps, 1 - eps] for log_loss (the Kaggle / sklearn definition)


def num_labels(cfg: JobConfig, meta: dict, where: dict) -> int | None:
    """model.num_labels, or the largest label + 1 when unset, after checking every label fits it; `meta` holds
    each split's per-example numbers (qlora.data.examples)."""
    labels = {split: meta[split]["label"] for split in ("train", "eval")}
    n = cfg.model.num_labels
    if n is None:
        n = int(max(labels["train"].max(), labels["eval"].max())) + 1
        if n < 2:
            raise DataError(f"every record of {cfg.data.path} has label 0: a classifier needs at least two classes",
                            "check data.label_column, or set model.num_labels")
    for split in ("train", "eval"):
        bad = np.flatnonzero(labels[split] >= n)
        if len(bad):
            i = bad[np.argmin(meta[split]["record"][bad])]
            label, record = int(labels[split][i]), int(meta[split]["record"][i]) + 1
            raise DataError(f"data file {where[split]}, record {record}: label {label} is outside 0..{n - 1} "
                            f"(model.num_labels={n})", f"raise model.num_labels to at least {label + 1}, or fix the record")
    return n


# --- loss and held-out metrics -------------------------------------------------------------------------

def losses(logits, labels):
    """(summed cross-entropy over the batch, number of examples): the training loss of a classifier."""
    import torch.nn.functional as F
    return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.new_tensor(labels.numel())


def probabilities(model, examples: list[dict], pad_id: int, batch_size: int, device) -> list[list[float]]:
    """Class probabilities for each example (one process, no reduction)."""
    import torch
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


def evaluate(model, examples: list[dict], pad_id: int, batch_size: int, ctx, predictions: list | None = None,
             where: str = "") -> dict:
    """accuracy, log_loss and eval_loss (mean cross-entropy, the metric sweeps use) over all ranks. This
    rank's per-record predictions are appended to `predictions` when it is given (`where`: the held-out
    source, named in each prediction's record as where:record number)."""
    mine, real = distributed.lockstep_share(examples, ctx)
    probs = probabilities(model, mine, pad_id, batch_size, ctx.device)[:real]
    mine = mine[:real]
    labels = [e["label"] for e in mine]
    m = metrics_from(probs, labels)
    if predictions is not None:
        for e, y, p in zip(mine, labels, probs):
            predicted = max(range(len(p)), key=p.__getitem__)
            predictions.append({"record": f"{where}:{e['record'] + 1}", "label": y, "predicted": predicted,
                                "probabilities": p, "correct": predicted == y})
    hits, ce, ll, n = distributed.all_sum([m["hits"], m["ce"], m["log_loss"], m["n"]], ctx)
    n = max(n, 1)
    return {"eval_loss": ce / n, "accuracy": hits / n, "log_loss": ll / n}
