"""Which examples each micro-batch of a run holds, and the micro-batch as the model takes it.

The plan is deterministic: micro-batch k of the run is a pure function of k, so a run resumed at step s (on the
same worker count) picks the very examples the uninterrupted run would have.
"""
from __future__ import annotations

import math
import random
from typing import Optional

from qlora import distributed
from qlora.config import JobConfig
from qlora.data import collate, collate_packed, length_grouped_order

# train.group_by_length sorts runs of this many (global) micro-batches by length, as HF's
# LengthGroupedSampler does with its "megabatches": batches of similar length, order still random.
LENGTH_GROUP_BATCHES = 50


class BatchPlan:
    """Deterministic micro-batches: micro-batch k of the run is a pure function of k.

    Epoch e shuffles with seed + e (with train.group_by_length: then sorts runs of batches by length);
    each rank takes its shard. Resuming at step s only needs s. Every micro-batch holds exactly
    train.batch_size examples: the last one of an epoch is topped up from the start of that epoch's order
    (accelerate's even_batches). A short last batch is another shape: compiled layers recompile for it
    (measured on an H200: a 1-row batch at an epoch's end stalled the 8B step for 25 s) and Triton kernels
    specialise again.
    """

    def __init__(self, n_examples: int, cfg: JobConfig, ctx: distributed.Context, lengths: list[int] | None = None):
        self.n, self.cfg, self.ctx, self.lengths = n_examples, cfg, ctx, lengths
        if cfg.train.group_by_length and (lengths is None or len(lengths) != n_examples):
            raise ValueError("train.group_by_length needs the length of every example")
        self.per_epoch = math.ceil(len(distributed.shard(list(range(n_examples)), ctx)) / cfg.train.batch_size)
        steps_per_epoch = max(1, self.per_epoch // cfg.train.gradient_accumulation)
        self.total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
        self._epoch, self._order = None, None

    def micro_batch(self, k: int) -> tuple[int, list[int]]:
        epoch, b = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            if self.cfg.train.group_by_length:
                group = self.cfg.train.batch_size * self.ctx.world_size * LENGTH_GROUP_BATCHES
                order = length_grouped_order(self.lengths, self.cfg.train.seed + epoch, group)
            else:
                order = list(range(self.n))
                random.Random(self.cfg.train.seed + epoch).shuffle(order)
            self._epoch, self._order = epoch, distributed.shard(order, self.ctx)
        bs = self.cfg.train.batch_size
        return epoch, full_batch(self._order, b * bs, bs)


def full_batch(order: list[int], start: int, size: int) -> list[int]:
    """order[start:start + size], wrapping around to the start of `order` for what is missing."""
    batch = order[start:start + size]
    while len(batch) < size:
        batch += order[:size - len(batch)]
    return batch


def train_batch(examples: list[dict], pad_id: int, packed: bool, packed_width: Optional[int] = None) -> dict:
    """A micro-batch as lists: padded examples, or packed rows (position_ids, no attention_mask) padded to
    the longest or to `packed_width`."""
    if packed:
        return collate_packed(examples, pad_id, packed_width)
    batch = collate(examples, pad_id)
    batch["token_mask"] = batch["attention_mask"]
    return batch


def model_inputs(batch: dict) -> dict:
    """What the forward pass gets. Packed rows: position_ids only, so transformers' masking detects the
    packed examples and builds a block-diagonal causal mask; that detection needs attention_mask=None and
    no KV cache (use_cache=False), see transformers.masking_utils.find_packed_sequence_indices."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
