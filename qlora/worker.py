"""The loop each Ray Train worker runs, as named steps: set up (data, 4-bit base + LoRA, strategy, optimizer, the
resumed state), evaluate, train step by step, and at each log step report (metrics, checkpoint, evaluation).

Our own loop rather than HF Trainer: resuming must restore the exact step, optimizer, scheduler, RNG
and data position (ray #46814 is HF training restarting at epoch 1 after a restore), and every
metric Ray Tune or MLflow sees is computed here in plain sight.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from qlora import (checkpoint, compile_cache, console, distributed, evaluation, fp8, kernels, mfu, modeling,
                   multiple_choice, preemption, strategies, tasks)
from qlora.batching import BatchPlan, model_inputs
from qlora.config import JobConfig
from qlora.data import PreparedData, to_tensors
from qlora.data.pipeline import open_prepared
from qlora.errors import TrainingFailure
from qlora.model_source import resolve
from qlora.payload import WorkerPayload
from qlora.tracking import MetricsSink
from qlora.train_step import (PEAK_MEMORY_KIND, Clock, Window, forward_backward, make_optimizer, make_scheduler,
                              out_of_memory, peak_memory_gib)


def log(ctx: distributed.Context, message: str) -> None:
    if ctx.is_writer:
        # Not print(): Ray Train patches it to both log and echo, which shows every line twice.
        sys.stdout.write(f"[qlora] {message}\n")
        sys.stdout.flush()


@dataclass
class Run:
    """Everything one worker's training needs, set up once."""
    cfg: JobConfig
    strategy: strategies.Strategy  # DDP / FSDP / DeepSpeed (or one process), with this worker's rank context
    tokenizer: object
    data: PreparedData
    model: torch.nn.Module      # the peft model (what evaluation and checkpoints use)
    wrapped: torch.nn.Module    # what the training step calls: DDP / FSDP / a DeepSpeed engine around `model`
    optimizer: object
    scheduler: object
    plan: BatchPlan
    hidden: Optional[kernels.HiddenStates]  # train.fused_cross_entropy
    dtype: torch.dtype
    flops: mfu.FlopCounter
    mc_items: list
    weights_gib: float
    sink: Optional[MetricsSink]
    trainer_state: Optional[dict]  # a resumed checkpoint's optimizer, scheduler, RNG and loop state
    eval_state: dict = field(default_factory=dict)  # what the task reuses between held-out evaluations
    compiled_to_keep: Optional[str] = None  # where to write the compile cache after the first step (rank 0)

    @property
    def ctx(self) -> distributed.Context:
        return self.strategy.ctx

    @property
    def task(self) -> tasks.CausalLM:
        return tasks.for_config(self.cfg)

    def task_loss(self, model, inputs: dict, labels: torch.Tensor):
        return self.task.forward_loss(model, inputs, labels, self.cfg)


def set_up(payload: WorkerPayload) -> Run:
    if payload.verbose:
        os.environ[console.VERBOSE_ENV] = "1"
    console.quiet_libraries()  # before the libraries load: bitsandbytes' notice comes with its import
    cfg = JobConfig.from_json(payload.config)  # validated again on this side of the Ray boundary
    strategy = strategies.for_worker(cfg)
    ctx = strategy.ctx
    source = resolve(cfg.model.name, cfg.model.gguf_file, cfg.model.revision)
    tokenizer = modeling.load_tokenizer(source, cfg)
    data = open_prepared(payload.data_cache)  # the driver's prepared data, memory-mapped
    cfg = tasks.for_config(cfg).resolve(cfg, data)  # saved with checkpoints, so the adapter knows its classes
    # A classifier's new head is initialised randomly inside from_pretrained: same seed, same head on every rank.
    torch.manual_seed(cfg.train.seed)
    if cfg.train.fp8_base:
        fp8.check_device(ctx.device)  # before the weights load
    base = modeling.load_base_model(cfg, source, ctx.device, tokenizer.pad_token_id, prepare=strategy.prepare_base,
                                    keep_quantized=ctx.writes_node_cache, report=lambda line: log(ctx, line))
    kernels.apply_layer_kernels(base, cfg.train)
    if cfg.train.fp8_base:
        log(ctx, f"FP8 matmuls in {fp8.use_fp8_base(base)} 4-bit linear layers")
    if cfg.train.gradient_checkpointing and cfg.train.checkpointed_fraction < 1:
        kept = kernels.select_checkpointed_layers(base, cfg.train.checkpointed_fraction)
        log(ctx, f"activation checkpointing in {len(kept)} decoder layers: {kept}")
    torch.manual_seed(cfg.train.seed)  # identical LoRA init on every rank
    model = modeling.attach_lora(base, cfg.lora, cfg.model.task)
    modeling.init_lora_weights(model, cfg.lora, source)
    compiled_to_keep = None
    if cfg.train.compile:
        n = kernels.compile_layers(model, cfg.train.compile_memory_budget)
        compiled_to_keep = reuse_compiled(cfg, ctx, payload.storage_root)
        log(ctx, f"compiling {n} decoder layers (the first steps include the compile)")
    hidden = kernels.HiddenStates(model, cfg.train.kernels == "liger") if cfg.train.fused_cross_entropy else None
    dtype = modeling.compute_dtype(cfg.quantization, ctx.device)
    flops = mfu.FlopCounter(mfu.base_param_count(model), base.config,
                            torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else None,
                            mfu.dora_flops(*mfu.dora_layers(model)))
    trainer_state = resume_adapter(model, ctx)  # before sharding: each rank loads the whole saved adapter
    wrapped, optimizer = strategy.wrap(model, lambda params: make_optimizer(cfg, params),
                                       kernels.autocast_dtype(ctx.device, dtype))
    weights_gib = distributed.frozen_gib(model)
    plan = BatchPlan(len(data.train), cfg, data.lengths)
    sink = MetricsSink(payload.tracking_uri, payload.mlflow_run_id) if ctx.is_writer else None
    return Run(cfg, strategy, tokenizer, data, model, wrapped, optimizer, make_scheduler(cfg, optimizer, plan.total_steps),
               plan, hidden, dtype, flops, multiple_choice.prepare(cfg, tokenizer), weights_gib, sink, trainer_state,
               compiled_to_keep=compiled_to_keep)


