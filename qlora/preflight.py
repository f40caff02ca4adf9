"""Environment checks that need no cluster and create nothing: compute (GPU, CPUs, custom resources of the
local cluster a job would start), the Ray address, the checkpoint storage and the MLflow store.

Each one raises EnvironmentProblem (exit code 2) naming the problem and the fix, in about a second at
most: connecting Ray to a dead address otherwise retries for minutes, and a job that asks a local
cluster for a GPU or more CPUs than the machine has waits for resources forever. Nothing is written:
storage is probed with a temporary file that is gone when the check returns, and no folder is made.

The train driver calls `check(cfg)` after `prepare_job` and before `storage_root`, `tracking_target`
and `connect_ray`; `--dry-run` calls `check(cfg, network=False)`.
"""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from qlora.config import JobConfig, redact_uri
from qlora.errors import EnvironmentProblem
from qlora.files import output_home

CONNECT_TIMEOUT_S = 5.0
# Resources every Ray node declares; anything else exists only where `ray start --resources` added it.
BUILTIN_RESOURCES = ("CPU", "GPU", "memory")


def check(cfg: JobConfig, network: bool = True) -> None:
    """All checks. `network=False` skips the ones that contact a service (Ray address, MLflow server)."""
    check_compute(cfg)
    check_storage(cfg.scaling.storage_path)
    check_tracking(cfg, network=network)
    if network:
        check_ray_address(cfg.scaling.ray_address)


def starts_local_cluster(cfg: JobConfig) -> bool:
    """The job starts its own Ray cluster on this machine (no address configured, none in $RAY_ADDRESS)."""
    address = cfg.scaling.ray_address
    return (address is None and not os.environ.get("RAY_ADDRESS")) or address == "local"


def local_cpus() -> int:
    """CPUs a local Ray cluster gets (Ray's own count honours cgroup limits)."""
    try:
        from ray._private.utils import get_num_cpus
        return int(get_num_cpus())
    except Exception:  # private API: fall back to the scheduler's view
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def fewest_workers(s) -> tuple[int, str]:
    """(the fewest workers a run starts with, the key that sets it): scaling.min_workers of an elastic run."""
    return (s.min_workers, "scaling.min_workers") if s.min_workers else (s.num_workers, "scaling.num_workers")


def check_sweep_compute(cfg: JobConfig, trial_cpus: float) -> None:
    """One trial of a sweep fits the local cluster it would start: its workers and the trial's own driver
    (a Tune actor of `trial_cpus` CPUs that waits on them), or every trial would wait forever."""
    if not starts_local_cluster(cfg):
        return
    s = cfg.scaling
    workers, count_key = fewest_workers(s)
    cpus_each = s.resources_per_worker.get("CPU", s.cpus_per_worker)
    need, have = cpus_each * workers + trial_cpus, local_cpus()
    if need > have:
        fit = (have - trial_cpus) / workers
        raise EnvironmentProblem(
            f"a sweep trial needs {workers} workers x {cpus_each:g} CPUs + {trial_cpus:g} CPU for the trial's "
            f"driver = {need:g} CPUs; the local Ray cluster this sweep starts has {have}, so no trial would ever "
            "start its workers",
            f"set scaling.cpus_per_worker={int(fit * 100) / 100:g} (fractional CPUs are fine), lower "
            f"{count_key}, or set scaling.ray_address to a bigger cluster")


def check_compute(cfg: JobConfig) -> None:
    """What the workers ask for fits the local cluster the job would start (a remote one is not probed)."""
    if not starts_local_cluster(cfg):
        return
    s = cfg.scaling
    workers, count_key = fewest_workers(s)
    gpus_each = s.resources_per_worker.get("GPU", 1 if s.use_gpu else 0)
    if gpus_each:
        import torch
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        key = "scaling.use_gpu=true" if s.use_gpu else f"scaling.resources_per_worker.GPU={gpus_each:g}"
        if have == 0:
            raise EnvironmentProblem(
                f"{key}, but this machine has no CUDA GPU (torch.cuda.is_available() is false) and the job would "
                "start a local Ray cluster here, whose workers would wait for a GPU forever",
                "set scaling.use_gpu=false to train on CPU (with train.optimizer adamw or sgd), or set "
                "scaling.ray_address to a cluster with GPUs")
        if gpus_each * workers > have:
            raise EnvironmentProblem(
                f"{count_key}={workers} with {key} needs {gpus_each * workers:g} GPUs; this "
                f"machine has {have}",
                f"lower {count_key} to {int(have // gpus_each)} or less, or set scaling.ray_address to a "
                "bigger cluster")
    if cfg.train.fp8_base:  # the local workers' devices are this machine's: refuse here, not in every worker
        import torch

        from qlora import fp8
        fp8.check_device(torch.device("cuda", 0) if gpus_each else torch.device("cpu"))
    cpus_each = s.resources_per_worker.get("CPU", s.cpus_per_worker)
    have_cpus = local_cpus()
    if cpus_each * workers > have_cpus:
        raise EnvironmentProblem(
            f"{count_key}={workers} x {cpus_each:g} CPUs per worker needs {cpus_each * workers:g} "
            f"CPUs; the local Ray cluster this job starts has {have_cpus}, so the workers would wait for resources "
            "forever",
            f"lower {count_key} or scaling.cpus_per_worker so they fit {have_cpus} CPUs, or set "
            "scaling.ray_address to a bigger cluster")
    custom = sorted(k for k in s.resources_per_worker if k not in BUILTIN_RESOURCES)
    if custom:
        raise EnvironmentProblem(
            f"scaling.resources_per_worker asks for {', '.join(custom)}, which the local Ray cluster this job "
            "starts does not have, so the workers would wait for them forever",
            "remove them, or set scaling.ray_address to a cluster whose nodes declare them "
            "(ray start --resources='{\"NAME\": N}')")
    if s.accelerator_type:
        # A local cluster declares no accelerator_type:<type> resource, so the workers would never start.
        raise EnvironmentProblem(
            f"scaling.accelerator_type={s.accelerator_type}, but the local Ray cluster this job starts declares no "
            "accelerator type, so the workers would wait forever",
            "drop scaling.accelerator_type for local runs, or submit to a cluster with such nodes "
            "(check with python -m ray_jobs.plan)")


