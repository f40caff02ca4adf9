"""MMLU-style multiple-choice scoring: the model's next-token logits of the answer letters after the prompt.

A record is {question, choices: [..], answer: letter or 0-based index}. The prompt is rendered exactly as
training renders a `multiple_choice` record (the same Encoder, chat template and system prompt), and each
letter's token is the first token of that letter rendered as the answer segment, so a model trained on
such records is scored on the very token it learned to emit. No generation: one forward pass per batch.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from qlora import distributed
from qlora.config import JobConfig
from qlora.data import Encoder, as_alpaca, collate, records, sources
from qlora.errors import DataError

FORMAT = "multiple_choice"
KEY = "evaluation.multiple_choice_path"


def letter_token_ids(answer_ids: Callable[[str], list[int]], letters: Sequence[str]) -> list[int]:
    """The first token of each letter as an answer; they must differ, or the logits cannot tell them apart.
    `answer_ids(letter)` tokenizes the answer segment a record with that letter as its answer would train on."""
    ids = [answer_ids(letter)[0] for letter in letters]
    if len(set(ids)) != len(ids):
        raise DataError(f"the answer letters {list(letters)} do not start with distinct tokens ({ids}) for this "
                        "tokenizer, so their logits cannot be compared", "use another tokenizer, or fewer choices")
    return ids


def pick(last_logits: torch.Tensor, letter_ids: Sequence[int]) -> int:
    """Index of the choice whose letter token has the highest next-token logit (ties: the first)."""
    return int(torch.argmax(last_logits[list(letter_ids)]).item())


def prepare(cfg: JobConfig, tokenizer) -> list[dict]:
    """Held-out items {prompt_ids, letter_ids, answer}: [] when no file is configured. Raises DataError."""
    path = cfg.evaluation.multiple_choice_path
    if not path:
        return []
    # A hub dataset is read from its test split (MMLU's), or data.eval_split.
    rows = sources.read_records(sources.resolve(path, KEY, cfg.data.eval_split or "test"))
    records.check_records(rows, FORMAT, cfg.data, path)
    enc = Encoder(tokenizer, FORMAT, cfg.data)

    def answer_ids(record: dict) -> Callable[[str], list[int]]:
        def ids(letter: str) -> list[int]:
            segs = enc.segments({**record, "answer": letter})
            return tokenizer.encode(segs[-1][0], add_special_tokens=False)
        return ids

    items = []
    for record in rows:
        letters = [chr(ord("A") + i) for i in range(len(record["choices"]))]
        items.append({"prompt_ids": enc.encode(record)["prompt_ids"],
                      "letter_ids": letter_token_ids(answer_ids(record), letters),
                      "answer": letters.index(as_alpaca(record, FORMAT)["output"])})
    return items


@torch.no_grad()
def letter_logits(model, items: list[dict], pad_id: int, batch_size: int, device) -> list[list[float]]:
    """Each item's next-token logits of its answer letters after its prompt."""
    model.eval()
    out: list[list[float]] = []
    for i in range(0, len(items), batch_size):
        batch = items[i:i + batch_size]
        # Left padding: the last position of every row is its prompt's last token.
        t = collate([{"input_ids": it["prompt_ids"]} for it in batch], pad_id, pad_left=True)
        ids = torch.tensor(t["input_ids"], device=device)
        mask = torch.tensor(t["attention_mask"], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as if unpadded: scores do not depend on the batch
        # logits_to_keep=1: the head runs on the last position only (the vocabulary projection dominates otherwise).
        last = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[:, -1].float()
        out += [row[it["letter_ids"]].tolist() for row, it in zip(last, batch)]
    return out


def accuracy(model, items: list[dict], pad_id: int, batch_size: int, ctx) -> dict:
    """Fraction of items whose highest-logit letter is the right one (each rank scores its share)."""
    mine, real = distributed.lockstep_share(items, ctx)
    scores = letter_logits(model, mine, pad_id, batch_size, ctx.device)[:real]
    hits = sum(pick(torch.tensor(s), range(len(s))) == it["answer"] for s, it in zip(scores, mine))
    hits, n = distributed.all_sum([hits, real], ctx)
    return {"mc_accuracy": hits / max(n, 1)}
