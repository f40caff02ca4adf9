"""Held-out metrics: token loss / perplexity, and exact match of greedy generations."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qlora import distributed
from qlora.data import IGNORE, collate


def batched(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def to_tensors(batch: dict, device: torch.device) -> dict:
    return {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in batch.items()}


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token loss, count of labelled tokens). Position t predicts label t+1."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, (shift_labels != IGNORE).sum()


@torch.no_grad()
def eval_loss(model, examples: list[dict], pad_id: int, batch_size: int, ctx) -> dict:
    model.eval()
    total, count = 0.0, 0
    for batch in batched(distributed.shard_exact(examples, ctx), batch_size):
        t = to_tensors(collate(batch, pad_id), ctx.device)
        out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
        loss, n = token_losses(out.logits, t["labels"])
        total, count = total + loss.item(), count + n.item()
    total, count = distributed.all_sum([total, count], ctx)
    mean = total / max(count, 1)
    return {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50))}


@torch.no_grad()
def generate(model, prompts: list[list[int]], tokenizer, max_new_tokens: int, device: torch.device) -> list[str]:
    """Greedy completions of already-tokenized prompts (left-padded batch)."""
    model.eval()
    t = to_tensors(collate([{"input_ids": p} for p in prompts], tokenizer.pad_token_id, pad_left=True), device)
    out = model.generate(input_ids=t["input_ids"], attention_mask=t["attention_mask"], max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    return [tokenizer.decode(row[t["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]


def answers(model, examples: list[dict], tokenizer, cfg, device: torch.device) -> list[str]:
    """Greedy answers to the examples' prompts; `cfg` is the evaluation section."""
    out: list[str] = []
    for batch in batched(examples, cfg.batch_size):
        out += generate(model, [e["prompt_ids"] for e in batch], tokenizer, cfg.max_new_tokens, device)
    return out


def exact_match(model, examples: list[dict], tokenizer, cfg, ctx) -> dict:
    """Fraction of held-out prompts whose greedy answer equals the reference answer exactly."""
    chosen = distributed.shard_exact(examples[:cfg.num_generate], ctx)
    hits = sum(a == e["reference"] for a, e in zip(answers(model, chosen, tokenizer, cfg, ctx.device), chosen))
    hits, n = distributed.all_sum([hits, len(chosen)], ctx)
    return {"exact_match": hits / max(n, 1)}


def evaluate(model, examples: list[dict], tokenizer, cfg, ctx) -> dict:
    """All held-out metrics the config asks for; `cfg` is the JobConfig."""
    if cfg.model.task == "sequence_classification":  # accuracy and log loss; nothing to generate
        from qlora import classification
        return classification.evaluate(model, examples, tokenizer.pad_token_id, cfg.evaluation.batch_size, ctx)
    metrics = eval_loss(model, examples, tokenizer.pad_token_id, cfg.evaluation.batch_size, ctx)
    if cfg.evaluation.generate:
        metrics.update(exact_match(model, examples, tokenizer, cfg.evaluation, ctx))
    return metrics
