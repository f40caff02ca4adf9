"""Prepare once, reuse everywhere: the data of a job is looked up in the cache by its key, and prepared (then
cached) only when missing: in this process for small sources, as a Ray Data pipeline on the cluster for large
ones (data.pipeline). The driver prepares; Ray Train workers, sweep trials, restarts and later jobs with the
same key open the same cache (memory-mapped) through `open_prepared`.

    plan = pipeline.plan(cfg.data, tokenizer, storage_root)   # cheap: sources, key, lookup
    data = pipeline.prepare(plan)          # needs a Ray cluster only when plan.needs_ray
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import pyarrow as pa

from qlora.config import DataSection
from qlora.data import cache, sources
from qlora.data.examples import build_index, meta_table
from qlora.data.examples import PreparedData
from qlora.data.prepare import encode_in_memory, resolve_sources
from qlora.data.ray_pipeline import encode_with_ray_data

# data.pipeline=auto: sources larger than this go through Ray Data on the cluster (starting Ray Data costs
# seconds; encoding in this process costs about 0.5 ms per alpaca record, measured in benchmarks/RESULTS.md).
RAY_DATA_MIN_BYTES = 16 * 2**20


@dataclass
class DataPlan:
    cfg: DataSection
    tokenizer: object
    train_source: sources.Source
    held_source: Optional[sources.Source]
    key: str
    location: str                 # the cache folder for this key
    manifest: Optional[dict]      # the complete cache's manifest, if there is one
    executor: str                 # in_process | ray_data

    @property
    def needs_ray(self) -> bool:
        return self.manifest is None and self.executor == "ray_data"


def plan(cfg: DataSection, tokenizer, storage_root: str) -> DataPlan:
    """Resolve and fingerprint the sources, compute the key, look the cache up: no Ray, no preparation."""
    train, held = resolve_sources(cfg)
    prints = {"train": sources.fingerprint(train), "eval": sources.fingerprint(held) if held else None}
    key = cache.cache_key(cfg, cache.tokenizer_fingerprint(tokenizer), prints)
    location = cache.folder_of(storage_root, key)
    size = sum(s.size_bytes or _hub_bytes(s) for s in (train, held) if s is not None)
    executor = cfg.pipeline if cfg.pipeline != "auto" else ("ray_data" if size > RAY_DATA_MIN_BYTES else "in_process")
    return DataPlan(cfg, tokenizer, train, held, key, location, cache.read_manifest(location), executor)


def _hub_bytes(source: sources.Source) -> int:
    if source.kind != "hub":
        return 0
    return sum(f.stat().st_size for f in _arrow_files(sources.load_hub(source)))


def _arrow_files(ds):
    from pathlib import Path
    return [Path(f["filename"]) for f in ds.cache_files]


def prepare(p: DataPlan, check: Callable[[str, dict, dict], None] = lambda fmt, meta, where: None) -> PreparedData:
    """The job's data from the cache, prepared into it first if missing. `check(fmt, meta, where)` is what
    the job asks of the data (the driver's): it runs before anything is written, and on a reused cache too."""
    if p.manifest is not None:
        data = cache.open_cache(p.location, p.manifest)
        check(data.fmt, data.meta, data.where)
        data.reused = True
        return data
    writer = cache.Writer(p.location.rsplit("/data_cache/", 1)[0], p.key)
    started = time.perf_counter()
    if p.executor == "in_process":
        enc = encode_in_memory(p.cfg, p.tokenizer, p.train_source, p.held_source)  # checks every record first
        meta = {"train": meta_table(enc.train_meta), "eval": meta_table(enc.eval_meta)}
        index = build_index(enc.fmt, p.cfg, meta["train"], meta["eval"])
        check(enc.fmt, meta, enc.where)
        writer.start()
        try:
            for split, examples, metas in (("train", enc.train, enc.train_meta), ("eval", enc.eval, enc.eval_meta)):
                writer.add(f"{split}/part-00000.arrow", _table(examples, metas, enc.fmt, split))
            return _commit(p, writer, enc.fmt, meta, index, enc.where, {"nodes": 1, "started": started})
        except BaseException:
            writer.abort()
            raise
    writer.start()
    try:
        fmt, meta, where, work = encode_with_ray_data(p.cfg, p.tokenizer, p.train_source, p.held_source, writer)
        index = build_index(fmt, p.cfg, meta["train"], meta["eval"])
        check(fmt, meta, where)
        return _commit(p, writer, fmt, meta, index, where, {**work, "started": started})
    except BaseException:
        writer.abort()
        raise


def _table(examples: list[dict], metas: list[dict], fmt: str, split: str):
    rows = [{**e, "position": m["position"], "record": m["record"]} for e, m in zip(examples, metas)]
    return pa.Table.from_pylist(rows, schema=cache.schema(fmt, split))


def _commit(p: DataPlan, writer: cache.Writer, fmt: str, meta: dict, index, where: dict, work: dict) -> PreparedData:
    for name, table in cache.index_tables(index, meta).items():
        writer.add(name, table)
    work = {k: v for k, v in work.items() if k != "started"} | {
        "executor": p.executor, "seconds": round(time.perf_counter() - work["started"], 2)}
    location = writer.commit({"format": fmt, "stats": index.stats, "where": where, "work": work,
                              "sources": {k: s.describe() for k, s in (("train", p.train_source),
                                                                        ("eval", p.held_source)) if s}})
    return cache.open_cache(location)


def open_prepared(location: str) -> PreparedData:
    """What a worker reads: the cache the driver prepared (memory-mapped)."""
    return cache.open_cache(location)
