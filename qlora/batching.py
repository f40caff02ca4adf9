"""Which examples each micro-batch of a run holds, which worker runs it, and the micro-batch as the model takes it.

The plan is over global micro-batches: global micro-batch j of the run is a pure function of j, and step s
takes the `per_step` micro-batches from j = s * per_step on (the global batch: train.gradient_accumulation x
scaling.num_workers micro-batches of train.batch_size). Rank r of W workers runs every W-th of them, so the
same examples make the same step whatever the worker count: a run resumed at step s, on as many workers as
before or on fewer or more (scaling.min_workers), picks the examples the uninterrupted run would have.
"""
from __future__ import annotations

import math
import random
from typing import Optional

from qlora import distributed
from qlora.config import JobConfig
from qlora.data import collate, collate_packed, length_grouped_order

# train.group_by_length sorts runs of this many steps' worth of micro-batches by length, as HF's
# LengthGroupedSampler does with its "megabatches": batches of similar length, order still random.
LENGTH_GROUP_BATCHES = 50


class BatchPlan:
    """Deterministic global micro-batches: micro-batch j of the run is a pure function of j.

    Epoch e shuffles with seed + e (with train.group_by_length: then sorts runs of batches by length). Every
    micro-batch holds exactly train.batch_size examples: the last one of an epoch is topped up from the start
    of that epoch's order (accelerate's even_batches). A short last batch is another shape: compiled layers
    recompile for it (measured on an H200: a 1-row batch at an epoch's end stalled the 8B step for 25 s) and
    Triton kernels specialise again.
    """

    def __init__(self, n_examples: int, cfg: JobConfig, lengths: list[int] | None = None):
        self.n, self.cfg, self.lengths = n_examples, cfg, lengths
        if cfg.train.group_by_length and (lengths is None or len(lengths) != n_examples):
            raise ValueError("train.group_by_length needs the length of every example")
        self.per_step = cfg.micro_batches_per_step()
        self.per_epoch = math.ceil(n_examples / cfg.train.batch_size)  # global micro-batches of an epoch
        steps_per_epoch = max(1, self.per_epoch // self.per_step)
        self.total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
        self._epoch, self._order = None, None

    def for_rank(self, step: int, ctx: distributed.Context) -> list[int]:
        """The global micro-batches this rank runs at optimizer step `step` (0-based), in order."""
        self.cfg.accumulation_on(ctx.world_size)  # raises where the workers cannot share a step evenly
        first = step * self.per_step
        return list(range(first + ctx.rank, first + self.per_step, ctx.world_size))

    def micro_batch(self, j: int) -> tuple[int, list[int]]:
        """(epoch, example indices) of global micro-batch j."""
        epoch, b = divmod(j, self.per_epoch)
        if epoch != self._epoch:
            if self.cfg.train.group_by_length:
                group = self.cfg.train.batch_size * self.per_step * LENGTH_GROUP_BATCHES
                order = length_grouped_order(self.lengths, self.cfg.train.seed + epoch, group)
            else:
                order = list(range(self.n))
                random.Random(self.cfg.train.seed + epoch).shuffle(order)
            self._epoch, self._order = epoch, order
        bs = self.cfg.train.batch_size
        return epoch, full_batch(self._order, b * bs, bs)

    def seed(self, j: int) -> int:
        """The RNG seed of global micro-batch j (its dropout masks): the same on any rank and worker count."""
        return self.cfg.train.seed * 1_000_003 + j


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
