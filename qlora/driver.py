"""The Train driver: check everything cheap first, then one TorchTrainer run and one MLflow run.

Order matters: config, model source, tokenizer, data and the LoRA target check all run before Ray
or MLflow are touched, so bad input fails in seconds with exit code 2 and leaves nothing behind.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from qlora import (adapters, console, kernels, memory, memory_estimate, modeling, multiple_choice, plan, preflight,
                   speed, strategies, tasks, tracking)
from qlora.config import JobConfig, flatten, redact_uri
from qlora.data import PreparedData, pipeline
from qlora.errors import EnvironmentProblem, TrainingFailure, UserError
from qlora.files import output_home, ray_submission_id
from qlora.model_source import ModelSource, resolve


RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints
# How often Ray Train's controller polls the workers, and so takes their reports: a worker's report queue holds
# one result, so each ray.train.report waits until the previous one is taken. At Ray's default of 2 s, reports
# from steps shorter than that blocked the training loop for the rest of the 2 s (measured on an H200: 1.2 s
# per report of 0.74 s steps); at 0.1 s a report costs milliseconds. Ray passes it on to controller and workers.
RAY_TRAIN_POLL_INTERVAL_S = "0.1"


@dataclass
class Prepared:
    cfg: JobConfig
    source: ModelSource
    tokenizer: object
    data_plan: pipeline.DataPlan
    data: PreparedData | None  # None until prepared: a Ray Data preparation waits for the cluster (ensure_data)
    data_seconds: float = 0.0  # this job's time on its data: sources, key and lookup, then preparing or opening it
    lora_params: int = 0
    shape: memory_estimate.ModelShape | None = None  # parameter counts and sizes, for the memory estimate
    mc_records: int = 0


def prepare_job(cfg: JobConfig, storage: str | None = None) -> Prepared:
    """All checks that need no cluster: model source, tokenizer, data sources and the data cache's key, LoRA
    targets (on the meta device). The data itself is prepared by ensure_data, after the environment checks.
    `storage`: the storage root the data cache lives under, when a caller has resolved it (sweep trials, whose
    current folder moves)."""
    strategies.check_environment(cfg)  # e.g. deepspeed is installed
    if cfg.model.trust_remote_code:
        print("[qlora] WARNING: model.trust_remote_code=true runs Python code from the model repository", flush=True)
    if cfg.optimizer_to_use() != cfg.train.optimizer:
        print(f"[qlora] train.optimizer={cfg.train.optimizer} needs a GPU and scaling.use_gpu is false: training with "
              f"train.cpu_optimizer_fallback={cfg.train.cpu_optimizer_fallback}", flush=True)
    source = resolve(cfg.model.name, cfg.model.gguf_file, cfg.model.revision)
    tokenizer = modeling.load_tokenizer(source, cfg)
    started = time.perf_counter()
    data_plan = pipeline.plan(cfg.data, tokenizer, storage or storage_location(cfg))
    data_seconds = time.perf_counter() - started
    mc_items = multiple_choice.prepare(cfg, tokenizer)  # checked here so a bad file fails before Ray
    lora_model = modeling.meta_lora_model(cfg, source)
    if cfg.train.fused_cross_entropy:  # before Ray, not on the worker
        kernels.check_fused_loss(lora_model.config)
    strategies.check_model(cfg, lora_model)  # e.g. the layers FSDP will shard exist
    return Prepared(cfg, source, tokenizer, data_plan, None, data_seconds, modeling.lora_param_count(lora_model),
                    memory_estimate.shape_of(lora_model), len(mc_items))


def ensure_data(job: Prepared) -> Prepared:
    """The job's data prepared (or opened from the cache): in this process, or by Ray Data (Ray connected)."""
    if job.data is None:
        cfg, task, started = job.cfg, tasks.for_config(job.cfg), time.perf_counter()
        job.data = pipeline.prepare(job.data_plan, check=lambda fmt, meta, where: task.check_data(cfg, fmt, meta, where))
        job.data_seconds += time.perf_counter() - started
        job.cfg = task.resolve(cfg, job.data)  # e.g. model.num_labels inferred from the labels
        print(f"[qlora] data: {describe_preparation(job.data)}; this job's data step {job.data_seconds:.1f} s",
              flush=True)
    return job


def describe_preparation(data: PreparedData) -> str:
    w = data.work
    how = f"{w.get('executor')}, {w.get('nodes', 1)} node(s), {w.get('seconds')} s"
    return f"{'reused the cache' if data.reused else 'prepared'} {data.cache} ({'prepared by ' if data.reused else ''}{how})"


def storage_location(cfg: JobConfig) -> str:
    """scaling.storage_path as the driver will use it (a cloud URI, or a local folder), creating nothing."""
    storage = cfg.scaling.storage_path
    return storage if "://" in storage else str(preflight.storage_folder(storage))


