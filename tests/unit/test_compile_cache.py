"""torch.compile's artifacts kept in the run's storage (qlora/compile_cache.py): a fresh process on a machine with
empty compiler caches (a new node) that loads them compiles nothing again; the key follows the graphs' shape."""
import json
import subprocess
import sys

import torch

from qlora import compile_cache
from qlora.config import JobConfig

# One process of a run: load the storage's artifacts if any, compile and run a step, write them if there were none.
STEP = """
import json, sys, torch
from torch._dynamo.utils import counters
from qlora import compile_cache
where = sys.argv[1]
found = compile_cache.load(where)
layer = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.SiLU())
step = torch.compile(lambda x: layer(x).square().sum())
step(torch.randn(4, 32, requires_grad=True)).backward()
size = compile_cache.save(where) if found is None else None
print(json.dumps({"found": found, "written": size, "inductor": dict(counters["inductor"]),
                  "aot_autograd": dict(counters["aot_autograd"])}))
"""


def _process(where: str, tmp_path, name: str) -> dict:
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / name), "PATH": "/usr/bin:/bin"}  # this "node"'s empty caches
    out = subprocess.run([sys.executable, "-c", STEP, where], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_new_node_loads_the_runs_compiled_artifacts_and_compiles_nothing_again(tmp_path):
    where = f"{tmp_path}/storage/{compile_cache.FOLDER}/key.bin"
    first = _process(where, tmp_path, "node-a")
    assert first["found"] is None and first["written"] > 0
    assert first["inductor"].get("fxgraph_cache_miss", 0) >= 2 and not first["inductor"].get("fxgraph_cache_hit")
    second = _process(where, tmp_path, "node-b")
    assert second["found"] >= 3 and second["written"] is None  # forward and backward graphs + AOTAutograd's entry
    assert second["inductor"].get("fxgraph_cache_hit", 0) >= 2 and not second["inductor"].get("fxgraph_cache_miss")
    assert second["aot_autograd"].get("autograd_cache_hit") == 1


def test_the_key_follows_what_shapes_the_graphs():
    base = {"model": {"name": "m"}, "data": {"path": "x"}, "train": {"compile": True}}

    def where(**sections):
        cfg = JobConfig.model_validate({**base, **{k: {**base.get(k, {}), **v} for k, v in sections.items()}})
        return compile_cache.location("s3://bucket/runs", cfg, torch.device("cpu"), 1)

    same = where()
    assert same.startswith("s3://bucket/runs/compile_cache/") and same.endswith(".bin")
    assert where(train={"learning_rate": 1e-5, "seed": 7}) == same  # a learning-rate sweep's trials share it
    different = {where(lora={"r": 8}), where(train={"batch_size": 2}), where(data={"max_length": 256}),
                 where(train={"compile_memory_budget": 0.2})}
    assert same not in different and len(different) == 4
