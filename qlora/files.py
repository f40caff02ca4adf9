"""File helpers shared by model caching, checkpoint manifests and output locations."""
import hashlib
import os
from pathlib import Path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def output_home() -> Path:
    """Where relative output paths (checkpoint storage, the default MLflow store) live.

    $QLORA_HOME if set; else the current folder, except inside a `ray job submit` job, whose current
    folder is Ray's temporary copy of the uploaded working dir (outputs there would vanish).
    """
    if os.environ.get("QLORA_HOME"):
        return Path(os.environ["QLORA_HOME"]).expanduser().resolve()
    if os.environ.get("RAY_JOB_SUBMISSION_ID"):
        return Path.home() / "qlora_runs"
    return Path.cwd()
