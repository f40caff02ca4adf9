"""`ray_jobs.train --dry-run`: everything the train job checks and prepares, and what it would cost, without
training: the resolved config, the model, the data (prepared into the cache, or reused), the whole set's token
statistics, truncation and packing, the LoRA parameter count and a GPU memory estimate per worker."""
from __future__ import annotations

import yaml

from qlora import memory_estimate, preflight, runtime, tasks
from qlora.batching import BatchPlan
from qlora.config import JobConfig
from qlora.data import padding_efficiency
from qlora.jobs.base import describe_preparation, ensure_data, prepare_job, run_name


def dry_run(cfg: JobConfig) -> dict:
    job = prepare_job(cfg)
    preflight.check(cfg, network=False)
    if not job.data_plan.needs_ray:  # cached, or small enough for this process: bad records fail before Ray
        ensure_data(job)
    else:  # a Ray Data preparation: on the configured cluster, or a local one started here
        with runtime.ray_connected(cfg.scaling.ray_address):
            ensure_data(job)
    cfg = job.cfg
    print("# resolved config\n" + yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    print(f"model: {job.source.description} -> {job.source.path}")
    print(f"data cache: {describe_preparation(job.data)}")
    s = job.data.stats
    task = tasks.for_config(cfg)
    print("\n".join(task.data_lines(cfg, job.data.fmt, len(job.data.eval), s)))
    fill = batch_fill(cfg, job.data.lengths)
    if cfg.data.packing:
        print(f"packing: {s['records'] - s['dropped_no_labels']} examples in {s['packed_rows']} rows of <= "
              f"{cfg.data.max_length} tokens (rows {s['packed_row_fill']:.1%} full)")
    print(f"packing efficiency (real tokens / batch slots, first epoch, one worker, batch_size="
          f"{cfg.train.batch_size}{', packed rows' if cfg.data.packing else ''}"
          f"{', group_by_length' if cfg.train.group_by_length else ''}): {fill:.1%}")
    print(f"LoRA trainable parameters: {job.lora_params:,} (matches the independent count)")
    setup = memory_estimate.Setup.from_config(cfg)
    estimate = memory_estimate.estimate(job.shape, setup)
    print(estimate.describe(setup, on_gpu=cfg.scaling.use_gpu))
    gib = {"gpu_memory_estimate_gib": round(estimate.total / memory_estimate.GIB, 2),
           "gpu_memory_evaluation_gib": round(estimate.evaluation / memory_estimate.GIB, 2)}
    cache = {"data_cache": job.data.cache, "data_cache_reused": job.data.reused, "data_preparation": job.data.work,
             "data_seconds": round(job.data_seconds, 2)}
    if job.mc_records:
        print(f"multiple-choice eval: {job.mc_records} records from {cfg.evaluation.multiple_choice_path}")
    lines, numbers = task.example_report(cfg, job.data, job.tokenizer)
    print("\n".join(lines))
    return {"trainable_params": job.lora_params, "records": s["records"], "eval_records": len(job.data.eval),
            "token_length_p50": s["token_length_p50"], "token_length_p95": s["token_length_p95"],
            "truncated_fraction": s["truncated_fraction"], "packing_efficiency": fill, "run_name": run_name(cfg),
            **numbers, **cache, **gib}


def batch_fill(cfg: JobConfig, lengths: list[int]) -> float:
    """Real tokens / batch slots over the first epoch's micro-batches (what the workers'
    packing_efficiency metric will show: packed rows are padded to data.max_length)."""
    plan = BatchPlan(len(lengths), cfg, lengths)
    batches = [[lengths[i] for i in plan.micro_batch(k)[1]] for k in range(plan.per_epoch)]
    if cfg.data.packing:
        return sum(map(sum, batches)) / (sum(map(len, batches)) * cfg.data.max_length)
    return padding_efficiency(batches)
