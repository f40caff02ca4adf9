"""The stages every preparation shares, whatever runs them (this process, or Ray Data on the cluster): which
records are selected (held-out split, k-fold, nested subset), how a selected record becomes an example, and
what is computed over the whole set from a few numbers per example (kept examples, statistics, the packing
plan). Both executors produce the same examples and the same per-example numbers, so they end in the same
index (tests/e2e/test_data_pipeline.py compares them batch by batch).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from qlora.config import CLASSIFICATION_FORMATS, DataSection
from qlora.data import classification, preference, splits
from qlora.data.batches import IGNORE, pack_plan
from qlora.data.formats import Encoder
from qlora.errors import DataError

META_COLUMNS = ("position", "record", "tokens", "length", "truncated", "trained", "cut", "label")


@dataclass(frozen=True)
class Selection:
    """Record indices (of the training source) of the training examples, in training order (a nested
    seeded subset), and of the held-out examples taken from the same source (none with data.eval_path)."""
    train: list[int]
    eval: list[int]


def select(n: int, cfg: DataSection, labels: Optional[Sequence] = None, where: str = "") -> Selection:
    """data.eval_path / data.kfold / data.eval_fraction, then data.fraction / max_samples and
    eval_max_samples, as pure functions of the record count (and labels, for stratified folds)."""
    if cfg.eval_path:
        train_idx, held = list(range(n)), []
    elif cfg.kfold:
        train_idx, held = splits.kfold_indices(list(labels) if labels is not None else [0] * n, cfg.kfold.folds,
                                               cfg.kfold.fold, cfg.seed)
    else:
        if n < 2:
            raise DataError(f"data file {where} has {n} record: too few to hold some out",
                            "add records or set data.eval_path")
        train_idx, held = splits.split_indices(n, cfg.eval_fraction, cfg.seed)
    if round(len(train_idx) * cfg.fraction) == 0:
        raise DataError(f"data.fraction={cfg.fraction:g} of the {len(train_idx)} training records is 0 records",
                        f"raise data.fraction to at least {1 / len(train_idx):.3g}, or add records")
    chosen = splits.nested_subset(len(train_idx), cfg.seed, cfg.fraction, cfg.max_samples)
    return Selection([train_idx[i] for i in chosen], held[:cfg.eval_max_samples] if cfg.eval_max_samples else held)


def eval_selection(n: int, cfg: DataSection) -> list[int]:
    """Records of data.eval_path held out: all of them, or the first eval_max_samples."""
    return list(range(min(n, cfg.eval_max_samples or n)))


def make_encoder(fmt: str, cfg: DataSection, tokenizer) -> Callable[[Sequence[dict], Sequence[bool]], list[dict]]:
    """records, held_out flags -> examples: token ids with labels (generation formats) or a class label."""
    if fmt in CLASSIFICATION_FORMATS:
        return lambda records, held_out: [classification.encode(r, fmt, cfg, tokenizer) for r in records]
    if fmt == "preference":
        return preference.PairEncoder(tokenizer, cfg).encode_many
    return Encoder(tokenizer, fmt, cfg).encode_many


def meta(example: dict, position: int, record: int) -> dict:
    """The numbers per example the whole-set stages need (META_COLUMNS)."""
    n = len(example["input_ids"])
    if "rejected_input_ids" in example:  # a pair: both sides' tokens; trained only while both answers keep some
        n += len(example["rejected_input_ids"])
        sides = [sum(t != IGNORE for t in example[k]) for k in ("labels", "rejected_labels")]
        trained, cut, label = sum(sides) if min(sides) else 0, example["trained_tokens_cut"], example["label"]
    elif "label" in example:  # a classifier's loss is on its label: every token counts, truncation cuts text
        trained, cut, label = n, 0, example["label"]
    else:
        trained, cut, label = sum(t != IGNORE for t in example["labels"]), example["trained_tokens_cut"], -1
    return {"position": position, "record": record, "tokens": n, "length": example["length"],
            "truncated": bool(example["truncated"]), "trained": trained, "cut": cut, "label": label}


def meta_table(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    """Per-example numbers as columns, in position order."""
    rows = sorted(rows, key=lambda r: r["position"])
    return {c: np.array([r[c] for r in rows], dtype=bool if c == "truncated" else np.int64) for c in META_COLUMNS}


@dataclass
class PreparedData:
    """What training and evaluation read. `train` holds the training items in plan order (examples, or
    packed rows with data.packing), `examples` the training examples before packing; both are sequences of
    dicts, in memory or memory-mapped from the cache."""
    train: Sequence[dict]
    eval: Sequence[dict]
    fmt: str
    stats: dict
    data_hash: str
    lengths: list[int]                      # tokens of each training item (train.group_by_length, --dry-run)
    examples: Sequence[dict] = ()
    meta: dict = field(default_factory=dict)  # split -> per-example numbers of the kept examples (examples.META_COLUMNS)
    where: dict = field(default_factory=dict)  # split -> the source its records came from
    cache: str = ""                          # the cache folder (empty: prepared in memory only)
    reused: bool = False                     # the cache was complete before this job
    work: dict = field(default_factory=dict)   # how it was prepared: executor, seconds, nodes (the manifest's)


@dataclass
class Index:
    """What the whole set determines: the training items (example positions, or packed rows of them), the
    held-out positions kept, and the statistics --dry-run prints."""
    train: list[int]                       # positions of the training examples kept (some answer token left)
    eval: list[int]                        # positions of the held-out examples kept
    packing: Optional[list[list[int]]]     # rows of indices into `train` (data.packing), else None
    lengths: list[int]                     # tokens of each training item (an example, or a packed row)
    stats: dict = field(default_factory=dict)


def build_index(fmt: str, cfg: DataSection, train: dict[str, np.ndarray], held: dict[str, np.ndarray]) -> Index:
    """Kept examples, statistics and the packing plan from the per-example numbers (meta_table)."""
    classifying = fmt in CLASSIFICATION_FORMATS
    stats = example_stats(train, classifying)
    kept = np.flatnonzero((train["trained"] > 0) | (train["label"] >= 0))  # a class label is always trained
    if not len(kept):
        raise DataError(f"all {len(train['position'])} training examples lose every answer token to truncation at "
                        f"data.max_length={cfg.max_length}", "raise data.max_length (see the token-length percentiles)")
    stats["dropped_no_labels"] = int(len(train["position"]) - len(kept))
    if fmt == "preference":  # ties carry no preference: dropped, counted apart from pairs truncation emptied
        stats["ties_dropped"] = int((train["label"] == preference.TIE).sum())
        stats["dropped_no_labels"] -= stats["ties_dropped"]
    eval_kept = np.flatnonzero((held["trained"] > 0) | (held["label"] >= 0))
    if not len(eval_kept):
        raise DataError("no held-out example keeps an answer token after truncation",
                        "raise data.max_length or check data.eval_path")
    lengths = train["tokens"][kept].tolist()
    packing = None
    if cfg.packing:
        packing = pack_plan(lengths, cfg.max_length)
        stats["packed_rows"] = len(packing)
        stats["packed_row_fill"] = sum(lengths) / (len(packing) * cfg.max_length)  # real tokens / row capacity
        lengths = [sum(lengths[i] for i in row) for row in packing]
    if classifying:
        stats["label_counts"] = {int(k): int(v) for k, v in zip(*np.unique(train["label"], return_counts=True))}
    return Index(kept.tolist(), eval_kept.tolist(), packing, lengths, stats)


def example_stats(m: dict[str, np.ndarray], classifying: bool = False) -> dict:
    """Token lengths (before truncation: what max_length cuts), truncation and masking over all examples."""
    lengths = np.sort(m["length"])
    count = len(lengths)

    def pct(q):
        return int(lengths[min(count - 1, int(q * count))])

    tokens, trained, cut = int(m["tokens"].sum()), int(m["trained"].sum()), int(m["cut"].sum())
    truncated = int(m["truncated"].sum())
    return {"records": count, "token_length_p50": pct(0.5), "token_length_p95": pct(0.95),
            "token_length_max": int(lengths[-1]), "truncated_fraction": truncated / count,
            "truncated_examples": truncated, "trained_tokens_cut": cut,
            "trained_tokens_cut_fraction": cut / max(1, trained + cut),
            "masked_label_fraction": 0.0 if classifying else (tokens - trained) / max(1, tokens),
            "tokens": tokens, "trained_tokens": trained}
