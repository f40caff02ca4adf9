"""The loop each Ray Train worker runs: load 4-bit base + LoRA, train, evaluate, checkpoint, report.

Our own loop rather than HF Trainer: resuming must restore the exact step, optimizer, scheduler, RNG
and data position (ray #46814 is HF training restarting at epoch 1 after a restore), and every
metric Ray Tune or MLflow sees is computed here in plain sight.
"""
from __future__ import annotations

import gc
import math
import os
import random
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from qlora import (checkpoint, classification, console, distributed, evaluation, kernels, memory, modeling,
                   multiple_choice, speed)
from qlora.config import JobConfig
from qlora.data import collate, collate_packed, length_grouped_order
from qlora.data.pipeline import open_prepared
from qlora.errors import TrainingFailure
from qlora.model_source import resolve
from qlora.tracking import MetricsSink


def make_optimizer(cfg: JobConfig, params):
    t, name = cfg.train, cfg.optimizer_to_use()
    if name == "adamw":
        return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=t.learning_rate, momentum=0.9, weight_decay=t.weight_decay)
    import bitsandbytes as bnb  # CUDA optimizers; the config refuses them without scaling.use_gpu
    cls = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "adamw_8bit": bnb.optim.AdamW8bit}[name]
    return cls(params, lr=t.learning_rate, weight_decay=t.weight_decay)


def make_scheduler(cfg: JobConfig, optimizer, total_steps: int):
    from transformers import get_scheduler
    warmup = cfg.train.warmup_steps or math.ceil(cfg.train.warmup_ratio * total_steps)
    return get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


# train.group_by_length sorts runs of this many (global) micro-batches by length, as HF's
# LengthGroupedSampler does with its "megabatches": batches of similar length, order still random.
LENGTH_GROUP_BATCHES = 50


