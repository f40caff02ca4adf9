"""Preparation in this process: read the sources whole, check every record, select, encode, index. What small
sources use (and what the cache writes for them), and the reference the Ray Data pipeline is tested against.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from qlora.config import DataSection
from qlora.data import records as checks
from qlora.data import sources
from qlora.data.batches import IGNORE, packed_row
from qlora.data.cache import cache_key, tokenizer_fingerprint
from qlora.data.examples import (Index, PreparedData, build_index, eval_selection, make_encoder, meta, meta_table,
                                 select)
from qlora.errors import DataError


@dataclass
class Encoded:
    """Examples of one preparation before indexing: per split, the examples in position order with their
    per-example numbers."""
    fmt: str
    train: list[dict]
    eval: list[dict]
    train_meta: list[dict]
    eval_meta: list[dict]
    where: dict


def resolve_sources(cfg: DataSection) -> tuple[sources.Source, Optional[sources.Source]]:
    train = sources.resolve(cfg.path, "data.path", cfg.split, cfg.subset, cfg.revision)
    held = None
    if cfg.eval_path:
        held = sources.resolve(cfg.eval_path, "data.eval_path", cfg.eval_split or cfg.split, cfg.subset, cfg.revision)
        if train.kind == held.kind == "file" and Path(held.files[0]).samefile(train.files[0]):
            raise DataError(f"data.eval_path is the training file itself ({cfg.path}): held-out metrics would be "
                            "measured on examples the model trains on",
                            "point data.eval_path at a separate file, or unset it to hold out data.eval_fraction "
                            "of data.path")
    return train, held


def encode_in_memory(cfg: DataSection, tokenizer, train_source: sources.Source,
                     held_source: Optional[sources.Source]) -> Encoded:
    records = sources.read_records(train_source)
    fmt = checks.resolve_format(cfg, list(records[0]))
    checks.check_records(records, fmt, cfg, train_source.location)
    labels = None
    if cfg.kfold and fmt in ("classification", "pairwise"):  # stratified folds
        from qlora.data.classification import label_of
        labels = [label_of(r, fmt, cfg) for r in records]
    chosen = select(len(records), cfg, labels, train_source.location)
    encode = make_encoder(fmt, cfg, tokenizer)
    train = encode([records[i] for i in chosen.train], [False] * len(chosen.train))
    where = {"train": train_source.location, "eval": train_source.location}
    if held_source is not None:
        held_records = sources.read_records(held_source)
        checks.check_records(held_records, fmt, cfg, held_source.location)
        held_ids, where["eval"] = eval_selection(len(held_records), cfg), held_source.location
        held = encode([held_records[i] for i in held_ids], [True] * len(held_ids))
    else:
        held_ids = chosen.eval
        held = encode([records[i] for i in held_ids], [True] * len(held_ids))
    for examples, numbers in ((train, chosen.train), (held, held_ids)):
        for e, r in zip(examples, numbers):
            e["record"] = r  # the record number in its source (predictions and errors name it)
    return Encoded(fmt, train, held, [meta(e, p, r) for p, (e, r) in enumerate(zip(train, chosen.train))],
                   [meta(e, p, r) for p, (e, r) in enumerate(zip(held, held_ids))], where)


def assemble(enc: Encoded, index: Index, data_hash: str) -> PreparedData:
    """In-memory PreparedData from encoded examples and their index."""
    examples = [enc.train[i] for i in index.train]
    items = [packed_row([examples[i] for i in row]) for row in index.packing] if index.packing else examples
    held = [enc.eval[i] for i in index.eval]
    kept_meta = {"train": _take(meta_table(enc.train_meta), index.train),
                 "eval": _take(meta_table(enc.eval_meta), index.eval)}
    return PreparedData(items, held, enc.fmt, index.stats, data_hash, index.lengths, examples, kept_meta, enc.where)


def _take(columns: dict[str, np.ndarray], rows: list[int]) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in columns.items()}


def prepare_in_memory(cfg: DataSection, tokenizer) -> PreparedData:
    """Read, check, select, encode and index in this process; everything in memory (data_hash: the cache key)."""
    train_source, held_source = resolve_sources(cfg)
    enc = encode_in_memory(cfg, tokenizer, train_source, held_source)
    index = build_index(enc.fmt, cfg, meta_table(enc.train_meta), meta_table(enc.eval_meta))
    prints = {"train": sources.fingerprint(train_source), "eval": sources.fingerprint(held_source) if held_source else None}
    return assemble(enc, index, cache_key(cfg, tokenizer_fingerprint(tokenizer), prints)[:16])


def sample_segments(example: dict, tokenizer) -> list[tuple[str, bool]]:
    """An example's text as (text, trained) runs, decoded from its ids and labels (what --dry-run shows)."""
    if "label" in example:
        return [(tokenizer.decode(example["input_ids"]), False)]
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(example["input_ids"], example["labels"]):
        trained = label != IGNORE
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(token)
        else:
            runs.append(([token], trained))
    return [(tokenizer.decode(ids), trained) for ids, trained in runs]
