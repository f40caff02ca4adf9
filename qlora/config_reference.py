"""docs/config.md, generated from the schema (qlora/config/): every section and key with its type, default and
description, so the reference cannot drift from what the config accepts (tests/unit/test_config.py compares them).

    python -m qlora.config_reference > docs/config.md
"""
from __future__ import annotations

import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from qlora.config import JobConfig

HEADER = """# Configuration reference

Generated from `qlora/config/` by `python -m qlora.config_reference > docs/config.md` (a test fails when this
file is stale). A job config is YAML with these sections; any key can be overridden on the command line with
`--set section.key=value`. Unknown keys, wrong types and contradictions fail before anything runs, naming the key
and the fix.
"""


def type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" (optional)" if type(None) in args else "")
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def default_text(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return ""
    return f"`{value!r}`" if value not in (None, {}, []) else ("unset" if value is None else f"`{value!r}`")


def section_rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        nested = typing.get_args(ann)[0] if typing.get_origin(ann) is typing.Union else ann
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            rows += section_rows(nested, f"{prefix}{name}.")
            continue
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{prefix}{name}` | {type_name(ann)} | {default_text(field)} | {description} |")
    return rows


def render() -> str:
    out = [HEADER]
    for name, field in JobConfig.model_fields.items():
        section = field.annotation
        doc = (section.__doc__ or "").strip()
        out.append(f"\n## `{name}`\n" + (f"\n{doc}\n" if doc and not doc.startswith("Usage docs") else ""))
        out.append("| key | type | default | what |\n|---|---|---|---|")
        out += section_rows(section, f"{name}.")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
