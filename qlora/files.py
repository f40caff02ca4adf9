"""File helpers shared by model caching, checkpoint manifests and output locations."""
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def filesystem(location: str):
    """(pyarrow filesystem, path in it) of a local folder or a cloud URI (s3://, gs://, ...)."""
    import pyarrow.fs
    if "://" in location:
        return pyarrow.fs.FileSystem.from_uri(location)
    return pyarrow.fs.LocalFileSystem(), str(Path(location).absolute())


def output_home() -> Path:
    """Where relative output paths (checkpoint storage, the default MLflow store) live.

    $QLORA_HOME if set; else the current folder, except inside a `ray job submit` job, whose current
    folder is Ray's temporary copy of the uploaded working dir (outputs there would vanish).
    """
    if os.environ.get("QLORA_HOME"):
        return Path(os.environ["QLORA_HOME"]).expanduser().resolve()
    if ray_submission_id():
        return Path.home() / "qlora_runs"
    return Path.cwd()


def ray_submission_id() -> str | None:
    """The `ray job submit` submission id when this process is a submitted job's entrypoint."""
    # The job supervisor hands the entrypoint its job config (runtime env + metadata) in this variable.
    config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return config.get("metadata", {}).get("job_submission_id")


@contextlib.contextmanager
def folder_once(target: Path):
    """Yield a fresh temporary folder beside `target` to fill; on success it becomes `target` in one rename unless
    another process got there first (caches that two jobs may fill at once: the first rename wins, the same
    content either way). The temporary folder never outlives the block."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        yield tmp
        if not target.exists():
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def writing_folder(target: Path):
    """Yield `target` + ".tmp" to fill; on success it replaces `target` in one rename, so a crash never
    leaves a half-written folder where a checkpoint or an export is expected (a leftover .tmp is cleared
    by the next attempt). `target` must be absent or an empty folder, or one this process may replace."""
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
