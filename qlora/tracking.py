"""MLflow: one run per job, created by the driver; rank 0 streams metrics into it by run id.

Everything goes through `MlflowClient` with an explicit URI and run id, so no worker touches
MLflow's process-global "active run".
"""
from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path
from typing import Optional

from qlora.errors import EnvironmentProblem
from qlora.files import output_home

SECRET_WORDS = ("token", "password", "secret", "key")
RUN_NAME_TAG = "qlora_run_name"  # the job's run name, which is also its Ray Train run folder


def tracking_uri(configured: Optional[str]) -> str:
    """Config, else $MLFLOW_TRACKING_URI, else a sqlite store in the output home (see files.output_home)."""
    if configured or os.environ.get("MLFLOW_TRACKING_URI"):
        return configured or os.environ["MLFLOW_TRACKING_URI"]
    output_home().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{output_home() / 'mlflow.db'}"


def check_reachable(uri: str) -> None:
    """Fail before any training when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as r:
            r.read()
    except Exception as e:
        from qlora.config import redact_uri
        raise EnvironmentProblem(f"MLflow tracking server {redact_uri(uri)} is unreachable ({e})",
                                 "start it (mlflow server --host 127.0.0.1 --port 5000 ...) or fix tracking.uri") from None


def client(uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient
    return MlflowClient(tracking_uri=uri)


def experiment_id(c, name: str, uri: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # A local sqlite store keeps artifacts beside it (mlruns/), not in the process's cwd of the day.
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").resolve().as_uri()
    return c.create_experiment(name, artifact_location=location)


def start_run(uri: str, experiment: str, run_name: str, params: dict, tags: dict) -> str:
    c = client(uri)
    run = c.create_run(experiment_id(c, experiment, uri), run_name=run_name, tags=tags)
    from mlflow.entities import Param
    safe = [Param(k, str(v)[:6000]) for k, v in params.items() if not _looks_secret(k)]
    for i in range(0, len(safe), 100):
        c.log_batch(run.info.run_id, params=safe[i:i + 100])
    return run.info.run_id


def find_run(uri: str, experiment: str, run_name: str):
    """The newest MLflow run of a job with this run name, or None."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], f"tags.{RUN_NAME_TAG} = '{run_name}'", order_by=["start_time DESC"],
                         max_results=1)
    return runs[0] if runs else None


def _looks_secret(key: str) -> bool:
    last = key.rsplit(".", 1)[-1].lower()
    return any(w in last for w in SECRET_WORDS)


class MetricsSink:
    """Rank 0's metric stream. If the server goes away, metrics are kept and re-sent with the next call."""

    def __init__(self, uri: Optional[str], run_id: Optional[str]):
        self.uri, self.run_id, self.pending = uri, run_id, []
        # A dead server must cost a training step seconds, not MLflow's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self._client = client(uri) if uri and run_id else None

    def log(self, metrics: dict, step: int) -> None:
        if self._client is None:
            return
        import time
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        self.flush()

    def flush(self) -> None:
        if not self.pending or self._client is None:
            return
        try:
            self._client.log_batch(self.run_id, metrics=self.pending)
            self.pending = []
        except Exception as e:  # keep training; the metrics stay queued
            print(f"[qlora] MLflow unreachable, {len(self.pending)} metrics buffered for retry: {e}",
                  file=sys.stderr, flush=True)
