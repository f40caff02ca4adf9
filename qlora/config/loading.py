"""A config from a YAML file and `--set key.path=value` overrides (values parsed as YAML), validated."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel

from qlora.config.job import JobConfig
from qlora.config.validation import set_path, validate
from qlora.errors import ConfigError


def load_config(path: Union[str, Path, None], overrides: list[str] = (), model: type[BaseModel] = JobConfig):
    """Read YAML (or start empty), apply `key.path=value` overrides, validate. Raises ConfigError."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist", "pass --config with the path of a YAML file, "
                              "e.g. configs/quickstart.yaml")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}", "fix the YAML syntax") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p} holds a {type(raw).__name__}, not a mapping of sections",
                              "write sections like `model:`, `data:`, `train:` at the top level")
    for item in overrides:
        apply_override(raw, item)
    return validate(model, raw)


def apply_override(raw: dict, item: str) -> None:
    """`a.b.c=value`: value is parsed as YAML (so 1e-4 is a float, [q,v] a list, true a bool)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not key=value", "write it like --set lora.r=32")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    set_path(raw, key.strip(), parsed, f"override {item!r}")
