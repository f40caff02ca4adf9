"""scaling.strategy=fsdp's (and deepspeed's) GPU path against the DDP path on one GPU: same model, seed,
batches and step.

One GPU cannot show the sharding itself (a one-rank mesh holds every shard); what it shows is that the
CUDA path works end to end with the worker's own pieces: bitsandbytes NF4 weights stored in bf16
(bnb_4bit_quant_storage) under FSDP2's per-layer all-gathers, LoRA training to the same losses as without
FSDP, whole adapters and optimizer state gathered for a checkpoint, generation in lockstep mode, and what
FSDP's gathered copies cost in memory and time. With `--strategies ddp,deepspeed`: a ZeRO-2 engine on the
one rank (fp32 mode under autocast), its update and its optimizer state through the tensor-fragment API.
Multi-GPU numbers need a 2-GPU host (tests/e2e/test_fsdp.py runs the 2-rank paths on CPU over gloo).

    python3 benchmarks/fsdp_check.py --model /tmp/rand-llama-1b-v49k --steps 8 --out fsdp.jsonl
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from qlora import distributed, evaluation, kernels, memory_estimate, modeling
from qlora.config import JobConfig
from qlora.model_source import ModelSource
from qlora.strategies import STRATEGIES, Strategy
from qlora.strategies.fsdp import full_trainable_state
from qlora.train_step import make_optimizer

DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def config(path: str, strategy: str, args) -> JobConfig:
    return JobConfig.model_validate({
        "model": {"name": path}, "data": {"path": "unused.jsonl", "max_length": args.seq},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"batch_size": args.bs, "gradient_checkpointing": True, "learning_rate": 1e-3,
                  "kernels": args.kernels, "fused_cross_entropy": args.fused},
        "scaling": {"use_gpu": DEVICE.type == "cuda", "strategy": strategy}})


def host_memory_gib() -> dict:
    """This process's host RAM (Linux): peak resident, private (anonymous) and file-backed resident. File pages
    of the memory-mapped checkpoint are the page cache, shared by every worker on the node."""
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 2**20  # kB -> GiB
    return fields


def run(strategy: str, args) -> dict:
    cfg = config(args.model, strategy, args)
    # A one-rank mesh, FSDP (or a DeepSpeed engine) all the same.
    cls = Strategy if strategy == "ddp" else STRATEGIES[strategy]  # one rank: ddp trains as one process
    runner = cls(distributed.Context(0, 1, DEVICE, sharded=cls.lockstep), cfg)
    torch.cuda.reset_peak_memory_stats() if DEVICE.type == "cuda" else None
    t = time.perf_counter()
    base = modeling.load_base_model(cfg, ModelSource(args.model, True, "benchmark"), DEVICE, prepare=cls.prepare_base)
    load_s, host_after_load = time.perf_counter() - t, host_memory_gib()
    storage = {str(p.dtype) for n, p in base.named_parameters() if "proj" in n}
    if args.kernels == "liger":
        kernels.apply_liger(base)
    torch.manual_seed(0)
    model = modeling.attach_lora(base, cfg.lora)
    hidden = kernels.HiddenStates(model, args.kernels == "liger") if args.fused else None
    dtype = modeling.compute_dtype(cfg.quantization, DEVICE)
    wrapped, optimizer = runner.wrap(model, lambda params: make_optimizer(cfg, params),
                                     kernels.autocast_dtype(DEVICE, dtype))
    g = torch.Generator().manual_seed(1234)
    losses, times = [], []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, model.config.vocab_size, (args.bs, args.seq), generator=g).to(DEVICE)
        torch.cuda.synchronize() if DEVICE.type == "cuda" else None
        t = time.perf_counter()
        wrapped.train()
        with kernels.autocast(DEVICE, dtype):
            loss_sum, n = kernels.forward_loss(wrapped, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids,
                                               hidden)
        runner.backward(wrapped, loss_sum / n, 1)
        runner.apply_update(wrapped, optimizer, 1.0)
        losses.append((loss_sum / n).item())
        torch.cuda.synchronize() if DEVICE.type == "cuda" else None
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else None
    adapter = full_trainable_state(model)
    opt_state = runner.optimizer_state(wrapped, optimizer)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    tok.pad_token = tok.pad_token or tok.eos_token
    prompts = [tok.encode("The capital of France is"), tok.encode("1, 2, 3, 4,")]
    answers = evaluation.generate(model, prompts, tok, 8, DEVICE, synced=runner.ctx.sharded)
    setup = memory_estimate.Setup.from_config(cfg)
    # From the meta model, as --dry-run does: a loaded 4-bit layer's numel counts packed storage elements.
    shape = memory_estimate.shape_of(modeling.meta_lora_model(cfg, ModelSource(args.model, True, "benchmark")))
    row = {"strategy": strategy, "load_s": load_s, "host_gib_after_load": host_after_load,
           "quantized_weight_dtypes": sorted(storage), "steps": args.steps,
           "batch": f"{args.bs}x{args.seq}", "kernels": args.kernels, "fused_cross_entropy": args.fused,
           "step_s_median": statistics.median(times), "tokens_per_s": args.bs * args.seq / statistics.median(times),
           "peak_gib": peak, "losses": losses, "adapter_tensors": len(adapter),
           "adapter_nonzero_B": sum(int(v.abs().sum() > 0) for k, v in adapter.items() if "lora_B" in k),
           "optimizer_states": len(opt_state["state"]), "answers": answers,
           "estimate_gib_1_worker": memory_estimate.estimate(shape, setup).total / 2**30,
           "estimate_gathered_gib_at_2": memory_estimate.gathered_bytes(
               shape, memory_estimate.Setup(**{**setup.__dict__, "workers": 2, "strategy": "fsdp"})) / 2**30}
    del wrapped, model, base, optimizer
    gc.collect()  # peft and FSDP hold reference cycles: without this the next strategy's peak includes this model
    torch.cuda.empty_cache() if DEVICE.type == "cuda" else None
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--bs", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--kernels", default="none", choices=["none", "liger"])
    p.add_argument("--fused", action="store_true", help="train.fused_cross_entropy (Liger's with --kernels liger)")
    p.add_argument("--tokenizer", help="tokenizer folder for the generation check (default: --model)")
    p.add_argument("--out", default="fsdp_check.jsonl")
    p.add_argument("--strategies", default="ddp,fsdp", help="run in this order; the summary compares the first two")
    args = p.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo", rank=0, world_size=1)
    rows = []
    with open(args.out, "w") as f:
        for strategy in args.strategies.split(","):
            rows.append(run(strategy, args))
            print(json.dumps(rows[-1]), flush=True)
            f.write(json.dumps(rows[-1]) + "\n")
        if len(rows) >= 2:
            summary = {"max_loss_diff": max(abs(a - b) for a, b in zip(rows[0]["losses"], rows[1]["losses"])),
                       "tokens_per_s_ratio": rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"],
                       "gpu": torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "cpu"}
            print(json.dumps(summary), flush=True)
            f.write(json.dumps(summary) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