def reuse_compiled(cfg: JobConfig, ctx: distributed.Context, storage_root: Optional[str]) -> Optional[str]:
    """Load the compile cache this run's shape has in storage (qlora/compile_cache.py); returns where rank 0
    should write one after its first step when there was none."""
    if storage_root is None:
        return None
    where = compile_cache.location(storage_root, cfg, ctx.device, ctx.world_size)
    found = compile_cache.load(where)
    if found:
        log(ctx, f"compile cache: {found} compiled artifacts from {where}")
    return where if found is None and ctx.is_writer else None


def keep_compiled(run: Run) -> None:
    """After the first step, rank 0 writes what torch compiled for the next run of this shape."""
    started = time.perf_counter()
    try:
        size = compile_cache.save(run.compiled_to_keep)
    except OSError as e:  # the storage refused it: the next run compiles again, this one goes on
        log(run.ctx, f"compile cache: not written to {run.compiled_to_keep} ({e})")
        size = None
    if size:
        log(run.ctx, f"compile cache: {size / 2**20:.1f} MiB written to {run.compiled_to_keep} "
                     f"({time.perf_counter() - started:.1f} s)")
    run.compiled_to_keep = None


def held_out(run: Run, when: str, predictions: Optional[list] = None) -> dict:
    """The held-out metrics now (compiled layers run eagerly, flex attention as sdpa), with progress lines."""
    cfg = run.cfg
    log(run.ctx, f"held-out evaluation {when} ({run.task.describe_evaluation(cfg, len(run.data.eval), len(run.mc_items))})")
    with kernels.for_evaluation(run.model, cfg.train.compile, cfg.model.attn_implementation):
        return run.task.evaluate(run.model, run.data.eval, run.tokenizer, cfg, run.ctx, run.mc_items, predictions,
                                 run.eval_state)


def train_step(run: Run, step: int, window: Window, clock: Clock) -> tuple[int, float]:
    """Optimizer step `step` (0-based): its micro-batches' forward and backward passes, clipping, the update and
    the schedule. Returns (the epoch, the gradient norm before clipping)."""
    cfg, ctx = run.cfg, run.ctx
    run.wrapped.train()
    step_loss = 0.0
    mine = run.plan.for_rank(step, ctx)  # this rank's share of the step's global micro-batches
    accum = len(mine)
    for micro, j in enumerate(mine):
        epoch, idx = run.plan.micro_batch(j)
        torch.manual_seed(run.plan.seed(j))  # dropout masks of micro-batch j, whichever rank runs it
        items = [run.data.train[i] for i in idx]
        # Packed rows are padded to max_length: one shape every step (a new shape recompiles compiled layers and
        # specialises Triton kernels again; rows are nearly full, so it costs little).
        batch = to_tensors(run.task.train_batch(items, run.tokenizer.pad_token_id, cfg), ctx.device)
        try:
            loss = forward_backward(run.wrapped, model_inputs(batch), batch["labels"], run.hidden, run.task_loss,
                                    run.dtype, run.strategy, accum, sync=micro == accum - 1)
        except torch.OutOfMemoryError:
            raise out_of_memory(run.model, cfg, ctx.device, step, batch["input_ids"].numel()) from None
        step_loss += loss.item() / accum
        clock.tokens += window.add_micro_batch(batch["token_mask"])
        run.task.count_flops(run.flops, items, cfg)
    if not math.isfinite(step_loss):
        raise TrainingFailure(f"loss became {step_loss} at step {step + 1}; the last good checkpoint is kept "
                              "(lower train.learning_rate or train.max_grad_norm)")
    grad_norm = run.strategy.apply_update(run.wrapped, run.optimizer, cfg.train.max_grad_norm)
    run.scheduler.step()
    window.loss, window.steps = window.loss + step_loss, window.steps + 1
    clock.step_done()
    return epoch, grad_norm


