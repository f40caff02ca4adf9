"""Host RAM of loading a base model through qlora.modeling, sampled every 20 ms while it loads.

Run N copies at once on one node (as N Ray Train workers would) to see whether host RAM grows N-fold:
private (anonymous) memory is each worker's own; file-backed pages of the memory-mapped safetensors are the
page cache, shared by all of them. Prints one JSON line per process.

    python3 benchmarks/host_ram_load.py --model /tmp/rand-llama-70b-nf4 [--strategy fsdp]
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch

from qlora import modeling
from qlora.config import JobConfig
from qlora.model_source import ModelSource
from qlora.strategies import STRATEGIES


def status_gib() -> dict[str, float]:
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 2**20
    return out


def available_gib() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    args = p.parse_args()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    cfg = JobConfig.model_validate({"model": {"name": args.model}, "data": {"path": "unused.jsonl"},
                                    "scaling": {"use_gpu": device.type == "cuda", "strategy": args.strategy}})
    peak = {"VmRSS": 0.0, "RssAnon": 0.0, "RssFile": 0.0}
    min_available = [available_gib()]
    done = threading.Event()

    def sample():
        while not done.is_set():
            for k, v in status_gib().items():
                peak[k] = max(peak[k], v)
            min_available[0] = min(min_available[0], available_gib())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    before, t = status_gib(), time.perf_counter()
    sampler.start()
    model = modeling.load_base_model(cfg, ModelSource(args.model, True, "benchmark"), device,
                                     prepare=STRATEGIES[args.strategy].prepare_base)
    seconds = time.perf_counter() - t
    done.set()
    sampler.join()
    print(json.dumps({"pid": os.getpid(), "load_s": round(seconds, 1), "before_gib": before, "peak_gib": peak,
                      "after_gib": status_gib(), "node_min_available_gib": min_available[0],
                      "gpu_gib": torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None,
                      "weights_gib": model.get_memory_footprint() / 2**30}), flush=True)


if __name__ == "__main__":
    main()
