"""The classification formats (model.task=sequence_classification):
- classification: one text column and one integer label column (e.g. SST-2's sentence / label).
- pairwise: which of two responses to a prompt is preferred (LMSYS Chatbot Arena columns prompt,
  response_a, response_b, winner_model_a, winner_model_b, winner_tie) -> label 0 (A), 1 (B) or 2 (tie).
  Arena files store each text as a JSON-encoded list of turns ('["Hi", "And then?"]'); plain strings
  work too.

Pure functions on plain values, tested with sentinel ids; `encode` wires them to a real tokenizer. The model
pools the last non-padding token (transformers' *ForSequenceClassification), so inputs get no EOS.
"""
from __future__ import annotations

import json
from typing import Optional, Sequence

from qlora.config import DataSection
from qlora.errors import DataError

PAIRWISE_COLUMNS = ("prompt", "response_a", "response_b", "winner_model_a", "winner_model_b", "winner_tie")
PAIRWISE_LABELS = ("winner_model_a", "winner_model_b", "winner_tie")  # label i <- flag i
# Markers around the three texts of a pairwise record; never truncated.
PAIRWISE_MARKERS = ("Prompt:\n", "\n\nResponse A:\n", "\n\nResponse B:\n")
def parse_turns(value) -> Optional[list[str]]:
    """The turns of a prompt or response: a JSON-encoded list of strings (nulls become "") or a plain
    string (one turn). None if the value is neither."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            turns = json.loads(text)
        except ValueError:
            return [value]  # a plain text that happens to be bracketed
        if isinstance(turns, list) and all(t is None or isinstance(t, str) for t in turns):
            return ["" if t is None else t for t in turns]
    return [value]


def flag(value) -> Optional[int]:
    """A winner flag as 0/1 (ints, bools, "0"/"1", 0.0/1.0), else None."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value.strip())
    return None


def pairwise_label(record: dict) -> int:
    """0 if A won, 1 if B won, 2 for a tie. The caller has checked (record_problem) that one flag is 1."""
    return [flag(record[c]) for c in PAIRWISE_LABELS].index(1)


def class_label(value) -> Optional[int]:
    """A class label as a non-negative int (ints, integral floats, digit strings), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    return value if isinstance(value, int) and value >= 0 else None


def record_problem(record: dict, fmt: str, cfg: DataSection) -> Optional[str]:
    """What is wrong with one record (None if nothing), in words a user can act on."""
    if fmt == "classification":
        text, label = record.get(cfg.text_column), record.get(cfg.label_column)
        if not isinstance(text, str):
            return f"'{cfg.text_column}' is {'null or missing' if text is None else type(text).__name__}, not a string"
        if class_label(label) is None:
            return f"'{cfg.label_column}' is {label!r}, not a non-negative integer class"
        return None
    for column in PAIRWISE_COLUMNS[:3]:
        if parse_turns(record.get(column)) is None:
            value = record.get(column)
            return f"'{column}' is {'null or missing' if value is None else type(value).__name__}, not a string"
    flags = [flag(record.get(c)) for c in PAIRWISE_LABELS]
    if None in flags or sum(flags) != 1:
        shown = ", ".join(f"{c}={record.get(c)!r}" for c in PAIRWISE_LABELS)
        return f"the winner flags ({shown}) are not exactly one 1 and two 0s"
    return None


def part_budgets(lengths: Sequence[int], budget: int) -> list[int]:
    """How many tokens each part keeps so that the total fits `budget`: short parts keep everything and
    the long ones share the rest equally (so a long prompt cannot crowd out both responses)."""
    keep = list(lengths)
    left, open_parts = budget, sorted(range(len(lengths)), key=lambda i: lengths[i])
    while open_parts:
        share = left // len(open_parts)
        i = open_parts[0]
        if lengths[i] <= share:  # fits within an equal share: keep whole, give the rest to the others
            left -= lengths[i]
            open_parts.pop(0)
            continue
        for j in open_parts:  # every remaining part is longer than an equal share
            keep[j] = share
        for j in open_parts[:left - share * len(open_parts)]:
            keep[j] += 1  # the remainder, one token each
        break
    return keep


def build_input(prefix: list[int], parts: Sequence[tuple[list[int], bool]], max_length: int) -> dict:
    """prefix + parts, where parts are (ids, truncatable); truncatable parts are cut (from their end)
    by `part_budgets` so the whole fits max_length. Returns input_ids, length (before cutting), truncated."""
    fixed = len(prefix) + sum(len(ids) for ids, cut in parts if not cut)
    cut_parts = [ids for ids, cut in parts if cut]
    if fixed > max_length:
        raise DataError(f"data.max_length={max_length} leaves no room for the text: the fixed markers alone "
                        f"take {fixed} tokens", f"raise data.max_length well above {fixed}")
    keep = iter(part_budgets([len(ids) for ids in cut_parts], max_length - fixed))
    ids = list(prefix)
    for part, cut in parts:
        ids += part[:next(keep)] if cut else part
    length = fixed + sum(len(p) for p in cut_parts)
    return {"input_ids": ids, "length": length, "truncated": length > max_length}


def pairwise_texts(record: dict) -> list[tuple[str, bool]]:
    """A pairwise record as (text, truncatable) parts: marker, prompt, marker, response A, marker, B."""
    out = []
    for marker, column in zip(PAIRWISE_MARKERS, PAIRWISE_COLUMNS[:3]):
        out += [(marker, False), ("\n\n".join(parse_turns(record[column])), True)]
    return out


def label_of(record: dict, fmt: str, cfg: DataSection) -> int:
    return pairwise_label(record) if fmt == "pairwise" else class_label(record[cfg.label_column])


def encode(record: dict, fmt: str, cfg: DataSection, tokenizer) -> dict:
    return {**encode_input(record, fmt, cfg, tokenizer), "label": label_of(record, fmt, cfg)}


def encode_input(record: dict, fmt: str, cfg: DataSection, tokenizer) -> dict:
    """The model input of a record (its label is not needed: also used for unlabelled predictions)."""
    tok = tokenizer
    # Keep the BOS token the tokenizer adds itself (Gemma and Llama expect it); add nothing else.
    first = tok.encode("a", add_special_tokens=True)[:1]
    prefix = first if tok.bos_token_id is not None and first == [tok.bos_token_id] else []
    texts = pairwise_texts(record) if fmt == "pairwise" else [(record[cfg.text_column], True)]
    parts = [(tok.encode(text, add_special_tokens=False), cut) for text, cut in texts]
    return build_input(prefix, parts, cfg.max_length)
