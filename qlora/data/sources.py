"""Where records come from: `data.path` (and `data.eval_path`, `evaluation.multiple_choice_path`) resolved to a
`Source`, fingerprinted for the cache key, and read: whole, in this process (`datasets`, small sources), or as
a Ray Data dataset read in parallel on the cluster.

Accepted, in this order of resolution:
- a local file (.json / .jsonl / .csv / .tsv / .parquet), or `file://` + its path;
- a local folder: a `datasets` save_to_disk folder (Dataset or DatasetDict, `data.split` picks the split), or a
  folder of shards of one of the file types above (read in name order);
- a cloud or cluster-storage URI (`s3://`, `gs://`, `abfs://`, `hdfs://`, ...: any filesystem pyarrow knows): a
  file or a prefix of shards; credentials come from the environment, as pyarrow reads them;
- a hub dataset id (`org/name`) with `data.split`, `data.subset` and `data.revision`, loaded by `datasets`
  (which caches it, and reads that cache offline).
Every problem is a DataError naming the config key, the source and the fix, raised before anything is
prepared.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from qlora.errors import DataError

FILE_KINDS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Source:
    key: str                  # the config key it came from, for messages
    location: str             # as configured (a path, URI or hub id)
    kind: str                 # file | folder | saved | uri | hub
    files: tuple[str, ...] = ()  # file and folder: local paths; uri: paths inside `filesystem_uri`'s filesystem
    suffix: str = ""          # the files' extension (file, folder, uri)
    split: str = "train"      # saved and hub
    subset: Optional[str] = None
    revision: Optional[str] = None
    size_bytes: int = 0       # what a reader will read (0: not known before loading, e.g. hub)

    @property
    def reader(self) -> str:
        """datasets' / Ray Data's reader for file-like sources: json, csv or parquet."""
        return FILE_KINDS.get(self.suffix, "")

    @property
    def delimiter(self) -> str:
        return "\t" if self.suffix == ".tsv" else ","

    def describe(self) -> str:
        return self.location if self.kind != "hub" else f"hub dataset {self.location} (split {self.split})"


def resolve(location: str, key: str, split: str = "train", subset: Optional[str] = None,
            revision: Optional[str] = None) -> Source:
    """The Source `location` names; a DataError for anything that cannot be read."""
    if location.startswith("file://"):
        location = location.removeprefix("file://")
    if "://" in location:
        return _resolve_uri(location, key)
    p = Path(location).expanduser()
    if p.is_file():
        _check_file(p, key)
        return Source(key, location, "file", (str(p),), p.suffix, size_bytes=p.stat().st_size)
    if p.is_dir():
        return _resolve_folder(p, location, key, split)
    if p.suffix in FILE_KINDS or location.startswith((".", "/", "~")) or not HUB_ID.match(location):
        raise DataError(f"{key}: data file {location} does not exist",
                        f"check {key} (relative paths start at the folder the job runs in; a hub dataset id looks "
                        "like org/name)")
    return Source(key, location, "hub", split=split, subset=subset, revision=revision)


def _check_file(p: Path, key: str) -> None:
    if p.suffix not in FILE_KINDS:
        raise DataError(f"data file {p} has an unknown extension {p.suffix!r}",
                        "use a .json, .jsonl, .csv, .tsv or .parquet file")
    size = p.stat().st_size
    if size == 0 or (size < 1 << 20 and not p.read_bytes().strip()):
        raise DataError(f"{key}: data file {p} is empty" + (" (only blank lines)" if size else ""),
                        f"point {key} at a file with records")


def _resolve_folder(p: Path, location: str, key: str, split: str) -> Source:
    if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file():
        if (p / "dataset_dict.json").is_file():
            splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
            if split not in splits:
                raise DataError(f"{key}: the saved dataset {location} has no split {split!r} (it has {splits})",
                                f"set data.split (or data.eval_split) to one of {splits}")
        files = sorted(str(f) for f in p.rglob("*.arrow"))
        return Source(key, location, "saved", tuple(files), split=split, size_bytes=_sizes(files))
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in FILE_KINDS)
    suffixes = {f.suffix for f in files}
    if not files or len(suffixes) > 1:
        found = "no .json/.jsonl/.csv/.tsv/.parquet files" if not files else f"files of several kinds {sorted(suffixes)}"
        raise DataError(f"{key}: the folder {location} holds {found}",
                        "point it at a folder of shards of one kind, a datasets save_to_disk folder, or one file")
    for f in files:
        _check_file(f, key)
    names = tuple(str(f) for f in files)
    return Source(key, location, "folder", names, files[0].suffix, size_bytes=_sizes(names))


def _sizes(files) -> int:
    return sum(os.path.getsize(f) for f in files)


def filesystem(uri: str, key: str):
    """(pyarrow filesystem, path inside it) of a URI; a DataError when no filesystem knows its scheme."""
    import pyarrow.fs
    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises ArrowInvalid / ArrowNotImplementedError / OSError by scheme
        raise DataError(f"{key}: cannot open {uri} ({type(e).__name__}: {e})",
                        "use a URI of a filesystem pyarrow knows (s3://, gs://, abfs://, hdfs://, file://) with its "
                        "credentials in the environment") from None


def _resolve_uri(uri: str, key: str) -> Source:
    import pyarrow.fs
    fs, path = filesystem(uri, key)
    try:
        info = fs.get_file_info(path)
        if info.type == pyarrow.fs.FileType.Directory:
            infos = [i for i in fs.get_file_info(pyarrow.fs.FileSelector(path)) if i.type == pyarrow.fs.FileType.File]
        else:
            infos = [info]
    except OSError as e:  # no credentials, no permission, no bucket, unreachable endpoint
        raise DataError(f"{key}: cannot read {uri}: {e}",
                        "check the URI, and that the credentials in the environment (e.g. AWS_ACCESS_KEY_ID / "
                        "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for S3-compatible stores) may read it") from None
    if info.type == pyarrow.fs.FileType.NotFound:
        raise DataError(f"{key}: {uri} does not exist", f"check {key}")
    files = sorted((i for i in infos if Path(i.path).suffix in FILE_KINDS), key=lambda i: i.path)
    suffixes = {Path(i.path).suffix for i in files}
    if not files or len(suffixes) > 1:
        found = "no .json/.jsonl/.csv/.tsv/.parquet files" if not files else f"files of several kinds {sorted(suffixes)}"
        raise DataError(f"{key}: {uri} holds {found}", "point it at one file or a prefix of shards of one kind")
    if any(i.size == 0 for i in files):
        empty = next(i.path for i in files if i.size == 0)
        raise DataError(f"{key}: data file {empty} is empty", f"point {key} at files with records")
    return Source(key, uri, "uri", tuple(i.path for i in files), next(iter(suffixes)),
                  size_bytes=sum(i.size for i in files))


def fingerprint(source: Source) -> str:
    """What the cache key knows of the source's content: the bytes of local files; size and modification
    time of each object in cloud storage (reading it all would cost a download); for hub datasets, the
    fingerprint `datasets` gives the loaded split (its builder, revision and files)."""
    h = hashlib.sha256(json.dumps([source.kind, source.split, source.subset, source.revision]).encode())
    if source.kind in ("file", "folder", "saved"):
        for name in source.files:
            with open(name, "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
    elif source.kind == "uri":
        fs, _ = filesystem(source.location, source.key)
        for info in fs.get_file_info(list(source.files)):
            h.update(f"{info.path}|{info.size}|{info.mtime_ns}".encode())
    else:
        h.update(load_hub(source)._fingerprint.encode())
    return h.hexdigest()


# --- reading ----------------------------------------------------------------------------------------

def load_hub(source: Source):
    """The hub dataset's split through `datasets` (downloaded once into its cache; offline, read from it)."""
    import datasets
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(source.location, name=source.subset, split=source.split,
                                     revision=source.revision)
    except ValueError as e:  # an unknown split or subset
        raise DataError(f"{source.key}: {source.describe()}: {e}",
                        "set data.split / data.subset (or data.eval_split) to one the dataset has") from None
    except Exception as e:  # not on the hub, no network and not cached, gated, ...
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        raise DataError(f"{source.key}: {source.describe()} could not be loaded ({type(e).__name__}: {e})"
                        + (" with HF_HUB_OFFLINE=1" if offline else ""),
                        "check the id, split and revision; without network, load it once where the hub is "
                        "reachable (datasets caches it), or point the key at a local copy (a file, or a "
                        "save_to_disk folder)") from None