def run_name(cfg: JobConfig) -> str:
    """tracking.run_name (templates are already resolved by the config), else a fresh timestamped name."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    model = Path(cfg.model.name).stem.replace("/", "-")
    return f"{model}-r{cfg.lora.r}-lr{cfg.train.learning_rate:g}-{time.strftime('%Y%m%d-%H%M%S')}"


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


def connect_ray(address: str | None) -> bool:
    """Join the configured/submitting cluster, or start a local one. Returns True if started here."""
    import ray
    if ray.is_initialized():
        return False
    started_here = address is None and "RAY_ADDRESS" not in os.environ
    try:
        ray.init(address=address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise EnvironmentProblem(f"Ray cluster at {address or os.environ.get('RAY_ADDRESS')} is unreachable ({e})",
                                 "start it with `ray start --head`, or fix scaling.ray_address / RAY_ADDRESS") from None
    return started_here


def storage_root(cfg: JobConfig) -> str:
    storage = cfg.scaling.storage_path
    if "://" in storage:
        return storage
    path = output_home() / Path(storage).expanduser()  # an absolute path stays as it is
    _check_writable(path)
    return str(path)


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
    fs, path = pyarrow.fs.FileSystem.from_uri(storage if "://" in storage else Path(storage).as_uri())
    return fs.get_file_info(f"{path}/{name}/{RAY_TRAIN_SNAPSHOT}").type != pyarrow.fs.FileType.NotFound


def start_mlflow_run(job: Prepared, uri: str, name: str, extra_tags: dict | None = None) -> str:
    import ray
    cfg = job.cfg
    tags = {"base_model": job.source.description, "quantization": _quant_tag(cfg), "data_hash": job.data.data_hash,
            "lora_trainable_params": str(job.lora_params), "ray_job_id": ray.get_runtime_context().get_job_id(),
            tracking.RUN_NAME_TAG: name,
            **(extra_tags or {})}
    if ray_submission_id():
        tags["ray_submission_id"] = ray_submission_id()
    return tracking.start_run(uri, cfg.tracking.experiment, name, flatten(cfg), tags)


def fit(cfg: JobConfig, payload: dict, name: str, storage: str, callbacks=()):
    """One Ray Train run of `scaling.num_workers` workers; returns Ray's Result or raises TrainingFailure."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from qlora.worker import train_loop_per_worker

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", RAY_TRAIN_POLL_INTERVAL_S)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=payload,
        scaling_config=ScalingConfig(**plan.scaling_kwargs(cfg.scaling)),  # the request `ray_jobs.plan` checks
        run_config=RunConfig(name=name, storage_path=storage, callbacks=list(callbacks),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                             logging_config=LoggingConfig(log_level=console.ray_train_log_level())),
    )
    try:
        return trainer.fit()
    except Exception as e:  # Ray wraps the worker's exception (TrainingFailed / WorkerGroupError)
        _finish(payload.get("tracking_uri"), payload.get("mlflow_run_id"), "FAILED")
        raise worker_error(e, "training") from None


def fit_with_memory_retries(cfg: JobConfig, name: str, storage: str, uri: str | None, run_id: str | None,
                            data_cache: str):
    """fit(); with train.auto_batch_size, a GPU out-of-memory retries with half the micro-batch and twice
    the accumulation (same global batch) as a fresh run, until it fits or the micro-batch is 1."""
    base_name = name
    while True:
        payload = {"config": worker_config(cfg).to_json(), "tracking_uri": uri, "mlflow_run_id": run_id,
                   "data_cache": data_cache, "verbose": console.verbose()}
        try:
            return fit(cfg, payload, name, storage)
        except memory.OutOfMemory as e:
            smaller = memory.halved(cfg) if cfg.train.auto_batch_size else None
            if smaller is None:
                raise
            print(f"[qlora] {e}\n[qlora] train.auto_batch_size: retrying with train.batch_size="
                  f"{smaller.train.batch_size}, train.gradient_accumulation={smaller.train.gradient_accumulation}",
                  file=sys.stderr, flush=True)
            if uri and run_id:
                tracking.client(uri).update_run(run_id, status="RUNNING")
                tracking.client(uri).set_tag(run_id, "auto_batch_size", str(smaller.train.batch_size))
            cfg, name = smaller, f"{base_name}-bs{smaller.train.batch_size}"  # a fresh Ray Train run folder


