"""The job's connections, for every job driver: the Ray cluster (join or start), run storage (local folder or
cloud URI), the MLflow server, the config as workers see it, one Ray task sized like a training worker, and
the error a failed worker's exception becomes."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from qlora import preflight, tracking
from qlora.config import JobConfig
from qlora.errors import EnvironmentProblem, TrainingFailure, UserError
from qlora.files import filesystem, output_home

RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints


def connect_ray(address: str | None) -> bool:
    """Join the configured/submitting cluster, or start a local one. Returns True if started here."""
    import ray
    if ray.is_initialized():
        return False
    started_here = (address is None and "RAY_ADDRESS" not in os.environ) or address == "local"
    try:
        # "local", not None: with None Ray joins whatever cluster `ray start` last started on this machine (its
        # address file in /tmp/ray), another user's or another job's (seen: a test's cluster, whose auth token
        # this job lacked); unset means a local cluster of our own, or the one RAY_ADDRESS names.
        ray.init(address="local" if started_here else address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise EnvironmentProblem(f"Ray cluster at {address or os.environ.get('RAY_ADDRESS')} is unreachable ({e})",
                                 "start it with `ray start --head`, or fix scaling.ray_address / RAY_ADDRESS") from None
    return started_here


@contextlib.contextmanager
def ray_connected(address: str | None):
    """Ray joined for the block (connect_ray); a local cluster started here is shut down after it."""
    local = connect_ray(address)
    try:
        yield
    finally:
        if local:
            import ray
            ray.shutdown()


def storage_location(cfg: JobConfig) -> str:
    """scaling.storage_path as the driver will use it (a cloud URI, or a local folder), creating nothing."""
    storage = cfg.scaling.storage_path
    return storage if "://" in storage else str(preflight.storage_folder(storage))


def storage_root(cfg: JobConfig) -> str:
    storage = cfg.scaling.storage_path
    if "://" in storage:
        return storage
    path = output_home() / Path(storage).expanduser()  # an absolute path stays as it is
    _check_writable(path)
    return str(path)


def _check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise EnvironmentProblem(f"scaling.storage_path {path} is not writable ({e})",
                                 "choose a folder you can write to, or a cloud URI") from None


def tracking_target(cfg: JobConfig) -> str | None:
    """The MLflow URI this job logs to (checked reachable), or None when tracking is off."""
    if not cfg.tracking.enabled:
        return None
    uri = tracking.tracking_uri(cfg.tracking.uri)
    tracking.check_reachable(uri)
    return uri


def has_checkpoints(storage: str, name: str) -> bool:
    """Whether Ray Train already keeps checkpoints of a run named `name` in `storage` (local or cloud)."""
    import pyarrow.fs
    fs, path = filesystem(storage)
    return fs.get_file_info(f"{path}/{name}/{RAY_TRAIN_SNAPSHOT}").type != pyarrow.fs.FileType.NotFound


def saved_run_config(storage: str, name: str) -> str | None:
    """The config.yaml of the newest checkpoint of run `name` in `storage` (local or cloud), or None. Checkpoint
    folders are named by Ray Train's timestamp (checkpoint_YYYY-MM-DD_HH-MM-SS.ffffff), so the newest sorts last."""
    import pyarrow.fs
    fs, path = filesystem(storage)
    found = fs.get_file_info(pyarrow.fs.FileSelector(f"{path}/{name}", allow_not_found=True))
    folders = sorted((i.path for i in found if i.type == pyarrow.fs.FileType.Directory
                      and i.base_name.startswith("checkpoint_")), reverse=True)
    for folder in folders:
        if fs.get_file_info(f"{folder}/config.yaml").type == pyarrow.fs.FileType.File:
            with fs.open_input_stream(f"{folder}/config.yaml") as f:
                return f.read().decode()
    return None


def worker_config(cfg: JobConfig) -> JobConfig:
    """Paths as workers see them: absolute. Ray Train (and Tune) move each worker's current folder to a
    run folder, so a relative data path would miss; under `ray job submit` the absolute path is inside
    the uploaded working dir, which Ray unpacks at that same path on every node the job uses."""
    changes = {f"data.{k}": str(Path(v).resolve()) for k in ("path", "eval_path")
               if (v := getattr(cfg.data, k)) and Path(v).exists()}
    if Path(cfg.model.name).expanduser().exists():
        changes["model.name"] = str(Path(cfg.model.name).expanduser().resolve())
    if cfg.evaluation.multiple_choice_path:
        changes["evaluation.multiple_choice_path"] = str(Path(cfg.evaluation.multiple_choice_path).resolve())
    return cfg.with_changes(changes)


def joins_a_cluster(address: str | None) -> bool:
    """Whether a job would join a running cluster (configured, submitted, or already connected) rather than start
    a local one."""
    import ray
    if address == "local":
        return ray.is_initialized()
    return address is not None or "RAY_ADDRESS" in os.environ or ray.is_initialized()


def on_worker(cfg: JobConfig, fn, *args):
    """Run fn(*args) as one Ray task sized like one training worker; user errors come back as they are. With no
    cluster to join it runs in this process: a local Ray cluster started for one task would only add its start-up
    (~10 s on 2 cores: Ray's processes, then the task's imports in a fresh worker) on the same machine."""
    import ray
    from ray.exceptions import RayTaskError

    preflight.check_compute(cfg)
    preflight.check_ray_address(cfg.scaling.ray_address)
    if not joins_a_cluster(cfg.scaling.ray_address):
        try:
            return fn(worker_config(cfg).to_json(), *args)
        except (UserError, TrainingFailure):
            raise
        except Exception as e:
            raise TrainingFailure(f"{fn.__name__} failed: {type(e).__name__}: {e}") from None
    task = ray.remote(num_cpus=cfg.scaling.cpus_per_worker, num_gpus=1 if cfg.scaling.use_gpu else 0,
                      resources=cfg.scaling.resources_per_worker or None,
                      accelerator_type=cfg.scaling.accelerator_type, max_retries=0)(fn)
    with ray_connected(cfg.scaling.ray_address):
        try:
            return ray.get(task.remote(worker_config(cfg).to_json(), *args))
        except RayTaskError as e:
            if isinstance(e.cause, UserError):
                raise e.cause from None
            raise TrainingFailure(f"{fn.__name__} failed: {type(e.cause).__name__}: {e.cause}") from None


def run_snapshot(storage: str, name: str) -> str | None:
    """Ray Train's checkpoint snapshot of run `name` in `storage` (local or cloud), or None."""
    fs, path = filesystem(storage)
    try:
        with fs.open_input_stream(f"{path}/{name}/{RAY_TRAIN_SNAPSHOT}") as f:
            return f.read().decode()
    except (OSError, FileNotFoundError):
        return None


def finish_mlflow_run(uri, run_id, status: str) -> None:
    if uri and run_id:
        tracking.client(uri).set_terminated(run_id, status)
