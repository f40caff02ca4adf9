"""Our training step, lever by lever, on one GPU: tokens/s, peak memory, MFU and the loss after N steps.

Loads the random-weight model once (the one ../shared/gpu/peer_baseline.py saved, so both measure the same
weights) through qlora.modeling, then runs each variant from the same LoRA initialisation, optimizer state
and batches. A variant adds its lever to the ones before it (Liger's patches cannot be undone), in the order
given. The step is the worker's own: train_step.forward_backward + Strategy.apply_update (clip, AdamW).

    python3 benchmarks/speed.py --model /tmp/rand-llama-8b --bs 4 --seq 2048 \\
        --variants fp32-residual,autocast,fused-ce,liger,selective:0.5,bs:8 --out results.jsonl
    (also: compile, budget:B, fp8, decode:bnb|fused, real and packed (need --data/--tokenizer), attn:flex_attention)

--first-measured K applies the first K variants without timing them; --profile N runs N more steps of each
measured variant under torch.profiler and prints where the GPU time went (kernel categories, top kernels).

MFU: useful FLOPs (4N per token + 12 L h s^2 per row, qlora/mfu.py) over time over the GPU's peak.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from qlora import distributed, fp8, kernels, mfu, modeling
from qlora.config import JobConfig
from qlora.evaluation import to_tensors
from qlora.model_source import ModelSource
from qlora.batching import model_inputs, train_batch
from qlora.strategies import Strategy
from qlora.train_step import forward_backward

# CUDA on the GPU host; CPU only to check this script itself on a tiny model before spending GPU time.
DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
CUDA = DEVICE.type == "cuda"


def sync():
    if CUDA:
        torch.cuda.synchronize()


def build(path: str, bs: int, seq: int, gc: bool):
    cfg = JobConfig.model_validate({
        "model": {"name": path}, "data": {"path": "unused.jsonl", "max_length": seq},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "train": {"batch_size": bs, "gradient_checkpointing": gc, "learning_rate": 2e-4},
        "scaling": {"use_gpu": torch.cuda.is_available()}})
    device = DEVICE
    t = time.time()
    base = modeling.load_base_model(cfg, ModelSource(path, True, "benchmark"), device)
    load_s = time.time() - t
    torch.manual_seed(0)
    model = modeling.attach_lora(base, cfg.lora)
    return cfg, base, model, load_s


def batches(vocab: int, bs: int, seq: int, n: int, device):
    g = torch.Generator(device="cpu").manual_seed(1234)
    for _ in range(n):
        ids = torch.randint(0, vocab, (bs, seq), generator=g).to(device)
        yield {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


def real_batches(args, packed: bool, device, width: int | None = None) -> list[dict]:
    """Micro-batches of real instruction data (--data, alpaca format) tokenized with --tokenizer: `bs`
    examples padded to the longest (the peer's loop), or `bs` rows of examples packed up to --seq tokens."""
    import random

    from transformers import AutoTokenizer

    from qlora.config import DataSection
    from qlora.data import Encoder, pack_examples
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    tok.pad_token = tok.pad_token or tok.eos_token
    records = json.loads(open(args.data).read())  # a JSON array (the GPU host has no `datasets`)
    random.Random(0).shuffle(records)
    enc = Encoder(tok, "alpaca", DataSection(path=args.data, format="alpaca", max_length=args.seq))
    examples = [enc.encode(r) for r in records]
    items = pack_examples(examples, args.seq) if packed else examples
    groups = [train_batch(items[i:i + args.bs], tok.pad_token_id, packed, width) for i in range(0, len(items), args.bs)]
    need = args.warmup + args.steps
    groups = (groups * (need // len(groups) + 1))[:need]
    return [to_tensors(g, device) for g in groups]


KERNEL_KINDS = (  # substring of a CUDA kernel's lower-cased name -> category, first match wins
    ("dequant", "bnb dequantize"), ("flash", "attention"), ("fmha", "attention"), ("attention", "attention"),
    ("gemm", "matmul"), ("cutlass", "matmul"), ("xmma", "matmul"), ("nvjet", "matmul"), ("cublas", "matmul"),
    ("triton", "triton (inductor, liger)"), ("memcpy", "copy"), ("memset", "copy"), ("copy", "copy"),
    ("elementwise", "aten elementwise"), ("reduce", "aten reduce"))


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for key, kind in KERNEL_KINDS if key in low), "other")


def profile_steps(step, steps: list[dict]) -> dict:
    """GPU kernel time of `steps` by category and the top kernels, per step, against the wall time."""
    from torch.profiler import ProfilerActivity, profile
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for b in steps:
            step(b)
        sync()
        wall = (time.perf_counter() - t) / len(steps)
    kernels_ms: dict[str, float] = {}
    for e in prof.key_averages():
        us = e.self_device_time_total
        if us > 0:
            kernels_ms[e.key] = kernels_ms.get(e.key, 0.0) + us / 1e3 / len(steps)
    by_kind: dict[str, float] = {}
    for name, ms in kernels_ms.items():
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + ms
    top = sorted(kernels_ms.items(), key=lambda kv: -kv[1])[:25]
    return {"wall_ms": round(wall * 1e3, 1), "kernel_ms": round(sum(kernels_ms.values()), 1),
            "by_kind_ms": {k: round(v, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": [[name[:110], round(ms, 2)] for name, ms in top]}


def run_variant(cfg, model, hidden, use_autocast: bool, init: dict, args, flops: mfu.FlopCounter,
                data: list[dict] | None = None) -> dict:
    from peft import set_peft_model_state_dict
    set_peft_model_state_dict(model, init)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.learning_rate)
    device = DEVICE
    torch.manual_seed(0)  # LoRA dropout masks
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model.train()
    times, losses, useful = [], [], []
    dtype = torch.bfloat16 if use_autocast else torch.float32
    flops.reset()
    steps = data or list(batches(model.config.vocab_size, args.bs, args.seq,
                                 args.warmup + args.steps + args.profile, device))

    one_gpu = Strategy(distributed.Context(0, 1, device), cfg)

    def step(b):  # the worker's step (qlora/train_step.py), on one GPU
        loss = forward_backward(model, model_inputs(b), b["labels"], hidden, kernels.next_token_loss, dtype, one_gpu)
        one_gpu.apply_update(model, opt, cfg.train.max_grad_norm)
        return loss.item()  # synchronizes

    for i, b in enumerate(steps[:args.warmup + args.steps]):
        sync()
        t = time.perf_counter()
        losses.append(step(b))
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
            mask = b.get("token_mask", b.get("attention_mask"))
            useful.append(int(mask.sum()))
            rows = [{"input_ids": r, "position_ids": p.tolist()} for r, p in zip(
                b["input_ids"], b["position_ids"])] if "position_ids" in b else None
            flops.add([n for r in rows for n in mfu.example_lengths(r)] if rows else mask.sum(1).tolist())
    total = sum(times)
    step_s = sorted(times)[len(times) // 2]
    utilization = flops.mfu(total)
    profiled = {"profile": profile_steps(step, steps[-args.profile:])} if args.profile and CUDA else {}
    return {**profiled, "step_s": round(step_s, 4), "tok_s": round(sum(useful) / total),
            "slots_per_step": int(b["input_ids"].numel()), "useful_per_step": round(sum(useful) / len(useful)),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else None,
            "mfu": round(utilization, 4) if utilization is not None else None,
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)}


fp8_fusable = fp8.fusable


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="folder of a saved (random-weight) HF causal LM")
    p.add_argument("--bs", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default="fp32-residual,autocast,fused-ce,liger,selective:0.5")
    p.add_argument("--out", default="speed.jsonl")
    p.add_argument("--data", help="alpaca-format file for the variants `real` and `packed`: useful (non-pad) "
                   "tokens/s on real data (random tokens before them)")
    p.add_argument("--tokenizer", help="tokenizer folder for --data")
    p.add_argument("--first-measured", type=int, default=0, help="apply the variants before this index untimed")
    p.add_argument("--profile", type=int, default=0, help="profile this many more steps of each measured variant")
    args = p.parse_args()
    cfg, base, model, load_s = build(args.model, args.bs, args.seq, gc=True)
    from peft import get_peft_model_state_dict
    init = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    flops = mfu.FlopCounter(mfu.base_param_count(model), base.config,
                              torch.cuda.get_device_name(0) if CUDA else None)
    hidden, use_autocast, applied, real, packed = None, False, [], False, False
    for variant in args.variants.split(","):
        name, _, value = variant.partition(":")
        if name == "autocast":
            use_autocast = True
        elif name == "fused-ce":
            hidden = kernels.HiddenStates(model, liger="liger" in applied)
        elif name == "liger-ce":  # Liger's fused linear cross-entropy alone, the layers left as they are
            hidden.liger = True
        elif name == "liger":
            kernels.apply_liger(base)
            if hidden is not None:
                hidden.liger = True
        elif name == "selective":
            for layer in kernels.decoder_layers(base):  # all on again, then keep the fraction asked for
                layer.gradient_checkpointing = True
            kernels.select_checkpointed_layers(base, float(value))
        elif name == "compile":
            kernels.compile_layers(model)
        elif name == "budget":  # train.compile_memory_budget (1.0: the compiler's default), then recompile
            kernels.set_activation_memory_budget(float(value))
            torch._dynamo.reset()
        elif name == "attn":  # another attention implementation (model.attn_implementation), e.g. flex_attention
            base.set_attn_implementation(value)
            torch._dynamo.reset()
        elif name == "fp8":  # train.fp8_base: the frozen base's matmuls in FP8 (qlora/fp8.py), then recompile
            fp8.use_fp8_base(base)
            torch._dynamo.reset()
        elif name == "decode":  # fp8's weight decode when compiled: fused (qlora.fp8.nf4_to_fp8) or bnb's dequantize
            fp8.fusable = fp8_fusable if value == "fused" else (lambda state: False)
            torch._dynamo.reset()
        elif name == "real":  # real examples (--data), padded to the longest, from here on
            real = True
        elif name == "packed":  # real examples packed into rows of --seq tokens from here on
            real = packed = True
        elif name == "bs":  # a larger micro-batch for the variants from here on
            args.bs = int(value)
        elif name != "fp32-residual":
            raise SystemExit(f"unknown variant {variant}")
        applied.append(variant)
        if len(applied) <= args.first_measured:
            continue
        try:
            width = args.seq  # as the worker: packed rows padded to one width
            data = real_batches(args, packed, DEVICE, width) if real else None
            result = run_variant(cfg, model, hidden, use_autocast, init, args, flops, data)
        except torch.OutOfMemoryError:
            result = {"oom": True}
            torch.cuda.empty_cache()
        row = {"variant": "+".join(applied), "model": args.model, "data": args.data, "bs": args.bs, "seq": args.seq,
               "load_s": round(load_s, 1), **result}
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