def check_ray_address(address: str | None) -> None:
    """Something accepts TCP connections at the configured Ray address ($RAY_ADDRESS when unset).

    ray.init retries a dead address for minutes; this answers in at most CONNECT_TIMEOUT_S.
    """
    key = "scaling.ray_address"
    if address is None:
        address, key = os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS"
    if not address or address in ("auto", "local"):
        return
    target = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = target.hostname, target.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise EnvironmentProblem(f"{key}={address!r} is not host:port",
                                 f"write {key} like 10.0.0.5:6379 (the head node's GCS port) or ray://10.0.0.5:10001")
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise EnvironmentProblem(
            f"Ray cluster at {address} ({key}) is unreachable: nothing accepts connections at {host}:{port} ({e})",
            f"start the cluster (ray start --head --port={port}), fix {key}, or unset scaling.ray_address and "
            "RAY_ADDRESS to start a local cluster") from None


def storage_folder(storage_path: str) -> Path:
    """Where the driver will put a local storage_path (see runtime.storage_root)."""
    return output_home() / Path(storage_path).expanduser()  # an absolute path stays as it is


def check_storage(storage_path: str) -> None:
    """The checkpoint folder can be created and written, checked without creating it."""
    if "://" in storage_path:
        return
    path = storage_folder(storage_path)
    _check_can_create(path, "scaling.storage_path", "choose a folder you can write to, fix its permissions, or use "
                      "a cloud URI (s3://bucket/runs)")


def check_tracking(cfg: JobConfig, network: bool = True) -> None:
    """The MLflow store the job would log to can be used: a sqlite file whose folder exists and is
    writable, or an HTTP server that answers /health. Credentials never appear in the message."""
    if not cfg.tracking.enabled:
        return
    if cfg.tracking.uri:
        uri, key = cfg.tracking.uri, "tracking.uri"
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        uri, key = os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI"
    else:
        uri, key = f"sqlite:///{output_home() / 'mlflow.db'}", "the default MLflow store"
    shown = redact_uri(uri)
    fix_key = "tracking.uri" if key != "MLFLOW_TRACKING_URI" else "MLFLOW_TRACKING_URI (or set tracking.uri)"
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if db.exists():
            if not db.is_file():
                raise EnvironmentProblem(f"{key} {shown}: {db} is a folder, not an SQLite file",
                                         f"point {fix_key} at a file, e.g. sqlite:///{db}/mlflow.db")
            with open(db, "rb") as f:
                head = f.read(16)
            if head and head != b"SQLite format 3\x00":
                raise EnvironmentProblem(f"{key} {shown}: {db} is not an SQLite database (it starts with {head[:8]!r})",
                                         f"move that file away, or point {fix_key} at another file (MLflow creates "
                                         "a new database)")
            if not os.access(db, os.R_OK | os.W_OK):
                raise EnvironmentProblem(f"{key} {shown}: {db} is not writable by this user",
                                         f"fix its permissions, or point {fix_key} at another file")
        else:
            _check_can_create(db.parent, key, f"create the folder, or point {fix_key} at a writable folder",
                              must_exist=True, shown=f"{key} {shown}")
    elif uri.startswith(("http://", "https://")) and network:
        _check_http(uri, shown, key, fix_key)
    elif _is_file_store(uri) and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        raise EnvironmentProblem(f"{key} {shown} is a file store (a folder of runs), which MLflow 3 no longer opens",
                                 f"point {fix_key} at a database, e.g. sqlite:///mlflow.db (`mlflow migrate-filestore` "
                                 "moves an existing folder into one), or set MLFLOW_ALLOW_FILE_STORE=true")


def _is_file_store(uri: str) -> bool:
    """A plain path or a file:// URI: what MLflow opens as a FileStore."""
    return "://" not in uri or uri.startswith("file:")


def _check_http(uri: str, shown: str, key: str, fix_key: str) -> None:
    import urllib.request
    parts = urlsplit(uri)
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else parts.netloc
    url = parts._replace(netloc=netloc, query="", fragment="").geturl().rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=CONNECT_TIMEOUT_S) as r:
            r.read()
    except Exception as e:
        why = str(e)
        if parts.password:
            why = why.replace(parts.password, "***")
        raise EnvironmentProblem(
            f"MLflow tracking server {shown} ({key}) is unreachable ({why})",
            f"start it (mlflow server --host 127.0.0.1 --port 5000 ...) or fix {fix_key}") from None


def _check_can_create(path: Path, key: str, fix: str, must_exist: bool = False, shown: str | None = None) -> None:
    """`path` (a folder) exists and is writable, or (unless must_exist) its nearest existing parent is."""
    shown = shown or f"{key} {path}"
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if must_exist and existing != path:
        raise EnvironmentProblem(f"{shown}: folder {path} does not exist", fix)
    if not existing.is_dir():
        raise EnvironmentProblem(f"{shown} cannot be created: {existing} is a file, not a folder", fix)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EnvironmentProblem(f"{shown} is not writable: this user cannot write in {existing}", fix)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise EnvironmentProblem(f"{shown} is not writable: {existing} refuses new files ({e})", fix) from None
