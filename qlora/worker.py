"""The loop each Ray Train worker runs: load 4-bit base + LoRA, train, evaluate, checkpoint, report.

Our own loop rather than HF Trainer: resuming must restore the exact step, optimizer, scheduler, RNG
and data position (ray #46814 is HF training restarting at epoch 1 after a restore), and every
metric Ray Tune or MLflow sees is computed here in plain sight.
"""
from __future__ import annotations

import contextlib
import math
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from qlora import checkpoint, distributed, evaluation, memory, modeling, multiple_choice
from qlora.config import JobConfig
from qlora.data import collate, prepare
from qlora.errors import TrainingFailure
from qlora.model_source import resolve
from qlora.tracking import MetricsSink


def make_optimizer(cfg: JobConfig, params):
    t = cfg.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.learning_rate, momentum=0.9, weight_decay=t.weight_decay)
    import bitsandbytes as bnb  # CUDA optimizers; the config refuses them without scaling.use_gpu
    cls = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "adamw_8bit": bnb.optim.AdamW8bit}[t.optimizer]
    return cls(params, lr=t.learning_rate, weight_decay=t.weight_decay)


def make_scheduler(cfg: JobConfig, optimizer, total_steps: int):
    from transformers import get_scheduler
    warmup = cfg.train.warmup_steps or math.ceil(cfg.train.warmup_ratio * total_steps)
    return get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


