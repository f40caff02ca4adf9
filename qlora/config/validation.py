"""Validating raw config data against the schema, and the messages of what is wrong: the key path, what is
allowed there (with the nearest name for a typo), and which keys to change."""
from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

from qlora.errors import ConfigError


def validate(model: type[BaseModel], raw: Any):
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(model, e), _fix(e)) from None
    except (TypeError, ValueError) as e:  # pydantic raises these for some odd inputs (e.g. unhashable keys)
        raise ConfigError(f"config could not be read: {e}", "correct the config file") from None


def _describe(model: type[BaseModel], err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, e["loc"][:-1])
            hint = difflib.get_close_matches(str(e["loc"][-1]), allowed, n=1)
            lines.append(f"unknown key '{loc}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                         + f"; allowed here: {', '.join(allowed)}")
        elif e["type"] == "missing":
            lines.append(f"missing required key '{loc}'")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            given = e.get("input")
            shown = "" if isinstance(given, dict) or given is None else f" (got {given!r})"
            lines.append(f"{loc}: {msg}{shown}" if e["loc"] else msg)
    return "invalid config:\n  " + "\n  ".join(lines)


def _fix(err: ValidationError) -> str:
    """Which keys to change, e.g. "in the YAML file or a --set override: rename or remove 'lora.rr'"."""
    steps = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        verb = {"extra_forbidden": "rename or remove", "missing": "add"}.get(e["type"], "change")
        steps.append(f"{verb} '{loc}'" if loc else "change the settings named above")
    return "in the YAML file or a --set override: " + "; ".join(dict.fromkeys(steps))


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def set_path(raw: dict, key: str, value: Any, context: str = "") -> None:
    """raw[a][b][c] = value for key `a.b.c`, creating sections on the way (overrides, sweep params)."""
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{context + ': ' if context else ''}{'.'.join(parts[:i + 1])} is a value, not a section",
                              "override a key inside a section, e.g. --set train.learning_rate=1e-4")
        node = child
    node[parts[-1]] = value