def finish(result, job: Prepared, uri: str | None, run_id: str | None) -> dict:
    """Log the final adapter to MLflow as a model (registered if asked), close the run, summarise."""
    metrics = result.metrics or {}
    ckpt_dir = Path(result.checkpoint.path)
    before = {k.removeprefix("before_"): v for k, v in metrics.items() if k.startswith("before_")}
    after = {k: metrics[k] for k in before if k in metrics}
    logged = {}
    if uri and run_id:
        try:
            logged = adapters.log_to_mlflow(uri, run_id, ckpt_dir, model_metadata(job), job.cfg.tracking.register_as)
            c = tracking.client(uri)
            c.log_artifact(run_id, str(ckpt_dir / "config.yaml"))
            for name in ("metrics.json", "predictions.jsonl"):  # written by rank 0 beside the final adapter
                if (ckpt_dir / name).is_file():
                    c.log_artifact(run_id, str(ckpt_dir / name))
            c.set_tag(run_id, "checkpoint_path", str(ckpt_dir))
            _finish(uri, run_id, "FINISHED")
        except Exception as e:  # the adapter is safe in storage; losing the tracking server must not lose it
            print(f"[qlora] WARNING: MLflow at {redact_uri(uri)} failed while logging the adapter ({type(e).__name__}: {e}). "
                  f"The adapter is saved in storage: {ckpt_dir}", file=sys.stderr, flush=True)
            logged = {"mlflow_error": f"{type(e).__name__}: {e}"}
    return {"adapter": str(ckpt_dir / adapters.ADAPTER_DIR), "checkpoint": str(ckpt_dir), "mlflow_run_id": run_id,
            "tracking_uri": redact_uri(uri) if uri else None, **logged, "metrics_before": before, "metrics_after": after,
            "train_seconds": metrics.get("train_seconds"), "steps": metrics.get("step"),
            "tokens_per_second": metrics.get("tokens_per_second"),
            **{k: metrics.get(k) for k in speed.CLOCK_KEYS}, "packing_efficiency": metrics.get("packing_efficiency"),
            "weights_memory_gib": metrics.get("weights_memory_gib"), "peak_memory_gib": metrics.get("peak_memory_gib"),
            "peak_memory_gib_by_rank": metrics.get("peak_memory_gib_by_rank")}


def model_metadata(job: Prepared) -> dict:
    """What an adapter is worthless without: its exact base model, quantization and training data."""
    m = job.cfg.model
    return {"base_model": m.name, "base_model_source": job.source.description, "base_model_gguf_file": m.gguf_file or "",
            "base_model_revision": m.revision or "", "quantization": _quant_tag(job.cfg),
            "lora_r": str(job.cfg.lora.r), "lora_alpha": str(job.cfg.lora.alpha), "data_hash": job.data.data_hash}


def train(cfg: JobConfig) -> dict:
    import ray

    job = prepare_job(cfg)
    preflight.check(cfg)  # compute, Ray address, storage, MLflow: seconds, and nothing is created
    if not job.data_plan.needs_ray:  # cached, or small enough for this process: bad records fail before Ray
        cfg = ensure_data(job).cfg
    name = run_name(cfg)
    storage = storage_root(cfg)
    uri = tracking_target(cfg)
    local = connect_ray(cfg.scaling.ray_address)
    try:
        cfg = ensure_data(job).cfg  # a Ray Data preparation runs here, on the cluster, before any GPU is asked for
        run_id, log_result = None, True
        if has_checkpoints(storage, name):  # Ray Train restores the run's checkpoint state by itself
            print(f"[qlora] run {name} has checkpoints in {storage}; resuming from the latest", flush=True)
            previous = tracking.find_run(uri, cfg.tracking.experiment, name) if uri else None
            if previous is not None:
                run_id, log_result = previous.info.run_id, previous.info.status != "FINISHED"
                tracking.client(uri).update_run(run_id, status="RUNNING" if log_result else "FINISHED")
        if uri and run_id is None:
            run_id = start_mlflow_run(job, uri, name)
        started = time.time()
        result = fit_with_memory_retries(cfg, name, storage, uri, run_id, job.data.cache)
        # A run that had finished re-reports its result; its adapter is logged (and registered) once only.
        summary = finish(result, job, uri if log_result else None, run_id)
        print(f"\nadapter: {summary['adapter']}\nMLflow run: {run_id} ({redact_uri(uri) if uri else None})\n"
              f"held-out before: {summary['metrics_before']}\nheld-out after:  {summary['metrics_after']}", flush=True)
        return {**summary, "data_cache": job.data.cache, "data_seconds": round(job.data_seconds, 2),
                "job_seconds": round(time.time() - started, 1)}
    finally:
        if local:
            ray.shutdown()


def _quant_tag(cfg: JobConfig) -> str:
    q = cfg.quantization
    return {4: f"bnb-4bit-{q.quant_type}{'-dq' if q.double_quant else ''}", 8: "bnb-8bit", 16: "16bit"}[q.bits]


def _finish(uri, run_id, status: str) -> None:
    if uri and run_id:
        tracking.client(uri).set_terminated(run_id, status)


def worker_error(e: BaseException, what: str) -> Exception:
    """The error to raise for a failed Ray Train run: the worker's own UserError / TrainingFailure as it
    is (its message names the problem and the fix), anything else wrapped as a TrainingFailure."""
    cause = _root_cause(e)
    if isinstance(cause, (UserError, TrainingFailure)):
        return cause
    return TrainingFailure(f"{what} failed: {type(cause).__name__}: {cause}")


def _root_cause(e: BaseException) -> BaseException:
    """The exception a worker raised, unwrapped from Ray Train's WorkerGroupError and RayTaskError."""
    failures = getattr(e, "worker_failures", None)
    if failures:
        e = failures[min(failures)]
    e = getattr(e, "cause", None) or e
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def _check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise EnvironmentProblem(f"scaling.storage_path {path} is not writable ({e})",
                                 "choose a folder you can write to, or a cloud URI") from None
