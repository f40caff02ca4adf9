"""Adapter-only checkpoints: LoRA weights + optimizer/scheduler/RNG/data position + resolved config.

Layout of a checkpoint folder:
    adapter/            peft save_pretrained output (adapter_config.json, adapter_model.safetensors)
    trainer_state.pt    optimizer, scheduler, step, epoch, batch position, every rank's RNG states
    config.yaml         the resolved JobConfig
    manifest.json       size and sha256 of every file above, checked on load
Folders are written under a temporary name and renamed, so a crash never leaves a half checkpoint. Their upload to
scaling.storage_path is retried (upload_with_retries): Ray Train registers a checkpoint only once its upload has
returned, so a failed upload leaves at most an unregistered folder, which the manifest marks as incomplete.
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch
import yaml

from qlora.config import JobConfig
from qlora.files import file_sha256, writing_folder

MANIFEST = "manifest.json"


class CorruptCheckpoint(Exception):
    pass


def write_config(cfg: JobConfig, folder: Path) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    return path


def save(folder: Path, model, cfg: JobConfig, optimizer_state: dict | None = None, scheduler=None,
         state: dict | None = None, adapter_state: dict | None = None, rng_states: list | None = None) -> Path:
    """Write a checkpoint to `folder` atomically. `model` is the (unwrapped) peft model; `adapter_state` its
    trainable weights when they are sharded and had to be gathered first (Strategy.trainable_state);
    `rng_states` every rank's rng_state() in rank order (default: this process's)."""
    folder = Path(folder)
    with writing_folder(folder) as tmp:
        # Adapter weights only: embedding rows added for a [PAD] token are re-created at load
        # (modeling.grow_embeddings), where peft's "auto" would save the whole resized embedding (hundreds of
        # MB) into every checkpoint.
        model.save_pretrained(tmp / "adapter", save_embedding_layers=False, state_dict=adapter_state)
        write_config(cfg, tmp)
        if optimizer_state is not None:
            torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict() if scheduler else None,
                        "state": state or {}, "rng": rng_states or [rng_state()]}, tmp / "trainer_state.pt")
        write_manifest(tmp)
    return folder


def write_manifest(folder: Path) -> None:
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps(files, indent=1))


def verify(folder: Path) -> None:
    """Raise CorruptCheckpoint if a file is missing, truncated or changed since it was written."""
    folder = Path(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{folder}: no readable {MANIFEST} ({e})") from None
    for name, meta in files.items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != meta["bytes"] or file_sha256(p) != meta["sha256"]:
            raise CorruptCheckpoint(f"{folder}: {name} is missing or does not match its manifest entry")


def latest_intact(folder: Path, warn) -> Path:
    """`folder` if it verifies, else the newest older sibling checkpoint that does (warning with `warn`).

    Ray hands the worker its latest registered checkpoint; a file truncated or changed since (a full disk,
    a partial copy) must cost the steps since the previous checkpoint, not the run.
    """
    candidates = [folder] + sorted((p for p in folder.parent.glob("checkpoint_*")
                                    if p.is_dir() and p.name < folder.name), reverse=True)
    for candidate in candidates:
        try:
            verify(candidate)
        except CorruptCheckpoint as e:
            warn(f"WARNING: skipping corrupt checkpoint: {e}")
            continue
        if candidate != folder:
            warn(f"WARNING: resuming from the previous intact checkpoint {candidate.name}")
        return candidate
    raise CorruptCheckpoint(f"no intact checkpoint in {folder.parent} (the newest, {folder.name}, is corrupt)")


def load_trainer_state(folder: Path) -> dict:
    verify(folder)
    return torch.load(Path(folder) / "trainer_state.pt", weights_only=False)


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(states: list | dict, rank: int = 0) -> None:
    """This rank's saved RNG states. Ranks draw different amounts (dropout masks are as large as their own
    batches), so each rank resumes its own stream; `states` from a different worker count wrap around."""
    state = states[rank % len(states)] if isinstance(states, list) else states  # a dict: one rank's, older format
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])



# Waits before the 2nd, 3rd and 4th upload attempt: a storage or network blip of up to about a minute is ridden out.
UPLOAD_RETRY_DELAYS_S = (2.0, 10.0, 45.0)


def upload_with_retries(storage, checkpoint, name: str, delays=UPLOAD_RETRY_DELAYS_S):
    """Ray Train's upload of `checkpoint` to `storage` (its StorageContext) as `name`, tried again after each of
    `delays` when the storage fails (each attempt copies every file again). Returns the persisted checkpoint."""
    for attempt, delay in enumerate([*delays, None], start=1):
        try:
            return storage.persist_current_checkpoint(checkpoint, name)
        except OSError as e:  # pyarrow's filesystem errors are OSErrors (ArrowIOError too)
            if delay is None:
                raise
            print(f"[qlora] checkpoint upload {name} failed (attempt {attempt}: {type(e).__name__}: {e}); retrying in "
                  f"{delay:g} s", file=sys.stderr, flush=True)
            time.sleep(delay)
