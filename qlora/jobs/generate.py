"""The generate job (ray_jobs.generate): greedy answers of a saved adapter, optionally beside the base model's.

Checks run in the job driver first (adapter found and intact, config valid, data readable, MLflow
reachable); the model work then runs on Ray with one training worker's resources, so on a cluster it lands
on a GPU node, not on the head. The adapter travels to the task as bytes (it is megabytes), so the task needs
no shared file system.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from qlora import adapters, console, distributed, runtime, tasks
from qlora.config import JobConfig
from qlora.errors import ConfigError
from qlora.jobs.base import prepare_job

def generate(cfg: JobConfig, folder: Path, prompts: list[str], max_new_tokens: int | None,
             compare_base: bool = False) -> dict:
    """Greedy answers of the adapter; with `compare_base` also the base model's own (the adapter switched off:
    the same loaded weights, so the difference is the adapter's)."""
    if not prompts:
        raise ConfigError("no prompts to generate for", "pass --prompt TEXT (repeatable) or --prompts-file FILE")
    if not tasks.for_config(cfg).can_generate:
        raise ConfigError("this adapter is a sequence classifier: it predicts classes and generates no text",
                          "use python -m ray_jobs.evaluate (metrics and predictions.jsonl) or the MLflow model's "
                          "predict()")
    prepare_job(cfg)
    out = runtime.on_worker(cfg, _generate_task, adapters.pack(folder), prompts,
                    max_new_tokens or cfg.evaluation.max_new_tokens, compare_base)
    for i, (p, c) in enumerate(zip(prompts, out["completions"])):
        print(f"> {p}\n{c}\n" + (f"  (base model: {out['base_completions'][i]})\n" if compare_base else ""), flush=True)
    return out


def _generate_task(cfg_json: str, files: dict, prompts: list[str], max_new_tokens: int, compare_base: bool) -> dict:
    console.quiet_libraries()
    cfg = JobConfig.from_json(cfg_json)
    ctx = distributed.context(cfg.scaling.use_gpu)
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = adapters.load_for_inference(cfg, adapters.unpack(files, Path(tmp)), ctx.device)
    task = tasks.for_config(cfg)
    out = {"completions": task.predict(model, tokenizer, cfg, prompts, max_new_tokens)}
    if compare_base:
        with model.disable_adapter():
            out["base_completions"] = task.predict(model, tokenizer, cfg, prompts, max_new_tokens)
    return out


def read_prompts(path: str) -> list[str]:
    """One prompt per line, or JSON lines with a "prompt" field."""
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise ConfigError(f"--prompts-file {path} cannot be read ({e.strerror})", "give an existing text file") from None
    if lines and lines[0].lstrip().startswith("{"):
        try:
            return [json.loads(line)["prompt"] for line in lines]
        except (ValueError, KeyError) as e:
            raise ConfigError(f"--prompts-file {path}: a JSON line has no \"prompt\" field ({e})",
                              "write one {\"prompt\": ...} object per line, or plain text lines") from None
    return lines
