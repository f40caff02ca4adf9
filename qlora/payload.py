"""What crosses the Ray boundary to every Ray Train worker, typed: Ray Train hands the loop a plain dict
(train_loop_config), so the driver sends `WorkerPayload(...).to_dict()` and the loop reads it back with
`WorkerPayload.from_dict`; a missing or misspelt key fails there, not as a None deep in the loop."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional


@dataclass(frozen=True)
class WorkerPayload:
    config: str  # JobConfig.to_json() with paths as workers see them (runtime.worker_config); validated again there
    data_cache: str  # the prepared data's cache folder (qlora/data/cache.py), memory-mapped by each worker
    tracking_uri: Optional[str] = None  # MLflow, for rank 0's metrics (None: tracking off)
    mlflow_run_id: Optional[str] = None
    verbose: bool = False  # --verbose: the libraries' own output too (qlora/console.py)
    files: Optional[dict] = None  # evaluate on workers: the adapter's files as bytes (adapters.pack)
    storage_root: Optional[str] = None  # scaling.storage_path as the driver resolved it (qlora/compile_cache.py)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "WorkerPayload":
        known = {f.name for f in fields(cls)}
        if set(raw) - known or {"config", "data_cache"} - set(raw):
            raise TypeError(f"worker payload keys {sorted(raw)}; expected {sorted(known)}")
        return cls(**raw)
