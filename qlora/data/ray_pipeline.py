"""Preparation as a Ray Data pipeline on the cluster's CPUs: read the source in parallel, number its records,
check every record and encode the selected ones in batches (the fast tokenizer's batch path) on an actor pool
as wide as the cluster's CPUs, and write the examples as Arrow shards straight into the cache. Each write task
hands the driver only a few numbers per example (examples.META_COLUMNS): the driver selects, indexes and packs
from those, never from the examples themselves.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
import pyarrow as pa

from qlora.config import CLASSIFICATION_FORMATS, DataSection
from qlora.data import records as checks
from qlora.data import sources
from qlora.files import filesystem
from qlora.data.cache import Writer, schema, write_table
from qlora.data.examples import META_COLUMNS, eval_selection, make_encoder, meta, select
from qlora.errors import DataError

RECORD = "__qlora_record__"   # the record number column added to the source's columns
ROWS_PER_BLOCK = 20_000       # blocks at most this long: the pipeline spreads over the CPUs, a task's output stays small
BATCH = 1_000                 # records per encoder call
SPLITS = ("train", "eval")


class Encoding:
    """What every encoding task needs, shared through the object store (ray.put once, fetched once per worker
    process): check every record of a batch, encode the selected ones. Rows out: one per selected record
    (its split and position, the example, its META_COLUMNS numbers) and one per bad record (its problem);
    records neither selected nor bad leave nothing."""

    def __init__(self, tokenizer, fmt: str, cfg: DataSection, positions: dict[str, np.ndarray]):
        self.fmt, self.cfg, self.positions = fmt, cfg, positions
        self.encode = make_encoder(fmt, cfg, tokenizer)
        out = schema(fmt, "eval")
        extra = [c for c in ("tokens", "trained", "cut", "label") if c not in out.names]
        self.schema = pa.schema([*out, ("split", pa.int8()), ("problem", pa.string()), *[(c, pa.int64()) for c in extra],
                                 ("node", pa.string())])

    def __call__(self, batch: pa.Table, node: str) -> pa.Table:
        numbers = batch.column(RECORD).to_numpy()
        records = batch.drop_columns([RECORD]).to_pylist()
        rows = []
        for split_id, split in enumerate(SPLITS):
            pos = self.positions[split][numbers]
            chosen = np.flatnonzero(pos >= 0)
            good = [i for i in chosen if checks.record_problem(records[i], self.fmt, self.cfg) is None]
            examples = self.encode([records[i] for i in good], [split == "eval"] * len(good))
            for i, e in zip(good, examples):
                m = meta(e, int(pos[i]), int(numbers[i]))
                rows.append({**e, **{c: m[c] for c in ("tokens", "trained", "cut", "label")},
                             "record": m["record"], "position": m["position"], "split": split_id})
        for i, r in enumerate(records):
            if problem := checks.record_problem(r, self.fmt, self.cfg):
                rows.append({"record": int(numbers[i]), "split": -1, "problem": problem})
        for row in rows:
            row["node"] = node  # which nodes' CPUs prepared the data (reported)
        return pa.Table.from_pylist(rows, schema=self.schema)


_FETCHED: dict[str, Encoding] = {}  # this worker process's Encoding, by object ref


def encode_batch(batch: pa.Table, encoding_ref) -> pa.Table:
    """Ray Data task: one batch of numbered records through the shared Encoding."""
    import ray
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one task per CPU already
    key = encoding_ref.hex()
    if key not in _FETCHED:
        _FETCHED.clear()
        _FETCHED[key] = ray.get(encoding_ref)
    return _FETCHED[key](batch, ray.get_runtime_context().get_node_id())


class ShardSink:
    """Ray Data datasink: each write task writes its examples as one shard per split into the cache folder
    and returns their META_COLUMNS numbers and the first bad record it saw."""

    def __init__(self, base: str, fmt: str, tag: str):
        self.base, self.fmt, self.tag = base, fmt, tag
        self.results: list[dict] = []

    # Ray Data's Datasink interface (ray.data.Datasink), implemented without subclassing it so this module
    # imports without Ray; write_datasink only calls these.
    def on_write_start(self, schema=None) -> None:
        pass

    def write(self, blocks, ctx) -> dict:
        table = pa.concat_tables([pa.table(b) if not isinstance(b, pa.Table) else b for b in blocks])
        fs, base = filesystem(self.base)
        split = table.column("split").to_numpy()
        bad = np.flatnonzero(split < 0)
        result = {"files": {}, "meta": {}, "problems": len(bad), "first_problem": None,
                  "nodes": sorted(set(table.column("node").to_pylist()) - {None})}
        if len(bad):
            records = table.column("record").to_numpy()[bad]
            first = bad[np.argmin(records)]
            result["first_problem"] = (int(table.column("record")[first].as_py()), table.column("problem")[first].as_py())
        for split_id, name in enumerate(SPLITS):
            part = table.filter(pa.compute.equal(table.column("split"), split_id))
            if not len(part):
                continue
            file = f"{name}/part-{self.tag}-{ctx.task_idx:05d}.arrow"
            if "://" not in self.base:
                os.makedirs(os.path.join(base, name), exist_ok=True)
            result["files"][file] = write_table(fs, f"{base}/{file}", part.select(schema(self.fmt, name).names))
            result["meta"][name] = {c: part.column(c).to_numpy(zero_copy_only=False) for c in META_COLUMNS}
        return result

    def on_write_complete(self, write_result) -> None:
        self.results = list(write_result.write_returns)

    def on_write_failed(self, error: Exception) -> None:
        pass

    def get_name(self) -> str:
        return "QloraShards"

    @property
    def supports_distributed_writes(self) -> bool:
        return True

    @property
    def min_rows_per_write(self) -> Optional[int]:
        return None

    @property
    def min_bytes_per_write(self) -> Optional[int]:
        return None


def _as_datasink(sink: ShardSink):
    """A ray.data.Datasink delegating to `sink` (Ray Data checks the type)."""
    import ray.data

    class Sink(ray.data.Datasink):
        def on_write_start(self, schema=None):
            return sink.on_write_start(schema)

        def write(self, blocks, ctx):
            return sink.write(blocks, ctx)

        def on_write_complete(self, write_result):
            return sink.on_write_complete(write_result)

        def get_name(self):
            return sink.get_name()

    return Sink()


def _cluster_cpus() -> int:
    import ray
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _read(source: sources.Source):
    """The source read by Ray Data's readers (on the cluster), materialized; a DataError for files that do not
    parse or cannot be read (the reading tasks' own error, unwrapped)."""
    try:
        return sources.ray_dataset(source).materialize()
    except DataError:
        raise
    except Exception as e:  # Ray wraps the reader's error: RayTaskError(ArrowInvalid / OSError ...)
        cause = getattr(e, "cause", None) or e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise DataError(f"{source.key}: reading {source.describe()} failed: {type(cause).__name__}: "
                        f"{str(cause).splitlines()[0] if str(cause) else ''}",
                        f"fix or remove the damaged file, or the credentials or permissions that {source.key} needs "
                        "(a .jsonl file holds one JSON record per line)") from None


def _run(source: sources.Source, fmt: Optional[str], cfg: DataSection, tokenizer, writer: Writer, tag: str,
         select_fn):
    """Read `source`, number its records, encode what `select_fn(n, ds)` picks; returns (fmt, sink results)."""
    import ray
    import ray.data
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # record numbers follow the file
    ds = _read(source)
    n = ds.count()
    if n == 0:
        raise DataError(f"{source.key}: {source.describe()} holds no records", f"point {source.key} at records")
    columns = ds.schema().names
    fmt = fmt or checks.resolve_format(cfg, columns)
    checks.check_columns(columns, fmt, cfg, source.location)
    positions = select_fn(n, ds, fmt)
    # Record numbers: zip with a range (deprecated from Ray 2.62 for `join`; correct here because the order is
    # preserved, which tests/e2e/test_data_pipeline.py checks against the in-memory path).
    numbered = ds.zip(ray.data.range(n).rename_columns({"id": RECORD}))
    blocks = max(2 * _cluster_cpus(), math.ceil(n / ROWS_PER_BLOCK))
    # Tasks, spread over the cluster's CPUs (Ray Data's default scheduling), each encoding BATCH records at a time.
    encoding = ray.put(Encoding(tokenizer, fmt, cfg, positions))
    # A batch no larger than a block: Ray Data would otherwise bundle small blocks into one task.
    batch = max(1, min(BATCH, n // blocks))
    encoded = numbered.repartition(blocks).map_batches(encode_batch, batch_format="pyarrow", batch_size=batch,
                                                       fn_kwargs={"encoding_ref": encoding}, num_cpus=1)
    sink = ShardSink(writer.base, fmt, tag)
    encoded.write_datasink(_as_datasink(sink))
    results = sink.results
    total = sum(r["problems"] for r in results)
    firsts = [r["first_problem"] for r in results if r["first_problem"]]
    checks.raise_problems(firsts, total, fmt, cfg, source.location)
    for r in results:
        for name, size in r["files"].items():
            writer.adopt(name, size)
    return fmt, results


def _positions(n: int, train: list[int], held: list[int]) -> dict[str, np.ndarray]:
    out = {}
    for split, chosen in zip(SPLITS, (train, held)):
        pos = np.full(n, -1, dtype=np.int64)
        pos[np.asarray(chosen, dtype=np.int64)] = np.arange(len(chosen))
        out[split] = pos
    return out


def _labels(ds, fmt: str, cfg: DataSection) -> list[int]:
    """Every record's class label, in record order (a stratified k-fold split needs them all); -1 for a bad
    record, which the encoding pass then reports."""
    from qlora.data.classification import label_of

    def labels(batch: pa.Table) -> pa.Table:
        found = [label_of(r, fmt, cfg) if checks.record_problem(r, fmt, cfg) is None else -1 for r in batch.to_pylist()]
        return pa.table({"label": pa.array(found, type=pa.int64())})
    return [v for t in ds.map_batches(labels, batch_format="pyarrow").iter_batches(batch_format="pyarrow")
            for v in t.column("label").to_pylist()]


def encode_with_ray_data(cfg: DataSection, tokenizer, train_source: sources.Source,
                         held_source: Optional[sources.Source], writer: Writer):
    """The Ray Data executor: examples written into `writer`'s folder; returns (fmt, per-split META_COLUMNS
    numbers in position order, where each split came from, how many nodes and write tasks did the work)."""
    def train_select(n, ds, fmt):
        labels = _labels(ds, fmt, cfg) if cfg.kfold and fmt in CLASSIFICATION_FORMATS else None
        chosen = select(n, cfg, labels, train_source.location)
        return _positions(n, chosen.train, [] if held_source is not None else chosen.eval)

    fmt, results = _run(train_source, None, cfg, tokenizer, writer, "a", train_select)
    where = {"train": train_source.location, "eval": train_source.location}
    if held_source is not None:
        _, held_results = _run(held_source, fmt, cfg, tokenizer, writer, "b",
                               lambda n, ds, fmt: _positions(n, [], eval_selection(n, cfg)))
        results += held_results
        where["eval"] = held_source.location
    nodes = sorted({n for r in results for n in r["nodes"]})
    return fmt, merge_meta(results), where, {"nodes": len(nodes), "write_tasks": len(results)}


def merge_meta(results: list[dict]) -> dict[str, dict[str, np.ndarray]]:
    """Every write task's META_COLUMNS numbers, per split, in position order."""
    out = {}
    for split in SPLITS:
        parts = [r["meta"][split] for r in results if split in r["meta"]]
        if not parts:
            out[split] = {c: np.array([], dtype=np.int64) for c in META_COLUMNS}
            continue
        merged = {c: np.concatenate([p[c] for p in parts]) for c in META_COLUMNS}
        order = np.argsort(merged["position"], kind="stable")
        out[split] = {c: v[order] for c, v in merged.items()}
    return out
