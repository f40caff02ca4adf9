"""The train job (ray_jobs.train): checks, the data, one Ray Train run resumed if its checkpoints exist, one
MLflow run, the adapter logged and registered."""
from __future__ import annotations

import time

from qlora import preflight, run_identity, runtime, tracking, train_driver
from qlora.config import JobConfig, redact_uri
from qlora.errors import Interrupted, stop_signal
from qlora.jobs.base import ensure_data, finish, prepare_job, run_name, start_mlflow_run

def train(cfg: JobConfig) -> dict:
    job = prepare_job(cfg)
    preflight.check(cfg)  # compute, Ray address, storage, MLflow: seconds, and nothing is created
    if not job.data_plan.needs_ray:  # cached, or small enough for this process: bad records fail before Ray
        cfg = ensure_data(job).cfg
    name = run_name(cfg)
    storage = runtime.storage_root(cfg)
    resuming = runtime.has_checkpoints(storage, name)
    if resuming:  # before Ray starts: a reused name with another config is refused, not resumed
        run_identity.check_same_run(runtime.saved_run_config(storage, name), runtime.worker_config(cfg), name,
                                    storage)
    uri = runtime.tracking_target(cfg)
    with runtime.ray_connected(cfg.scaling.ray_address):
        cfg = ensure_data(job).cfg  # a Ray Data preparation runs here, on the cluster, before any GPU is asked for
        run_id, log_result = None, True
        if resuming:  # Ray Train restores the run's checkpoint state by itself
            print(f"[qlora] run {name} has checkpoints in {storage}; resuming from the latest", flush=True)
            previous = tracking.find_run(uri, cfg.tracking.experiment, name) if uri else None
            if previous is not None:
                run_id, log_result = previous.info.run_id, previous.info.status != "FINISHED"
                tracking.client(uri).update_run(run_id, status="RUNNING" if log_result else "FINISHED")
        if uri and run_id is None:
            run_id = start_mlflow_run(job, uri, name)
        started = time.time()
        try:
            result = train_driver.fit_with_memory_retries(cfg, name, storage, uri, run_id, job.data.cache)
        except (KeyboardInterrupt, SystemExit) as e:
            if not stop_signal(e):
                raise
            runtime.finish_mlflow_run(uri, run_id, "KILLED")
            raise Interrupted(f"run {name} stopped (Ctrl+C or SIGTERM to the job); its checkpoints are kept in "
                              f"{storage}/{name}", f"run the same command with --set tracking.run_name={name}") from None
        # A run that had finished re-reports its result; its adapter is logged (and registered) once only.
        summary = finish(result, job, uri if log_result else None, run_id)
        print(f"\nadapter: {summary['adapter']}\nMLflow run: {run_id} ({redact_uri(uri) if uri else None})\n"
              f"held-out before: {summary['metrics_before']}\nheld-out after:  {summary['metrics_after']}", flush=True)
        return {**summary, "data_cache": job.data.cache, "data_seconds": round(job.data_seconds, 2),
                "job_seconds": round(time.time() - started, 1)}
