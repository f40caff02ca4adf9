"""Names made from a config: run-name templates ({section.key} placeholders), dotted keys, secrets redacted
from URIs."""
from __future__ import annotations

import difflib
import re
from typing import Any

from pydantic import BaseModel


NAME_PLACEHOLDER = re.compile(r"\{([^{}:]*)(?::([^{}]*))?\}")


def resolve_name_template(template: str, cfg: BaseModel, key: str) -> str:
    """`qwen-r{lora.r}-lr{train.learning_rate}` -> `qwen-r8-lr0.0002`: each {section.key[:format]} is that config
    value. Deterministic (no clock), because the run name is also the run folder a rerun resumes from. Raises
    ValueError naming an unknown placeholder."""
    values = flatten(cfg)

    def fill(m: re.Match) -> str:
        path, spec = m.group(1).strip(), m.group(2)
        if path not in values:
            hint = difflib.get_close_matches(path, list(values), n=1)
            raise ValueError(f"{key}: unknown placeholder {{{path}}} in {template!r}"
                             + (f" (did you mean {{{hint[0]}}}?)" if hint else "")
                             + "; placeholders are config keys like {lora.r}, {train.learning_rate}, "
                             "{data.max_samples}, {train.epochs}")
        value = values[path]
        if spec:
            try:
                return format(value, spec)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{key}: format {spec!r} does not apply to {path}={value!r} ({e})") from None
        if value is None:
            return "none"
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, float):
            return f"{value:g}"
        if isinstance(value, (list, tuple)):
            return "+".join(map(str, value))
        return str(value)

    resolved = NAME_PLACEHOLDER.sub(fill, template)
    if "{" in resolved or "}" in resolved:
        raise ValueError(f"{key}: unbalanced braces in {template!r}; write placeholders like {{lora.r}}")
    # A run name is a folder name: keep it to one path segment of plain characters.
    return re.sub(r"[^A-Za-z0-9._+=-]", "-", resolved) if key.endswith("run_name") else resolved


def redact_uri(uri: str) -> str:
    """`uri` with any password and secret-looking query values replaced by ***."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:
        return uri
    netloc = parts.netloc
    if password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_secret_name(k) for k, _ in pairs):
            query = urlencode([(k, "***" if _secret_name(k) else v) for k, v in pairs], safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return uri
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _secret_name(name: str) -> bool:
    return any(w in name.lower() for w in ("token", "password", "passwd", "secret", "key", "auth", "credential"))


def flatten(cfg: BaseModel | dict) -> dict[str, Any]:
    """Dotted key -> value of a config (or its dumped dict), for MLflow params and config comparisons."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any):
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value

    walk("", cfg.model_dump() if isinstance(cfg, BaseModel) else cfg)
    return out