class BatchPlan:
    """Deterministic micro-batches: micro-batch k of the run is a pure function of k.

    Epoch e shuffles with seed + e (with train.group_by_length: then sorts runs of batches by length);
    each rank takes its shard. Resuming at step s only needs s. Every micro-batch holds exactly
    train.batch_size examples: the last one of an epoch is topped up from the start of that epoch's order
    (accelerate's even_batches). A short last batch is another shape: compiled layers recompile for it
    (measured on an H200: a 1-row batch at an epoch's end stalled the 8B step for 25 s) and Triton kernels
    specialise again.
    """

    def __init__(self, n_examples: int, cfg: JobConfig, ctx: distributed.Context, lengths: list[int] | None = None):
        self.n, self.cfg, self.ctx, self.lengths = n_examples, cfg, ctx, lengths
        if cfg.train.group_by_length and (lengths is None or len(lengths) != n_examples):
            raise ValueError("train.group_by_length needs the length of every example")
        self.per_epoch = math.ceil(len(distributed.shard(list(range(n_examples)), ctx)) / cfg.train.batch_size)
        steps_per_epoch = max(1, self.per_epoch // cfg.train.gradient_accumulation)
        self.total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
        self._epoch, self._order = None, None

    def micro_batch(self, k: int) -> tuple[int, list[int]]:
        epoch, b = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            if self.cfg.train.group_by_length:
                group = self.cfg.train.batch_size * self.ctx.world_size * LENGTH_GROUP_BATCHES
                order = length_grouped_order(self.lengths, self.cfg.train.seed + epoch, group)
            else:
                order = list(range(self.n))
                random.Random(self.cfg.train.seed + epoch).shuffle(order)
            self._epoch, self._order = epoch, distributed.shard(order, self.ctx)
        bs = self.cfg.train.batch_size
        return epoch, full_batch(self._order, b * bs, bs)


def full_batch(order: list[int], start: int, size: int) -> list[int]:
    """order[start:start + size], wrapping around to the start of `order` for what is missing."""
    batch = order[start:start + size]
    while len(batch) < size:
        batch += order[:size - len(batch)]
    return batch


def train_batch(examples: list[dict], pad_id: int, packed: bool, packed_width: Optional[int] = None) -> dict:
    """A micro-batch as lists: padded examples, or packed rows (position_ids, no attention_mask) padded to
    the longest or to `packed_width`."""
    if packed:
        return collate_packed(examples, pad_id, packed_width)
    batch = collate(examples, pad_id)
    batch["token_mask"] = batch["attention_mask"]
    return batch


def model_inputs(batch: dict) -> dict:
    """What the forward pass gets. Packed rows: position_ids only, so transformers' masking detects the
    packed examples and builds a block-diagonal causal mask; that detection needs attention_mask=None and
    no KV cache (use_cache=False), see transformers.masking_utils.find_packed_sequence_indices."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


# What peak_memory_gib measures, written beside it in metrics.json.
PEAK_MEMORY_KIND = {"cuda": "torch.cuda.max_memory_allocated (tensors on the GPU; excludes the CUDA context and "
                            "allocator cache)",
                    "cpu": "max resident set size of the worker process (weights, activations, optimizer, plus "
                           "Python, torch and Ray overhead)"}


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def log(ctx: distributed.Context, message: str) -> None:
    if ctx.is_writer:
        # Not print(): Ray Train patches it to both log and echo, which shows every line twice.
        sys.stdout.write(f"[qlora] {message}\n")
        sys.stdout.flush()


def train_loop_per_worker(payload: dict) -> None:
    import ray.train

    if payload.get("verbose"):
        os.environ[console.VERBOSE_ENV] = "1"
    console.quiet_libraries()  # before the libraries load: bitsandbytes' notice comes with its import
    cfg = JobConfig.from_json(payload["config"])  # validated again on this side of the Ray boundary
    ctx = distributed.context(cfg.scaling.use_gpu, cfg.scaling.strategy)
    torch.manual_seed(cfg.train.seed)
    source = resolve(cfg.model.name, cfg.model.gguf_file, cfg.model.revision)
    tokenizer = modeling.load_tokenizer(source, cfg)
    data = open_prepared(payload["data_cache"])  # the driver's prepared data, memory-mapped
    cfg = classification.with_num_labels(cfg, data)  # saved with checkpoints, so the adapter knows its classes
    # A classifier's new head is initialised randomly inside from_pretrained: same seed, same head on every rank.
    torch.manual_seed(cfg.train.seed)
    base = modeling.load_base_model(cfg, source, ctx.device, tokenizer.pad_token_id)
    mc_items = multiple_choice.prepare(cfg, tokenizer)
    kernels.apply_layer_kernels(base, cfg.train)
    if cfg.train.gradient_checkpointing and cfg.train.checkpointed_fraction < 1:
        kept = kernels.select_checkpointed_layers(base, cfg.train.checkpointed_fraction)
        log(ctx, f"activation checkpointing in {len(kept)} decoder layers: {kept}")
    torch.manual_seed(cfg.train.seed)  # identical LoRA init on every rank
    model = modeling.attach_lora(base, cfg.lora, cfg.model.task)
    if cfg.train.compile:
        n = kernels.compile_layers(model, cfg.train.compile_memory_budget)
        log(ctx, f"compiling {n} decoder layers (the first steps include the compile)")
    hidden = kernels.HiddenStates(model, cfg.train.kernels == "liger") if cfg.train.fused_cross_entropy else None
    dtype = modeling.compute_dtype(cfg.quantization, ctx.device)
    flops = speed.FlopCounter(speed.base_param_count(model), base.config,
                              torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else None)
    trainer_state = resume_adapter(model, ctx)  # before sharding: each rank loads the whole saved adapter
    wrapped = distributed.wrap(model, ctx, cfg.scaling.strategy, fused_loss=hidden is not None)
    # Bytes of the frozen base this worker holds (quantized weights + scales + buffers; its shard under FSDP).
    weights_gib = distributed.local_bytes([p for p in model.parameters() if not p.requires_grad]
                                          + list(model.buffers())) / 2**30
    optimizer = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    wrapped = distributed.with_deepspeed(wrapped, optimizer, ctx, cfg.scaling.zero_stage, cfg.train.batch_size,
                                         cfg.train.gradient_accumulation, cfg.train.max_grad_norm,
                                         kernels.autocast_dtype(ctx.device, dtype))
    plan = BatchPlan(len(data.train), cfg, ctx, data.lengths)
    scheduler = make_scheduler(cfg, optimizer, plan.total_steps)
    batch_losses = classification.losses if cfg.model.task == "sequence_classification" else evaluation.token_losses
    sink = MetricsSink(payload.get("tracking_uri"), payload.get("mlflow_run_id")) if ctx.is_writer else None

    step, before = 0, None
    if trainer_state:
        saved = restore_trainer(trainer_state, wrapped, optimizer, scheduler, ctx)
        step, before = saved["step"], saved.get("before")
        log(ctx, f"resumed from checkpoint at step {step}")
        if saved.get("final"):  # the run had finished: report its result again, train nothing
            ray.train.report(saved["metrics"])
            return
    if before is None:
        started = time.perf_counter()
        log(ctx, f"held-out evaluation before training ({evaluation.describe(cfg, len(data.eval), len(mc_items))})")
        with kernels.for_evaluation(model, cfg.train.compile, cfg.model.attn_implementation):
            before = evaluation.evaluate(model, data.eval, tokenizer, cfg, ctx, mc_items)
        log(ctx, f"before training: {evaluation.summary(before)} ({console.duration(time.perf_counter() - started)})")
    clock = Clock(first_step=step)

    def report(metrics: dict, save: bool, final: bool = False, predictions: list | None = None):
        if sink:
            sink.log(metrics, step)
        ckpt = None
        with tempfile.TemporaryDirectory() as tmp:
            if save:  # every rank joins the gathers of sharded state; rank 0 writes
                adapter_state = distributed.full_trainable_state(model) if ctx.sharded else None
                optimizer_state = distributed.optimizer_state(wrapped, optimizer, ctx)
                rng_states = distributed.per_rank(checkpoint.rng_state(), ctx)
            if save and ctx.is_writer:
                folder = checkpoint.save(Path(tmp) / "checkpoint", model, cfg, optimizer_state, scheduler,
                                         {"step": step, "before": before, "final": final, "metrics": metrics},
                                         adapter_state, rng_states)
                if final:  # beside the final adapter: what it was measured at, and what it generated
                    evaluation.write_results(folder, final_results(metrics, before, ctx.device), predictions or [])
                    checkpoint.write_manifest(folder)
                ckpt = ray.train.Checkpoint.from_directory(str(folder))
            started = time.perf_counter()
            ray.train.report(metrics, checkpoint=ckpt)
            clock.report_seconds += time.perf_counter() - started

    tokens, slots, window_loss, window_steps, t0 = 0, 0, 0.0, 0, time.perf_counter()
    accum = cfg.train.gradient_accumulation
    # Packed rows are padded to max_length: one shape every step (a new shape recompiles compiled layers and
    # specialises Triton kernels again; rows are nearly full, so it costs little).
    packed_width = cfg.data.max_length
    while step < plan.total_steps:
        wrapped.train()
        step_loss = 0.0
        for micro in range(accum):
            epoch, idx = plan.micro_batch(step * accum + micro)
            items = [data.train[i] for i in idx]
            batch = evaluation.to_tensors(train_batch(items, tokenizer.pad_token_id, cfg.data.packing, packed_width),
                                          ctx.device)
            sync = micro == accum - 1
            try:
                with distributed.gradient_sync(wrapped, ctx, sync):
                    with kernels.autocast(ctx.device, dtype):
                        loss_sum, n = kernels.forward_loss(wrapped, model_inputs(batch), batch["labels"],
                                                           hidden, batch_losses)
                    loss = loss_sum / n.clamp(min=1)
                    distributed.backward(wrapped, loss, accum, ctx)
            except torch.OutOfMemoryError:
                loss_sum = loss = None  # drop the failed step's tensors before measuring
                raise memory.OutOfMemory(memory.describe(model, cfg, ctx.device, step, batch["input_ids"].numel())) from None
            step_loss += loss.item() / accum
            real = int(batch["token_mask"].sum())
            tokens, clock.tokens = tokens + real, clock.tokens + real
            slots += batch["token_mask"].numel()
            flops.add([n for e in items for n in speed.example_lengths(e)])  # attention is per example
        if not math.isfinite(step_loss):
            raise TrainingFailure(f"loss became {step_loss} at step {step + 1}; the last good checkpoint is kept "
                                  "(lower train.learning_rate or train.max_grad_norm)")
        grad_norm = distributed.apply_update(wrapped, optimizer, cfg.train.max_grad_norm, ctx)
        scheduler.step()
        step += 1
        if clock.first_step_end is None:
            clock.first_step_done()
        window_loss, window_steps = window_loss + step_loss, window_steps + 1
        last = step == plan.total_steps
        do_eval = last or (cfg.train.eval_every and step % cfg.train.eval_every == 0)
        do_save = last or (cfg.train.save_every and step % cfg.train.save_every == 0)
        if not (last or do_eval or do_save or step % cfg.train.log_every == 0):
            continue
        elapsed = time.perf_counter() - t0
        mfu = flops.mfu(elapsed)
        loss_avg, tok_all, slots_all, mfu_all = distributed.all_sum(
            [window_loss / window_steps, tokens, slots, mfu or 0.0], ctx)
        metrics = {"step": step, "epoch": epoch, "loss": loss_avg / ctx.world_size,
                   "learning_rate": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                   "tokens_per_second": tok_all / elapsed, "peak_memory_gib": peak_memory_gib(ctx.device),
                   # Real (non-pad) tokens / batch slots: what packing or group_by_length save on padding.
                   "packing_efficiency": tok_all / max(slots_all, 1),
                   "weights_memory_gib": weights_gib}
        if mfu is not None:  # GPUs only: a CPU has no meaningful tensor-core peak
            metrics["mfu"] = mfu_all / ctx.world_size
        predictions = [] if last else None
        if last:
            metrics.update(clock.metrics(ctx))
            metrics["peak_memory_gib_by_rank"] = distributed.per_rank(peak_memory_gib(ctx.device), ctx)
        if do_eval:
            eval_start = time.perf_counter()
            log(ctx, f"held-out evaluation at step {step} ({evaluation.describe(cfg, len(data.eval), len(mc_items))})")
            with kernels.for_evaluation(model, cfg.train.compile, cfg.model.attn_implementation):
                metrics.update(evaluation.evaluate(model, data.eval, tokenizer, cfg, ctx, mc_items, predictions))
            clock.eval_seconds += time.perf_counter() - eval_start
            if last:
                predictions = distributed.gather_shards(predictions, ctx)
        if last:
            metrics["train_seconds"] = time.perf_counter() - clock.start
            metrics.update({f"before_{k}": v for k, v in before.items()})
        log(ctx, console.progress_line(step, plan.total_steps, time.perf_counter() - clock.start - clock.eval_seconds,
                                       step - clock.first_step, metrics))
        report(metrics, save=do_save, final=last, predictions=predictions)
        tokens, slots, window_loss, window_steps, t0 = 0, 0, 0.0, 0, time.perf_counter()
        flops.reset()
    if sink:
        sink.flush()


@dataclass
class Clock:
    """Throughput by the wall clock, which is what a run costs: this rank's real tokens over the seconds of
    the training loop, reporting and checkpointing included, held-out evaluation left out (counted apart);
    also without the first step, which compiles under train.compile. The per-window tokens_per_second
    leaves out the time between windows (reports, checkpoints, evaluation)."""
    start: float = field(default_factory=time.perf_counter)
    first_step: int = 0  # the step the loop started at (a resumed run's)
    first_step_end: Optional[float] = None
    tokens: int = 0
    first_step_tokens: int = 0
    eval_seconds: float = 0.0  # evaluation inside the loop (eval_every), all after the first step
    report_seconds: float = 0.0  # inside ray.train.report (checkpoint uploads included)

    def first_step_done(self) -> None:
        self.first_step_end, self.first_step_tokens = time.perf_counter(), self.tokens
        # Everything loaded and compiled so far lives to the end of the run: keep it out of the garbage
        # collector's full passes, which otherwise walk all of it (0.3-0.5 s once the model is loaded,
        # measured on CPU: a stall of that size at irregular steps).
        gc.collect()
        gc.freeze()

    def metrics(self, ctx: distributed.Context) -> dict:
        """Clock throughput over all ranks (a collective), measured now."""
        now = time.perf_counter()
        tokens, first = distributed.all_sum([self.tokens, self.first_step_tokens], ctx)
        after_first = now - self.first_step_end - self.eval_seconds
        return {"clock_tokens_per_second": tokens / max(now - self.start - self.eval_seconds, 1e-9),
                "clock_tokens_per_second_after_first_step": (tokens - first) / after_first if after_first > 0 else 0.0,
                "first_step_seconds": self.first_step_end - self.start, "eval_seconds": self.eval_seconds,
                "report_seconds": self.report_seconds}


def final_results(metrics: dict, before: dict, device: torch.device) -> dict:
    """metrics.json of a finished run: held-out metrics before and after, training numbers, memory."""
    after = {k: metrics[k] for k in before if k in metrics}
    return {"before": before, "after": after,
            "train": {k: metrics.get(k) for k in ("step", "loss", "train_seconds", "tokens_per_second", *speed.CLOCK_KEYS)},
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


def restore_trainer(state: dict, model, optimizer, scheduler, ctx: distributed.Context) -> dict:
    """Optimizer, scheduler and RNG from a checkpoint's trainer state; returns the saved loop state (step,
    metrics before training, and for the final checkpoint its metrics). `model` as the step calls it."""
    distributed.load_optimizer_state(model, optimizer, state["optimizer"], ctx)
    if state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    checkpoint.restore_rng(state["rng"], ctx.rank)
    return state["state"]
