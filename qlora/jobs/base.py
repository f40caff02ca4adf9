"""What every job driver does first and last: every check that needs no cluster (model source, tokenizer, data
sources and the data cache's key, LoRA targets), the data prepared or reused, the job's MLflow run, and the
summary of a finished Train run.

Order matters: config, model source, tokenizer, data and the LoRA target check all run before Ray
or MLflow are touched, so bad input fails in seconds with exit code 2 and leaves nothing behind.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from qlora import adapters, kernels, memory_estimate, mfu, modeling, multiple_choice, runtime, strategies, tasks, tracking
from qlora.config import JobConfig, flatten, redact_uri
from qlora.data import PreparedData, pipeline
from qlora.files import ray_submission_id
from qlora.model_source import ModelSource, resolve

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
    modeling.check_lora_init(cfg.lora, source)
    tokenizer = modeling.load_tokenizer(source, cfg)
    started = time.perf_counter()
    data_plan = pipeline.plan(cfg.data, tokenizer, storage or runtime.storage_location(cfg))
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


def run_name(cfg: JobConfig) -> str:
    """tracking.run_name (templates are already resolved by the config), else a fresh timestamped name."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    model = Path(cfg.model.name).stem.replace("/", "-")
    return f"{model}-r{cfg.lora.r}-lr{cfg.train.learning_rate:g}-{time.strftime('%Y%m%d-%H%M%S')}"


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
            runtime.finish_mlflow_run(uri, run_id, "FINISHED")
        except Exception as e:  # the adapter is safe in storage; losing the tracking server must not lose it
            print(f"[qlora] WARNING: MLflow at {redact_uri(uri)} failed while logging the adapter "
                  f"({type(e).__name__}: {e}). "
                  f"The adapter is saved in storage: {ckpt_dir}", file=sys.stderr, flush=True)
            logged = {"mlflow_error": f"{type(e).__name__}: {e}"}
    return {"adapter": str(ckpt_dir / adapters.ADAPTER_DIR), "checkpoint": str(ckpt_dir), "mlflow_run_id": run_id,
            "tracking_uri": redact_uri(uri) if uri else None, **logged, "metrics_before": before, "metrics_after": after,
            "train_seconds": metrics.get("train_seconds"), "steps": metrics.get("step"),
            "preemptions": metrics.get("preemptions"), "restarts": metrics.get("restarts"),
            "tokens_per_second": metrics.get("tokens_per_second"),
            **{k: metrics.get(k) for k in mfu.CLOCK_KEYS}, "packing_efficiency": metrics.get("packing_efficiency"),
            "weights_memory_gib": metrics.get("weights_memory_gib"), "peak_memory_gib": metrics.get("peak_memory_gib"),
            "peak_memory_gib_by_rank": metrics.get("peak_memory_gib_by_rank")}


def model_metadata(job: Prepared) -> dict:
    """What an adapter is worthless without: its exact base model, quantization and training data."""
    m = job.cfg.model
    return {"base_model": m.name, "base_model_source": job.source.description, "base_model_gguf_file": m.gguf_file or "",
            "base_model_revision": m.revision or "", "quantization": _quant_tag(job.cfg),
            "lora_r": str(job.cfg.lora.r), "lora_alpha": str(job.cfg.lora.alpha), "data_hash": job.data.data_hash}


def _quant_tag(cfg: JobConfig) -> str:
    q = cfg.quantization
    return {4: f"bnb-4bit-{q.quant_type}{'-dq' if q.double_quant else ''}", 8: "bnb-8bit", 16: "16bit"}[q.bits]