def report(run: Run, step: int, metrics: dict, before: dict, clock: Clock, save: bool, final: bool = False,
           predictions: Optional[list] = None, loop_state: Optional[dict] = None) -> None:
    """Metrics to MLflow and Ray Train; with `save`, a checkpoint (every rank joins the gathers of sharded
    state; rank 0 writes it, and beside the final adapter what it was measured at and what it generated)."""
    import ray.train
    ctx = run.ctx
    if run.sink:
        run.sink.log(metrics, step)
    ckpt = None
    with tempfile.TemporaryDirectory() as tmp:
        if save:
            adapter_state = run.strategy.trainable_state(run.model)
            optimizer_state = run.strategy.optimizer_state(run.wrapped, run.optimizer)
            rng_states = distributed.per_rank(checkpoint.rng_state(), ctx)
        if save and ctx.is_writer:
            folder = checkpoint.save(Path(tmp) / "checkpoint", run.model, run.cfg, optimizer_state, run.scheduler,
                                     {"step": step, "before": before, "final": final, "metrics": metrics,
                                      **(loop_state or {})},
                                     adapter_state, rng_states)
            if final:
                evaluation.write_results(folder, final_results(metrics, before, ctx.device), predictions or [])
                checkpoint.write_manifest(folder)
            ckpt = ray.train.Checkpoint.from_directory(str(folder))
        started = time.perf_counter()
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_upload_fn=upload)
        clock.report_seconds += time.perf_counter() - started


def upload(ckpt, name: str):
    """Ray Train's checkpoint upload, retried when the storage fails (checkpoint.upload_with_retries)."""
    import ray.train
    return checkpoint.upload_with_retries(ray.train.get_context().get_storage(), ckpt, name)


def step_metrics(run: Run, step: int, epoch: int, grad_norm: float, window: Window, clock: Clock, last: bool) -> dict:
    """What a log step reports: the window's loss and speed, memory; at the last step throughput by the clock
    and every rank's peak memory too (collectives: every rank calls this)."""
    metrics = {"step": step, "epoch": epoch, "learning_rate": run.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
               **window.metrics(run.ctx, run.flops), "peak_memory_gib": peak_memory_gib(run.ctx.device),
               "weights_memory_gib": run.weights_gib}
    if last:
        metrics.update(clock.metrics(run.ctx))
        metrics["peak_memory_gib_by_rank"] = distributed.per_rank(peak_memory_gib(run.ctx.device), run.ctx)
    return metrics


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    run = set_up(WorkerPayload.from_dict(config))
    cfg, ctx, total = run.cfg, run.ctx, run.plan.total_steps
    step, before, interruptions = 0, None, Interruptions()
    if run.trainer_state:
        saved = restore_trainer(run.trainer_state, run)
        step, before = saved["step"], saved.get("before")
        interruptions = Interruptions.after(saved)
        notice = " (written on a preemption notice)" if saved.get("notice") else ""
        workers = f"{ctx.world_size} worker{'s' if ctx.world_size > 1 else ''}"
        log(ctx, f"resumed from checkpoint at step {step}{notice} on {workers}, "
                 f"{cfg.accumulation_on(ctx.world_size)} micro-batch(es) each per step")
        if saved.get("final"):  # the run had finished: report its result again, train nothing
            ray.train.report(saved["metrics"])
            return
    if before is None:
        started = time.perf_counter()
        before = held_out(run, "before training")
        log(ctx, f"before training: {evaluation.summary(before)} ({console.duration(time.perf_counter() - started)})")
    clock, window = Clock(first_step=step), Window()
    while step < total:
        epoch, grad_norm = train_step(run, step, window, clock)
        step += 1
        if run.compiled_to_keep:
            keep_compiled(run)
        last = step == total
        notice = None if last else preemption.noticed(ctx)  # a collective: every rank, every step
        do_eval = last or (cfg.train.eval_every and step % cfg.train.eval_every == 0)
        do_save = last or notice is not None or (cfg.train.save_every and step % cfg.train.save_every == 0)
        if not (last or do_eval or do_save or step % cfg.train.log_every == 0):
            continue
        metrics = {**step_metrics(run, step, epoch, grad_norm, window, clock, last), **interruptions.metrics()}
        predictions = [] if last else None
        if do_eval:
            started = time.perf_counter()
            metrics.update(held_out(run, f"at step {step}", predictions))
            clock.eval_seconds += time.perf_counter() - started
            if last:
                predictions = distributed.gather_shards(predictions, ctx)
        if last:
            metrics["train_seconds"] = time.perf_counter() - clock.start
            metrics.update({f"before_{k}": v for k, v in before.items()})
        log(ctx, console.progress_line(step, total, clock.training_seconds(), step - clock.first_step, metrics))
        report(run, step, metrics, before, clock, save=do_save, final=last, predictions=predictions,
               loop_state={"notice": notice is not None, **interruptions.metrics()})
        if notice is not None:
            # Every rank's report collected by the controller before any rank stops: Ray Train restarts the group
            # at the first error it sees, and a report still queued on any rank then (the checkpoint's step) is lost.
            collected = preemption.wait_until_collected()
            distributed.barrier(ctx)
            registered = "registered" if collected else "reported (not collected by Ray Train within 120 s)"
            log(ctx, f"preemption notice: checkpoint at step {step} written and {registered} "
                     f"{time.time() - notice:.1f} s after the notice; stopping so that Ray Train resumes the run from it")
            raise preemption.WorkerPreempted(f"stopped at step {step} on a preemption notice")
        window = Window()
        run.flops.reset()
    if run.sink:
        run.sink.flush()


