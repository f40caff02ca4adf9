"""Held-out metrics: token loss / perplexity, and exact match of greedy generations."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from qlora import distributed
from qlora.data import IGNORE, batched, collate, to_tensors


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token loss, count of labelled tokens). Position t predicts label t+1."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, (shift_labels != IGNORE).sum()


# fp32 logits one held-out forward may hold: evaluation.batch_size rows of max_length tokens over a 150k
# vocabulary would otherwise need tens of GiB (16 x 2048 x 152k x 4 B = 19 GiB, twice with the log-softmax)
# where the training step, with its fused loss, needed a fraction of that.
EVAL_LOGIT_BYTES = 2 * 2**30
EVAL_BYTES_PER_LOGIT = 3 * 4  # fp32 logits, the log-softmax and the reshaped copy token_losses makes


def rows_per_forward(batch_size: int, max_tokens: int, vocab: int, budget: int = EVAL_LOGIT_BYTES) -> int:
    """Rows of an evaluation batch one forward pass takes, so its logits stay within `budget` bytes."""
    return max(1, min(batch_size, budget // (EVAL_BYTES_PER_LOGIT * max_tokens * vocab)))


@torch.no_grad()
def eval_loss(model, examples: list[dict], pad_id: int, batch_size: int, ctx,
              logit_budget: int = EVAL_LOGIT_BYTES) -> dict:
    model.eval()
    total, count = 0.0, 0
    vocab = model.get_output_embeddings().weight.shape[0]
    mine, real = distributed.lockstep_share(examples, ctx)
    mine = mine[:real] + [{**e, "labels": [IGNORE] * len(e["labels"])} for e in mine[real:]]  # count nothing
    # Lockstep ranks must split every batch alike, so they size the split by the longest example of all.
    longest = max((len(e["input_ids"]) for e in examples), default=1) if ctx.sharded else None
    for batch in batched(mine, batch_size):
        rows = rows_per_forward(len(batch), longest or max(len(e["input_ids"]) for e in batch), vocab, logit_budget)
        for part in batched(batch, rows):
            t = to_tensors(collate(part, pad_id), ctx.device)
            out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
            loss, n = token_losses(out.logits, t["labels"])
            total, count = total + loss.item(), count + n.item()
    total, count = distributed.all_sum([total, count], ctx)
    mean = total / max(count, 1)
    return {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50))}


@torch.no_grad()
def generate(model, prompts: list[list[int]], tokenizer, max_new_tokens: int, device: torch.device,
             synced: bool = False) -> list[str]:
    """Greedy completions of already-tokenized prompts (left-padded batch). `synced`: ranks whose weights are
    sharded keep stepping until every rank's batch has finished (each step is a collective)."""
    model.eval()
    t = to_tensors(collate([{"input_ids": p} for p in prompts], tokenizer.pad_token_id, pad_left=True), device)
    out = model.generate(input_ids=t["input_ids"], attention_mask=t["attention_mask"], max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id, use_cache=True, synced_gpus=synced)
    return [tokenizer.decode(row[t["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]


def answers(model, examples: list[dict], tokenizer, cfg, device: torch.device, synced: bool = False) -> list[str]:
    """Greedy answers to the examples' prompts; `cfg` is the evaluation section."""
    out: list[str] = []
    for batch in batched(examples, cfg.batch_size):
        out += generate(model, [e["prompt_ids"] for e in batch], tokenizer, cfg.max_new_tokens, device, synced)
    return out


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def final_number(text: str):
    """The answer's final number, GSM8K-style: the last number after the last '####' if there is one, else
    the last number of the text; commas dropped, compared as a value ("72.0" == "72"). None if none."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = NUMBER.findall(tail)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def prediction_records(examples: list[dict], predicted: list[str], tokenizer, answer_metric: str) -> list[dict]:
    """One line of predictions.jsonl per generated example (the train job and ray_jobs.evaluate write these)."""
    out = []
    for e, a in zip(examples, predicted):
        rec = {"prompt": tokenizer.decode(e["prompt_ids"]), "answer": a, "reference": e["reference"],
               "correct": a == e["reference"]}
        if answer_metric == "final_number":
            rec["final_number_correct"] = final_number(a) is not None and final_number(a) == final_number(e["reference"])
        out.append(rec)
    return out


def generation_metrics(records: list[dict]) -> tuple[float, ...]:
    """(examples, exact hits, final-number hits) of prediction records, summed across ranks by the caller."""
    return (len(records), sum(r["correct"] for r in records), sum(r.get("final_number_correct", False) for r in records))


def exact_match(model, examples: list[dict], tokenizer, cfg, ctx, predictions: list | None = None) -> dict:
    """Fraction of held-out prompts whose greedy answer equals the reference answer exactly (and, with
    cfg.answer_metric=final_number, whose final number does). This rank's prediction records are appended
    to `predictions` when it is given."""
    chosen, real = distributed.lockstep_share(examples[:cfg.num_generate], ctx)
    predicted = answers(model, chosen, tokenizer, cfg, ctx.device, synced=ctx.sharded)
    records = prediction_records(chosen[:real], predicted[:real], tokenizer, cfg.answer_metric)
    if predictions is not None:
        predictions.extend(records)
    n, hits, number_hits = distributed.all_sum(list(generation_metrics(records)), ctx)
    metrics = {"exact_match": hits / max(n, 1)}
    if cfg.answer_metric == "final_number":
        metrics["final_number_match"] = number_hits / max(n, 1)
    return metrics


def summary(metrics: dict) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))


def write_results(folder: Path, metrics: dict, predictions: list[dict]) -> None:
    """metrics.json and predictions.jsonl in `folder` (the train job's final checkpoint, ray_jobs.evaluate --out)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
    with open(folder / "predictions.jsonl", "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in predictions)