def load_saved(source: Source):
    import datasets
    ds = datasets.load_from_disk(source.location)
    return ds[source.split] if isinstance(ds, datasets.DatasetDict) else ds


def read_records(source: Source) -> list[dict]:
    """Every record of the source as a dict, in order (small sources: the whole set in this process)."""
    import datasets
    datasets.disable_progress_bars()
    if source.kind == "hub":
        ds = load_hub(source)
    elif source.kind == "saved":
        ds = load_saved(source)
    elif source.kind == "uri":
        with tempfile.TemporaryDirectory() as tmp:
            return read_records(_download(source, Path(tmp)))
    else:
        kwargs = {"delimiter": "\t"} if source.suffix == ".tsv" else {}
        try:
            ds = datasets.load_dataset(source.reader, data_files=list(source.files), split="train", **kwargs)
        except Exception as e:  # datasets wraps parser errors in several exception types
            cause = e.__cause__ or e
            raise DataError(f"data file {source.location} could not be parsed as {source.reader}: "
                            f"{type(cause).__name__}: {cause}", f"fix the file so it is valid {source.reader} "
                            "(one record per line for .jsonl)") from None
    if len(ds) == 0:
        raise DataError(f"{source.key}: {source.describe()} holds no records", f"point {source.key} at records")
    return ds.to_list()


def _download(source: Source, folder: Path) -> Source:
    """The URI's files copied into `folder`, as a local folder source (names kept, so their order is)."""
    fs, _ = filesystem(source.location, source.key)
    names = []
    for i, path in enumerate(source.files):
        target = folder / f"{i:06d}-{Path(path).name}"
        with fs.open_input_stream(path) as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        names.append(str(target))
    return Source(source.key, source.location, "folder", tuple(names), source.suffix, size_bytes=source.size_bytes)


def ray_dataset(source: Source):
    """The source as a Ray Data dataset: files are read in parallel by Ray Data's readers on the cluster;
    hub and saved datasets are handed over from `datasets`' memory-mapped Arrow files."""
    import ray.data
    if source.kind in ("hub", "saved"):
        return ray.data.from_huggingface(load_hub(source) if source.kind == "hub" else load_saved(source))
    fs = filesystem(source.location, source.key)[0] if source.kind == "uri" else None
    paths = list(source.files)
    if source.reader == "json":
        return ray.data.read_json(paths, filesystem=fs)
    if source.reader == "csv":
        import pyarrow.csv
        return ray.data.read_csv(paths, filesystem=fs, parse_options=pyarrow.csv.ParseOptions(delimiter=source.delimiter))
    return ray.data.read_parquet(paths, filesystem=fs)
