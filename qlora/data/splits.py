"""Which records train and which are held out, and which training subset: seeded, pure functions of the record
count (and labels, for a stratified k-fold split). Preparation selects with them before tokenizing."""
from __future__ import annotations

import random
from typing import Optional, Sequence

from qlora.errors import DataError


def nested_subset(n: int, seed: int, fraction: float = 1.0, max_samples: Optional[int] = None) -> list[int]:
    """Indices of a seeded subset; with one seed, a smaller subset is a prefix of (inside) a larger one."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = max(1, round(n * fraction)) if n else 0
    if max_samples is not None:
        k = min(k, max_samples)
    return order[:k]


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) indices: a seeded shuffle, the first ceil-ish fraction held out (at least 1)."""
    order = list(range(n))
    random.Random(seed ^ 0x5EED).shuffle(order)
    n_eval = min(max(1, round(n * eval_fraction)), n - 1)
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def kfold_indices(labels: Sequence, folds: int, fold: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) indices of fold `fold` of a seeded K-fold split, stratified by `labels` (pass the
    same value for every record for a plain split). Each record is held out in exactly one fold."""
    n = len(labels)
    if n < folds:
        raise DataError(f"data.kfold.folds={folds} folds need at least {folds} records; the data has {n}",
                        "lower data.kfold.folds or add records")
    order = list(range(n))
    random.Random(seed ^ 0xF01D).shuffle(order)
    order.sort(key=lambda i: str(labels[i]))  # stable: shuffled within each label, labels dealt round-robin
    held = {i for pos, i in enumerate(order) if pos % folds == fold}
    return [i for i in range(n) if i not in held], sorted(held)
