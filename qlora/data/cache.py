"""The prepared-data cache: examples tokenized once, in Arrow shards that every process memory-maps.

Layout, under `scaling.storage_path` (a local or shared folder, or a cloud URI):

    data_cache/<key>/
        train/part-*.arrow      training examples (Arrow IPC, uncompressed, so they memory-map): record,
                                position, input_ids, labels, length, truncated, trained_tokens_cut (a class
                                label instead of labels for classifiers; rejected_input_ids, rejected_labels
                                and prompt_cut besides for preference pairs)
        eval/part-*.arrow       held-out examples, plus prompt_ids and reference for generation
        index/train.arrow       the kept training examples in training order (position, tokens, label, record)
        index/eval.arrow        the kept held-out examples
        index/packing.arrow     data.packing: each packed row's members (indices into index/train)
        manifest.json           written last: the key's inputs, every file with its size, the statistics

The key is a sha256 of everything that changes the result: the sources' fingerprints (local bytes, cloud
sizes and times, hub fingerprints), the tokenizer (its full serialization and chat template), every data.*
setting that changes examples or their selection, and PIPELINE_VERSION. A folder without its manifest, or
whose files do not match it, is never read: a local cache is written into a temporary folder and renamed
into place; in cloud storage the manifest is the commit. Workers on other nodes read a cloud cache through a
node-local copy (downloaded once, checked against the manifest).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from bisect import bisect_right
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from qlora.config import CLASSIFICATION_FORMATS, DataSection
from qlora.data.batches import packed_row
from qlora.data.examples import PreparedData
from qlora.errors import DataError
from qlora.files import filesystem

PIPELINE_VERSION = 1  # raise when the examples a configuration gives change
MANIFEST = "manifest.json"
# data.* settings that change neither the examples nor their selection (where the work runs).
NOT_IN_KEY = ("path", "eval_path", "pipeline")
IDS = pa.list_(pa.int32())


def tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer as it encodes: its full serialization (vocabulary, merges, normalizer, added tokens) and
    chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow (SentencePiece / Python) tokenizer
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.chat_template, tokenizer.eos_token, tokenizer.bos_token,
                         tokenizer.all_special_tokens], default=str).encode())
    return h.hexdigest()


def cache_key(cfg: DataSection, tokenizer_print: str, source_prints: dict[str, str]) -> str:
    settings = {k: v for k, v in cfg.model_dump().items() if k not in NOT_IN_KEY}
    blob = json.dumps({"version": PIPELINE_VERSION, "data": settings, "tokenizer": tokenizer_print,
                       "sources": source_prints}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def schema(fmt: str, split: str) -> pa.Schema:
    fields = [("record", pa.int64()), ("position", pa.int64()), ("input_ids", IDS), ("length", pa.int64()),
              ("truncated", pa.bool_())]
    if fmt in CLASSIFICATION_FORMATS:
        fields.append(("label", pa.int64()))
    else:
        fields += [("labels", IDS), ("trained_tokens_cut", pa.int64())]
        if fmt == "preference":  # the rejected side of each pair, and the prompt tokens truncation cut
            fields += [("rejected_input_ids", IDS), ("rejected_labels", IDS), ("prompt_cut", pa.int64())]
        if split == "eval":
            fields += [("prompt_ids", IDS), ("reference", pa.string())]
    return pa.schema(fields)


# --- where ----------------------------------------------------------------------------------------

def folder_of(storage_root: str, key: str) -> str:
    return f"{storage_root.rstrip('/')}/data_cache/{key}"


def read_manifest(location: str) -> Optional[dict]:
    """The manifest of a complete cache at `location`, or None (absent, half-written, or files missing)."""
    import pyarrow.fs
    fs, base = filesystem(location)
    try:
        with fs.open_input_stream(f"{base}/{MANIFEST}") as f:
            manifest = json.loads(f.read())
        infos = fs.get_file_info([f"{base}/{name}" for name in manifest["files"]])
    except (OSError, ValueError, KeyError):
        return None
    for info, size in zip(infos, manifest["files"].values()):
        if info.type != pyarrow.fs.FileType.File or info.size != size:
            return None
    return manifest if manifest.get("version") == PIPELINE_VERSION else None


# --- writing --------------------------------------------------------------------------------------

def write_table(fs, path: str, table: pa.Table) -> int:
    """One Arrow IPC file (uncompressed, so readers memory-map it); returns its size."""
    with fs.open_output_stream(path) as out:
        with pa.ipc.new_file(out, table.schema) as writer:
            writer.write_table(table)
    return fs.get_file_info(path).size


class Writer:
    """A cache being written: files go to a temporary folder (local) or straight under the key (cloud);
    `commit` writes the manifest last and, locally, renames the folder into place."""

    def __init__(self, storage_root: str, key: str):
        self.key, self.final = key, folder_of(storage_root, key)
        self.local = "://" not in storage_root
        self.base = f"{self.final}.tmp-{uuid.uuid4().hex[:8]}" if self.local else self.final
        self.fs, self.base_path = filesystem(self.base)
        self.files: dict[str, int] = {}
        self._created = []

    def start(self) -> "Writer":
        if self.local:
            parent = Path(self.final).parent
            for p in reversed([parent, *parent.parents]):
                if not p.exists():
                    self._created.append(p)
                    break
            for stale in parent.glob(f"{self.key}.tmp-*") if parent.exists() else []:
                shutil.rmtree(stale, ignore_errors=True)  # an interrupted earlier preparation
            Path(self.base_path).mkdir(parents=True)
        else:
            self.fs.delete_dir_contents(self.base_path, missing_dir_ok=True)  # a half-written earlier attempt
        return self

    def add(self, name: str, table: pa.Table) -> None:
        if self.local:
            Path(self.base_path, name).parent.mkdir(parents=True, exist_ok=True)
        self.files[name] = write_table(self.fs, f"{self.base_path}/{name}", table)

    def adopt(self, name: str, size: int) -> None:
        """A file that a Ray Data write task put into this cache's folder."""
        self.files[name] = size

    def commit(self, manifest: dict) -> str:
        manifest = {**manifest, "version": PIPELINE_VERSION, "key": self.key, "files": dict(sorted(self.files.items())),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with self.fs.open_output_stream(f"{self.base_path}/{MANIFEST}") as f:
            f.write(json.dumps(manifest, indent=1).encode())
        if self.local:
            if Path(self.final).exists() and read_manifest(self.final) is None:
                shutil.rmtree(self.final)  # a damaged cache of this key: replaced
            try:
                os.replace(self.base_path, self.final)
            except OSError:  # another process committed the same key first: its result is identical
                shutil.rmtree(self.base_path, ignore_errors=True)
        return self.final

    def abort(self) -> None:
        if self.local:
            shutil.rmtree(self.base_path, ignore_errors=True)
            for p in self._created:  # leave no empty folders behind a failed preparation
                shutil.rmtree(p, ignore_errors=True)
        else:
            self.fs.delete_dir_contents(self.base_path, missing_dir_ok=True)


def index_tables(index, meta: dict) -> dict[str, pa.Table]:
    """index/*.arrow from an examples.Index and the per-example numbers (position order) of both splits."""
    out = {}
    for split, kept in (("train", index.train), ("eval", index.eval)):
        m = meta[split]
        out[f"index/{split}.arrow"] = pa.table({c: pa.array(m[c][kept]) for c in ("position", "tokens", "label", "record")})
    if index.packing is not None:
        out["index/packing.arrow"] = pa.table({"members": pa.array(index.packing, type=IDS),
                                               "tokens": pa.array(index.lengths, type=pa.int64())})
    return out


# --- reading --------------------------------------------------------------------------------------

def local_folder(location: str, manifest: dict) -> Path:
    """The cache as a local folder: itself, or a node-local copy of a cloud cache (downloaded once)."""
    if "://" not in location:
        return Path(location)
    target = Path(os.environ.get("QLORA_DATA_CACHE", Path.home() / ".cache" / "qlora" / "data")) / manifest["key"]
    if read_manifest(str(target)) is not None:
        return target
    fs, base = filesystem(location)
    tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    for name in [*manifest["files"], MANIFEST]:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f"{base}/{name}") as src, open(tmp / name, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
    try:
        os.replace(tmp, target)
    except OSError:  # another worker on this node finished the same copy first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def mapped(path: Path) -> pa.Table:
    """An Arrow IPC file memory-mapped: its pages are read on access and shared through the page cache, so
    a process's resident memory does not grow with the file."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


class Examples(Sequence):
    """Examples memory-mapped from a split's shards, in the order of `positions` (plan order)."""

    def __init__(self, shards: list[pa.Table], positions: np.ndarray):
        self.shards = shards
        self.offsets = np.cumsum([0] + [len(t) for t in shards]).tolist()
        by_position = np.empty(self.offsets[-1], dtype=np.int64)
        for t, start in zip(shards, self.offsets):
            by_position[t.column("position").to_numpy()] = np.arange(start, start + len(t))
        self.rows = by_position[positions]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = int(self.rows[i])
        shard = bisect_right(self.offsets, row) - 1
        return self.shards[shard].slice(row - self.offsets[shard], 1).to_pylist()[0]


class PackedRows(Sequence):
    """Packed training rows composed from their member examples when read (batches.packed_row)."""

    def __init__(self, examples: Examples, members: pa.Table):
        self.examples, self.members = examples, members.column("members")

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return packed_row([self.examples[j] for j in self.members[i].as_py()])


def open_cache(location: str, manifest: Optional[dict] = None):
    """PreparedData memory-mapped from a complete cache; a DataError when it is not complete."""
    manifest = manifest or read_manifest(location)
    if manifest is None:
        raise DataError(f"the prepared-data cache {location} is missing or incomplete",
                        "run the job again: its driver prepares the data and writes the cache")
    folder = local_folder(location, manifest)
    split_tables = {split: [mapped(folder / name) for name in manifest["files"] if name.startswith(f"{split}/")]
                    for split in ("train", "eval")}
    index = {split: mapped(folder / "index" / f"{split}.arrow") for split in ("train", "eval")}
    meta = {split: {c: t.column(c).to_numpy() for c in t.column_names} for split, t in index.items()}
    examples = Examples(split_tables["train"], meta["train"]["position"])
    held = Examples(split_tables["eval"], meta["eval"]["position"])
    if "index/packing.arrow" in manifest["files"]:
        packing = mapped(folder / "index" / "packing.arrow")
        train, lengths = PackedRows(examples, packing), packing.column("tokens").to_pylist()
    else:
        train, lengths = examples, meta["train"]["tokens"].tolist()
    stats = dict(manifest["stats"])
    if "label_counts" in stats:  # JSON keys are strings
        stats["label_counts"] = {int(k): v for k, v in stats["label_counts"].items()}
    return PreparedData(train, held, manifest["format"], stats, manifest["key"][:16], lengths, examples, meta,
                        manifest["where"], location, work=manifest.get("work", {}))
