"""What every record of a format must hold, checked before anything is tokenized: columns from the source's
schema, values record by record (nulls and wrong types that would otherwise surface as a TypeError deep in
tokenization). One set of rules for both task families; a DataError names the source, the first bad record,
how many more there are, and the fix."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

from qlora.config import CLASSIFICATION_FORMATS, DataSection
from qlora.data import classification, formats, preference
from qlora.errors import DataError


def required_columns(fmt: str, cfg: DataSection, columns: Sequence[str] = ()) -> tuple[str, ...]:
    if fmt == "preference":
        return preference.required_columns(columns)
    if fmt == "pairwise":
        return classification.PAIRWISE_COLUMNS
    if fmt == "classification":
        return cfg.text_column, cfg.label_column
    return formats.REQUIRED_COLUMNS[fmt]


def resolve_format(cfg: DataSection, columns: Sequence[str]) -> str:
    """data.format, or the generation format the columns show (auto)."""
    return cfg.format if cfg.format != "auto" else formats.detect_format(columns)


def check_columns(columns: Sequence[str], fmt: str, cfg: DataSection, where: str) -> None:
    missing = [c for c in required_columns(fmt, cfg, columns) if c not in columns]
    if not missing:
        return
    if fmt == "classification":
        fix = "set data.text_column / data.label_column to the file's column names"
    elif fmt == "preference":
        fix = "name the columns prompt / chosen / rejected (or chosen / rejected conversations, or the Chatbot Arena names)"
    elif fmt == "pairwise":
        fix = "rename the columns to the Chatbot Arena names: " + ", ".join(classification.PAIRWISE_COLUMNS)
    else:
        fix = "rename the columns, or set data.format to match the file"
    raise DataError(f"data file {where} lacks column(s) {missing} needed by data.format={fmt} "
                    f"(it has {sorted(columns)})", fix)


def record_problem(record: dict, fmt: str, cfg: DataSection) -> Optional[str]:
    if fmt in CLASSIFICATION_FORMATS:
        return classification.record_problem(record, fmt, cfg)
    if fmt == "preference":
        return preference.record_problem(record)
    return formats.record_problem(record, fmt)


def record_shape(fmt: str, cfg: DataSection) -> str:
    """What every record of `fmt` needs, in words (the fix of a bad record)."""
    if fmt == "classification":
        return f"a string '{cfg.text_column}' and a non-negative integer '{cfg.label_column}'"
    if fmt == "preference":
        return preference.RECORD_SHAPE
    if fmt == "pairwise":
        return ("string (or JSON list of strings) prompt, response_a and response_b, and exactly one of "
                "winner_model_a, winner_model_b, winner_tie set to 1")
    return formats.RECORD_SHAPES[fmt]


def problems(records: Iterable[dict], fmt: str, cfg: DataSection, first_index: int = 0) -> list[tuple[int, str]]:
    """(record index, problem) of every bad record; indices count from `first_index`."""
    return [(i, p) for i, r in enumerate(records, first_index) if (p := record_problem(r, fmt, cfg))]


def raise_problems(found: list[tuple[int, str]], total: int, fmt: str, cfg: DataSection, where: str) -> None:
    """The DataError for bad records (`total` of them, `found` holding at least the first): the first one
    by record number, and how many more."""
    if not found:
        return
    i, problem = min(found)
    more = f" (and {total - 1} more records)" if total > 1 else ""
    tools = (" (tool-calling data: keep only records whose turns are human/gpt/system, or convert them)"
             if "tool-calling" in problem else "")
    raise DataError(f"data file {where}, record {i + 1}: {problem}{more}",
                    f"fix or drop the record(s): every {fmt} record needs {record_shape(fmt, cfg)}{tools}")


def check_records(records: list[dict], fmt: str, cfg: DataSection, where: str) -> None:
    if records:
        check_columns(list(records[0]), fmt, cfg, where)
    found = problems(records, fmt, cfg)
    raise_problems(found, len(found), fmt, cfg, where)
