"""Batches of token ids: padding, packing, length-grouped order. Pure functions on plain lists, tested with
sentinel ids (no tokenizer); `to_tensors` turns a collated batch into torch tensors."""
from __future__ import annotations

import bisect
import random
from typing import Optional, Sequence

IGNORE = -100  # label of a position the loss skips (prompt, padding)


def batched(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def to_tensors(batch: dict, device) -> dict:
    import torch  # the pure functions above and below need no torch
    return {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in batch.items()}


def collate(examples: Sequence[dict], pad_id: int, pad_left: bool = False) -> dict:
    """Pad a batch to its longest example. Returns plain lists (torch tensors are made by the caller)."""
    width = max(len(e["input_ids"]) for e in examples)
    out = {"input_ids": [], "labels": [], "attention_mask": []}
    for e in examples:
        n = len(e["input_ids"])
        pad = width - n
        for key, value, fill in (("input_ids", e["input_ids"], pad_id), ("labels", e.get("labels", []), IGNORE),
                                 ("attention_mask", [1] * n, 0)):
            out[key].append([fill] * pad + list(value) if pad_left else list(value) + [fill] * pad)
    if not any(e.get("labels") for e in examples):
        del out["labels"]
    if all("label" in e for e in examples):  # sequence classification: one class per example
        out["labels"] = [e["label"] for e in examples]
    return out


def pack_plan(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Which examples share a row of at most max_length tokens: best-fit decreasing (longest first, each
    into the fullest row it still fits; ties by position, so the result is deterministic). Each row lists
    its examples in dataset order. Needs only the lengths (the cache packs from its index)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []          # example indices per row
    free: list[tuple[int, int]] = []    # (free tokens, row), sorted: the first fit is the fullest row
    for i in order:
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_length={max_length}")
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            room, row = free.pop(j)
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        bisect.insort(free, (room - n, row))
    for members in rows:
        members.sort()  # examples in dataset order inside a row
    return rows


def packed_row(examples: Sequence[dict]) -> dict:
    """Whole examples concatenated into one row. `position_ids` restart at 0 for every example, which is
    how the model's attention mask keeps examples apart (transformers builds a block-diagonal causal mask
    from restarting positions when no attention_mask is given). Each example's first label is masked: that
    token would otherwise be predicted from the previous example's last token; unpacked, it is never
    predicted either, so a packed row has exactly the loss terms of its examples run alone."""
    row = {"input_ids": [], "labels": [], "position_ids": [], "example_lengths": []}
    for e in examples:
        n = len(e["input_ids"])
        row["input_ids"] += e["input_ids"]
        row["labels"] += [IGNORE] + list(e["labels"][1:])
        row["position_ids"] += list(range(n))
        row["example_lengths"].append(n)
    return row


def pack_examples(examples: Sequence[dict], max_length: int) -> list[dict]:
    """Tokenized examples packed into rows of at most max_length tokens (pack_plan, then packed_row)."""
    return [packed_row([examples[i] for i in members])
            for members in pack_plan([len(e["input_ids"]) for e in examples], max_length)]


def collate_packed(rows: Sequence[dict], pad_id: int, width: Optional[int] = None) -> dict:
    """Right-pad packed rows to the longest, or to `width` (compiled layers: one shape every step, no
    recompiling). No attention_mask on purpose: the model must see only position_ids to detect the packed
    examples. Padding gets its own positions from 0, so it is one more separate sequence that no real token
    attends to; `token_mask` marks real tokens (for counting)."""
    longest = max(len(r["input_ids"]) for r in rows)
    if width is not None and width < longest:
        raise ValueError(f"a packed row of {longest} tokens does not fit width {width}")
    width = width or longest
    out = {"input_ids": [], "labels": [], "position_ids": [], "token_mask": []}
    for r in rows:
        n = len(r["input_ids"])
        pad = width - n
        out["input_ids"].append(list(r["input_ids"]) + [pad_id] * pad)
        out["labels"].append(list(r["labels"]) + [IGNORE] * pad)
        out["position_ids"].append(list(r["position_ids"]) + list(range(pad)))
        out["token_mask"].append([1] * n + [0] * pad)
    return out


def length_grouped_order(lengths: Sequence[int], seed: int, group: int) -> list[int]:
    """A seeded shuffle, then each run of `group` indices sorted longest first: consecutive batches cut
    from it hold examples of similar length. With `group` a multiple of the batch size times the world
    size, every micro-batch (on every rank) comes from one sorted run."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    out: list[int] = []
    for start in range(0, len(order), group):
        out += sorted(order[start:start + group], key=lambda i: -lengths[i])
    return out


def padding_efficiency(batches: Sequence[Sequence[int]]) -> float:
    """Fraction of real (non-pad) tokens when each batch of lengths is padded to its longest."""
    real = sum(sum(b) for b in batches)
    total = sum(max(b) * len(b) for b in batches if b)
    return real / max(total, 1)
