"""torch.compile's work kept with the run's storage, so a restarted run, a sweep's next trial or a new run of the
same shape on a fresh node skips most of the first step's compile.

Layout, under `scaling.storage_path` (a local or shared folder, or a cloud URI):

    compile_cache/<key>.bin     torch's portable cache artifacts (torch.compiler.save_cache_artifacts: the
                                AOTAutograd and Inductor graphs and the autotuning results of this process)

Rank 0 writes it after its first training step, when it found none; every worker loads it before its first
compiled forward, which turns torch's own cache lookups into hits (torch checks each artifact against the graph
it compiles, so a stale one is a miss, never a wrong kernel). The key is a sha256 of the torch version, the
device's name and the settings that shape the compiled graphs (model, quantization, LoRA, batch shape, the
compile levers, the strategy and world size); not the learning rate, the seed or the data, so a learning-rate
sweep's trials share one entry.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from typing import Optional

import torch

from qlora.config import JobConfig
from qlora.files import filesystem

FOLDER = "compile_cache"
SHAPING_TRAIN_FIELDS = ("batch_size", "gradient_checkpointing", "checkpointed_fraction", "kernels",
                        "compile_memory_budget", "fp8_base", "fused_cross_entropy")


def location(storage_root: str, cfg: JobConfig, device: torch.device, world_size: int) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    shaping = {"torch": torch.__version__, "device": name, "world_size": world_size,
               "strategy": cfg.scaling.strategy, "zero_stage": cfg.scaling.zero_stage,
               "model": cfg.model.model_dump(), "quantization": cfg.quantization.model_dump(),
               "lora": cfg.lora.model_dump(), "max_length": cfg.data.max_length, "packing": cfg.data.packing,
               "train": {f: getattr(cfg.train, f) for f in SHAPING_TRAIN_FIELDS}}
    key = hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return f"{storage_root.rstrip('/')}/{FOLDER}/{key}.bin"


def load(where: str) -> Optional[int]:
    """Hand the saved artifacts at `where` to torch's caches; their number, or None when there are none (or
    they cannot be read: the compile then simply runs)."""
    import pyarrow.fs
    fs, path = filesystem(where)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        blob = f.read()
    info = torch.compiler.load_cache_artifacts(blob)  # None when torch rejects the bytes (another version)
    return None if info is None else sum(len(v) for v in info.artifacts.values())


def save(where: str) -> Optional[int]:
    """Write what this process compiled so far to `where` (written whole, then renamed where the storage can);
    its size in bytes, or None when torch recorded nothing."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    blob = saved[0]
    fs, path = filesystem(where)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"  # two trials may finish their first step together
    with fs.open_output_stream(tmp) as out:
        out.write(blob)
    fs.move(tmp, path)
    return len(blob)
