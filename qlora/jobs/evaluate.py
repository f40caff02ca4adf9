"""The evaluate job (ray_jobs.evaluate): a saved adapter's held-out metrics and predictions, on one worker or split
over scaling.num_workers Ray Train workers as training evaluates.

Checks run in the job driver first (adapter found and intact, config valid, data readable, MLflow
reachable); the model work then runs on Ray with one training worker's resources, so on a cluster it lands
on a GPU node, not on the head. The adapter travels to the task as bytes (it is megabytes), so the task needs
no shared file system.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path

import ray.train

from qlora import (adapters, console, distributed, evaluation, multiple_choice, preflight, runtime, tasks, tracking,
                   train_driver)
from qlora.config import JobConfig
from qlora.data.pipeline import open_prepared
from qlora.jobs.base import ensure_data, prepare_job
from qlora.payload import WorkerPayload


def evaluate(ref: str, cfg: JobConfig, folder: Path, out: str | None) -> dict:
    job = prepare_job(cfg)  # data and model checks before Ray
    uri = runtime.tracking_target(cfg)
    started = time.time()
    if not job.data_plan.needs_ray:  # cached, or small enough for this process: bad records fail before Ray
        ensure_data(job)
    # A Ray Data preparation needs the cluster first; else the worker's checks run before it is joined.
    with runtime.ray_connected(cfg.scaling.ray_address) if job.data is None else contextlib.nullcontext():
        cache = ensure_data(job).data.cache
        if cfg.scaling.num_workers > 1:  # the held-out set split over Ray Train workers, as training evaluates
            result = _evaluate_on_workers(cfg, adapters.pack(folder), cache)
        else:
            result = runtime.on_worker(cfg, _evaluate_task, adapters.pack(folder), cache)
    metrics, predictions = result["metrics"], result["predictions"]
    print("held-out metrics: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
    for p in predictions[:3]:
        print(tasks.for_config(cfg).describe_prediction(p))
    run_id = None
    with tempfile.TemporaryDirectory() as tmp:
        folder_out = Path(out) if out else Path(tmp)
        evaluation.write_results(folder_out, metrics, predictions)
        if uri:
            trained_on = adapters.read_config(folder).data.path
            run_id = tracking.start_run(uri, cfg.tracking.experiment, f"eval-{Path(ref).name or ref}", {}, {
                "evaluated_adapter": ref, "data_hash": job.data.data_hash, "eval_data": cfg.data.eval_path or cfg.data.path,
                "adapter_trained_on": trained_on})
            c = tracking.client(uri)
            tracking.MetricsSink(uri, run_id).log(metrics, 0)
            c.log_artifacts(run_id, str(folder_out))
            c.set_terminated(run_id, "FINISHED")
    return {"metrics": metrics, "eval_records": len(job.data.eval), "mlflow_run_id": run_id,
            "out": str(Path(out).resolve()) if out else None, "seconds": round(time.time() - started, 1)}


def _evaluate_task(cfg_json: str, files: dict, data_cache: str) -> dict:
    console.quiet_libraries()
    cfg = JobConfig.from_json(cfg_json)
    return _evaluate(cfg, files, distributed.context(cfg.scaling.use_gpu), data_cache)


def _evaluate(cfg: JobConfig, files: dict, ctx, data_cache: str) -> dict:
    """Metrics over every rank, and all predictions in record order (on each rank); one process or a
    Ray Train worker group alike: each rank takes its share of the held-out records."""
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = adapters.load_for_inference(cfg, adapters.unpack(files, Path(tmp)), ctx.device)
    data = open_prepared(data_cache)
    predictions: list[dict] = []
    metrics = tasks.for_config(cfg).evaluate(model, data.eval, tokenizer, cfg, ctx,
                                             multiple_choice.prepare(cfg, tokenizer), predictions)
    return {"metrics": metrics, "predictions": distributed.gather_shards(predictions, ctx)}


def _evaluate_on_workers(cfg: JobConfig, files: dict, data_cache: str) -> dict:
    """_evaluate on `scaling.num_workers` Ray Train workers (the training job's resources, the Train driver's fit)."""
    preflight.check_compute(cfg)
    preflight.check_ray_address(cfg.scaling.ray_address)
    payload = WorkerPayload(runtime.worker_config(cfg).to_json(), data_cache, files=files)
    with runtime.ray_connected(cfg.scaling.ray_address):
        result = train_driver.fit(cfg, payload, f"eval-{time.strftime('%Y%m%d-%H%M%S')}", runtime.storage_root(cfg),
                                  loop=evaluation_loop, what="evaluation")
        with result.checkpoint.as_directory() as folder:
            return json.loads((Path(folder) / "result.json").read_text())


def evaluation_loop(config: dict) -> None:
    """Each Ray Train worker's part of _evaluate_on_workers; rank 0 hands back the gathered result."""
    console.quiet_libraries()
    payload = WorkerPayload.from_dict(config)
    cfg = JobConfig.from_json(payload.config)
    ctx = distributed.context(cfg.scaling.use_gpu)
    result = _evaluate(cfg, payload.files, ctx, payload.data_cache)
    with tempfile.TemporaryDirectory() as tmp:  # Ray Train v2 keeps only what comes with a checkpoint
        checkpoint = None
        if ctx.is_writer:  # every rank has the gathered result; one writes it
            (Path(tmp) / "result.json").write_text(json.dumps(result))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({}, checkpoint=checkpoint)
