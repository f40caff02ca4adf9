"""The quantized base, kept per machine: a model's 4-bit quantization runs once, not at every job start.

Layout, under $QLORA_CACHE (default ~/.cache/qlora, on each node's local disk):

    quantized/<key>/config.json          the model's config with its quantization_config
    quantized/<key>/*.safetensors        packed 4-bit weights + their quantization statistics (bitsandbytes'
                                         serialized format, what save_pretrained writes for a 4-bit model),
                                         the unquantized tensors (embeddings, norms, head) in the compute dtype
    quantized/<key>/qlora_cache.json     where it came from and how long the quantization took

A folder appears whole or not at all: it is written under a temporary name and renamed (two jobs missing at
once both write; the first rename wins). The key is a sha256 of everything that changes the folder's bytes:
the source (a local folder: config.json's bytes and each weight file's name, size and modification time; a
hub model: the commit its revision resolves to; a GGUF file: its sha256, through the converted folder), the
quantization settings, the compute dtype, the device type and the bitsandbytes and transformers versions.
Only causal LMs quantized to 4 bits here are kept: a pre-quantized source (a *-bnb-4bit upload) is loaded as it
is, a classifier's new head is initialised at load, and models with their own code (trust_remote_code) are
loaded from their source every time.
"""
from __future__ import annotations

import hashlib
import json
import time
from importlib.metadata import version
from pathlib import Path
from typing import Optional

import torch

from qlora.config import JobConfig
from qlora.files import folder_once
from qlora.model_source import ModelSource, cache_root

INFO = "qlora_cache.json"


def applies(cfg: JobConfig, source: ModelSource) -> bool:
    return (cfg.quantization.bits == 4 and cfg.quantization.cache_weights and cfg.model.task != "sequence_classification"
            and not cfg.model.trust_remote_code and not source.pickle_only)


def source_identity(source: ModelSource, revision: Optional[str]) -> Optional[dict]:
    """What names the source's bytes; None when the source is quantized already (nothing to keep) or when its
    identity cannot be known here (a hub model neither reachable nor in the local hub cache: from_pretrained then
    reports the problem itself)."""
    if source.is_local:
        folder = Path(source.path)
        weights = sorted(folder.glob("*.safetensors"))
        # resolve(): a hub snapshot's files link to blobs named by their sha256
        identity = {"weights": [[w.name, w.resolve().name, w.stat().st_size, w.stat().st_mtime_ns] for w in weights]}
    else:
        from huggingface_hub import snapshot_download
        try:  # one small request online (which commit the revision is now); the local hub cache's refs offline
            folder = Path(snapshot_download(source.path, revision=revision, allow_patterns=["config.json"]))
        except Exception:  # noqa: BLE001 - unreachable hub, unknown repo: no cache, the load says why
            return None
        identity = {"hub": source.path, "commit": folder.name}
    config = (folder / "config.json").read_bytes()
    if "quantization_config" in json.loads(config):  # a pre-quantized checkpoint (a *-bnb-4bit upload)
        return None
    return {**identity, "config": hashlib.sha256(config).hexdigest()}


def key(cfg: JobConfig, source: ModelSource, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    identity = source_identity(source, cfg.model.revision)
    if identity is None:
        return None
    q = cfg.quantization
    blob = json.dumps({"source": identity, "quant": [q.bits, q.quant_type, q.double_quant], "dtype": str(dtype),
                       "device": device.type, "bitsandbytes": version("bitsandbytes"),
                       "transformers": version("transformers")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def folder(cache_key: str) -> Path:
    return cache_root() / "quantized" / cache_key


def lookup(cache_key: Optional[str]) -> Optional[Path]:
    """The complete cached folder for `cache_key`, or None."""
    if cache_key is None:
        return None
    path = folder(cache_key)
    return path if (path / INFO).is_file() else None


def store(model, cache_key: str, description: str, quantize_seconds: float) -> Path:
    """Write the loaded 4-bit `model` (before any training change) as the cache entry of `cache_key`."""
    target = folder(cache_key)
    with folder_once(target) as tmp:
        model.save_pretrained(tmp)
        (tmp / INFO).write_text(json.dumps({"source": description, "quantize_seconds": round(quantize_seconds, 2),
                                            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    return target