class BatchPlan:
    """Deterministic micro-batches: micro-batch k of the run is a pure function of k.

    Epoch e shuffles with seed + e; each rank takes its shard. Resuming at step s only needs s.
    """

    def __init__(self, n_examples: int, cfg: JobConfig, ctx: distributed.Context):
        self.n, self.cfg, self.ctx = n_examples, cfg, ctx
        self.per_epoch = math.ceil(len(distributed.shard(list(range(n_examples)), ctx)) / cfg.train.batch_size)
        steps_per_epoch = max(1, self.per_epoch // cfg.train.gradient_accumulation)
        self.total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
        self._epoch, self._order = None, None

    def micro_batch(self, k: int) -> tuple[int, list[int]]:
        epoch, b = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            order = list(range(self.n))
            random.Random(self.cfg.train.seed + epoch).shuffle(order)
            self._epoch, self._order = epoch, distributed.shard(order, self.ctx)
        bs = self.cfg.train.batch_size
        return epoch, self._order[b * bs:(b + 1) * bs]


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

    cfg = JobConfig.from_json(payload["config"])  # validated again on this side of the Ray boundary
    ctx = distributed.context(cfg.scaling.use_gpu)
    torch.manual_seed(cfg.train.seed)
    source = resolve(cfg.model.name, cfg.model.gguf_file, cfg.model.revision)
    tokenizer = modeling.load_tokenizer(source, cfg)
    data = prepare(cfg.data, tokenizer)
    base = modeling.load_base_model(cfg, source, ctx.device)
    # Bytes of the base's parameters and buffers as loaded (quantized weights + their scales), before LoRA.
    weights_gib = base.get_memory_footprint() / 2**30
    mc_items = multiple_choice.prepare(cfg, tokenizer)
    torch.manual_seed(cfg.train.seed)  # identical LoRA init on every rank
    model = modeling.attach_lora(base, cfg.lora)
    ddp = distributed.wrap(model, ctx)
    optimizer = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    plan = BatchPlan(len(data.train), cfg, ctx)
    scheduler = make_scheduler(cfg, optimizer, plan.total_steps)
    sink = MetricsSink(payload.get("tracking_uri"), payload.get("mlflow_run_id")) if ctx.is_writer else None

    step, before = 0, None
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            try:
                folder = checkpoint.latest_intact(Path(d), lambda m: log(ctx, m))
            except checkpoint.CorruptCheckpoint as e:
                raise TrainingFailure(f"{e}; start a new run (another tracking.run_name)") from None
            saved = restore(folder, model, optimizer, scheduler)
        step, before = saved["step"], saved.get("before")
        log(ctx, f"resumed from checkpoint at step {step}")
        if saved.get("final"):  # the run had finished: report its result again, train nothing
            ray.train.report(saved["metrics"])
            return
    if before is None:
        before = evaluation.evaluate(model, data.eval, tokenizer, cfg, ctx, mc_items)
        log(ctx, f"before training: {before}")

    def report(metrics: dict, save: bool, final: bool = False, predictions: list | None = None):
        if sink:
            sink.log(metrics, step)
        ckpt = None
        with tempfile.TemporaryDirectory() as tmp:
            if save and ctx.is_writer:
                folder = checkpoint.save(Path(tmp) / "checkpoint", model, cfg, optimizer, scheduler,
                                         {"step": step, "before": before, "final": final, "metrics": metrics})
                if final:  # beside the final adapter: what it was measured at, and what it generated
                    evaluation.write_results(folder, final_results(metrics, before, ctx.device), predictions or [])
                    checkpoint.write_manifest(folder)
                ckpt = ray.train.Checkpoint.from_directory(str(folder))
            ray.train.report(metrics, checkpoint=ckpt)

    tokens, window_loss, window_steps, t0 = 0, 0.0, 0, time.perf_counter()
    train_start = time.perf_counter()
    accum = cfg.train.gradient_accumulation
    while step < plan.total_steps:
        ddp.train()
        step_loss = 0.0
        for micro in range(accum):
            epoch, idx = plan.micro_batch(step * accum + micro)
            batch = evaluation.to_tensors(collate([data.train[i] for i in idx], tokenizer.pad_token_id), ctx.device)
            sync = micro == accum - 1
            try:
                with (ddp.no_sync() if not sync and ctx.world_size > 1 else contextlib.nullcontext()):
                    out = ddp(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    loss_sum, n = evaluation.token_losses(out.logits, batch["labels"])
                    loss = loss_sum / n.clamp(min=1)
                    (loss / accum).backward()
            except torch.OutOfMemoryError:
                out = loss_sum = loss = None  # drop the failed step's tensors before measuring
                raise memory.OutOfMemory(memory.describe(model, cfg, ctx.device, step, batch["input_ids"].numel())) from None
            step_loss += loss.item() / accum
            tokens += int(batch["attention_mask"].sum())
        if not math.isfinite(step_loss):
            raise TrainingFailure(f"loss became {step_loss} at step {step + 1}; the last good checkpoint is kept "
                                  "(lower train.learning_rate or train.max_grad_norm)")
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_loss, window_steps = window_loss + step_loss, window_steps + 1
        last = step == plan.total_steps
        do_eval = last or (cfg.train.eval_every and step % cfg.train.eval_every == 0)
        do_save = last or (cfg.train.save_every and step % cfg.train.save_every == 0)
        if not (last or do_eval or do_save or step % cfg.train.log_every == 0):
            continue
        elapsed = time.perf_counter() - t0
        loss_avg, tok_all = distributed.all_sum([window_loss / window_steps, tokens], ctx)
        metrics = {"step": step, "epoch": epoch, "loss": loss_avg / ctx.world_size,
                   "learning_rate": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                   "tokens_per_second": tok_all / elapsed, "peak_memory_gib": peak_memory_gib(ctx.device),
                   "weights_memory_gib": weights_gib}
        predictions = [] if last else None
        if do_eval:
            metrics.update(evaluation.evaluate(model, data.eval, tokenizer, cfg, ctx, mc_items, predictions))
            if last:
                predictions = distributed.gather_shards(predictions, ctx)
        if last:
            metrics["train_seconds"] = time.perf_counter() - train_start
            metrics.update({f"before_{k}": v for k, v in before.items()})
        log(ctx, f"step {step}/{plan.total_steps} " + " ".join(
            f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
        report(metrics, save=do_save, final=last, predictions=predictions)
        tokens, window_loss, window_steps, t0 = 0, 0.0, 0, time.perf_counter()
    if sink:
        sink.flush()


def final_results(metrics: dict, before: dict, device: torch.device) -> dict:
    """metrics.json of a finished run: held-out metrics before and after, training numbers, memory."""
    after = {k: metrics[k] for k in before if k in metrics}
    return {"before": before, "after": after,
            "train": {k: metrics.get(k) for k in ("step", "loss", "train_seconds", "tokens_per_second")},
            "memory": {"weights_gib": metrics["weights_memory_gib"], "peak_gib": metrics["peak_memory_gib"],
                       "weights_kind": "model.get_memory_footprint() of the loaded base before LoRA "
                                       "(parameters + buffers)", "peak_kind": PEAK_MEMORY_KIND[device.type]}}


def restore(folder: Path, model, optimizer, scheduler) -> dict:
    """Load adapter weights and trainer state from a checkpoint folder; returns the saved loop state
    (step, metrics before training, and for the final checkpoint its metrics)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    state = checkpoint.load_trainer_state(folder)
    weights = load_file(str(folder / "adapter" / "adapter_model.safetensors"), device=str(next(
        p.device for p in model.parameters() if p.requires_grad)))
    set_peft_model_state_dict(model, weights)
    optimizer.load_state_dict(state["optimizer"])
    if state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    checkpoint.restore_rng(state["rng"])
    return state["state"]