@dataclass(frozen=True)
class Interruptions:
    """How often the run was stopped and resumed, counted in its checkpoints: preemptions (resumed from a checkpoint
    written on a notice) and restarts (resumed from a periodic checkpoint: a crashed or killed worker, or the job
    run again)."""
    preemptions: int = 0
    restarts: int = 0

    @classmethod
    def after(cls, saved: dict) -> "Interruptions":
        """The counts of a run resumed from the checkpoint whose loop state is `saved`."""
        notice = bool(saved.get("notice"))
        return cls(saved.get("preemptions", 0) + notice, saved.get("restarts", 0) + (not notice))

    def metrics(self) -> dict:
        return {"preemptions": self.preemptions, "restarts": self.restarts}


def final_results(metrics: dict, before: dict, device: torch.device) -> dict:
    """metrics.json of a finished run: held-out metrics before and after, training numbers, memory."""
    after = {k: metrics[k] for k in before if k in metrics}
    return {"before": before, "after": after,
            "train": {k: metrics.get(k) for k in ("step", "loss", "train_seconds", "tokens_per_second", *mfu.CLOCK_KEYS)},
            "memory": {"weights_gib": metrics["weights_memory_gib"], "peak_gib": metrics["peak_memory_gib"],
                       "peak_gib_by_rank": metrics.get("peak_memory_gib_by_rank"),
                       "weights_kind": "bytes of the frozen base's parameters and buffers this worker "
                                       "holds (its shard under scaling.strategy=fsdp)",
                       "peak_kind": PEAK_MEMORY_KIND[device.type]}}


def resume_adapter(model, ctx: distributed.Context) -> dict | None:
    """Load the adapter weights of the checkpoint Ray hands this worker (if any) into the unwrapped model;
    returns that checkpoint's trainer state (optimizer, scheduler, RNG, loop state) for restore_trainer."""
    import ray.train
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    resumed = ray.train.get_checkpoint()
    if not resumed:
        return None
    with resumed.as_directory() as d:
        try:
            folder = checkpoint.latest_intact(Path(d), lambda m: log(ctx, m))
        except checkpoint.CorruptCheckpoint as e:
            raise TrainingFailure(f"{e}; start a new run (another tracking.run_name)") from None
        state = checkpoint.load_trainer_state(folder)
        weights = load_file(str(folder / "adapter" / "adapter_model.safetensors"), device=str(next(
            p.device for p in model.parameters() if p.requires_grad)))
    set_peft_model_state_dict(model, weights)
    return state


def restore_trainer(state: dict, run: Run) -> dict:
    """Optimizer, scheduler and RNG from a checkpoint's trainer state; returns the saved loop state (step,
    metrics before training, and for the final checkpoint its metrics)."""
    run.strategy.load_optimizer_state(run.wrapped, run.optimizer, state["optimizer"])
    if state["scheduler"] is not None:
        run.scheduler.load_state_dict(state["scheduler"])
    checkpoint.restore_rng(state["rng"], run.ctx.rank)
    return state["state"]
