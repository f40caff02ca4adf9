"""What a job asks Ray for, computed once: one Ray Train worker's bundle and ScalingConfig arguments, what a Tune
trial itself reserves, how many workers a node holds, and how many trials a sweep runs. Used by the Train
driver, the preflight checks and the cluster planner alike."""
from __future__ import annotations

import math

from qlora.config import ScalingSection
from qlora.errors import ConfigError

# What each Tune trial itself asks for (qlora/jobs/sweep.py: tune.with_resources(run_trial, {"CPU": 0.01})).
TRIAL_RESOURCES = {"CPU": 0.01}


ACCELERATOR_PREFIX = "accelerator_type:"


def scaling_kwargs(s: ScalingSection) -> dict:
    """Keyword arguments of ray.train.ScalingConfig for this config (what train_driver.fit passes)."""
    # (min, max): Ray Train's elastic mode, which starts and restarts on as many workers as fit in that range.
    workers = (s.min_workers, s.num_workers) if s.min_workers else s.num_workers
    return {"num_workers": workers, "use_gpu": s.use_gpu,
            "resources_per_worker": {"CPU": s.cpus_per_worker, **s.resources_per_worker},
            "accelerator_type": s.accelerator_type}


def worker_bundle(s: ScalingSection) -> dict[str, float]:
    """The resources one Ray Train worker reserves, computed as ray.train.ScalingConfig does from
    scaling_kwargs(s): zero entries dropped, GPU 1 with use_gpu unless given, accelerator_type:<type> 0.001."""
    res = {k: float(v) for k, v in {"CPU": s.cpus_per_worker, **s.resources_per_worker}.items() if v != 0}
    gpu = s.resources_per_worker.get("GPU")
    if gpu is not None and gpu > 0 and not s.use_gpu:
        raise ConfigError(f"scaling.resources_per_worker.GPU={gpu:g} but scaling.use_gpu is false "
                          "(Ray Train refuses this)", "set scaling.use_gpu=true, or drop GPU from resources_per_worker")
    if s.use_gpu and gpu == 0:
        raise ConfigError("scaling.use_gpu is true but scaling.resources_per_worker.GPU is 0 (Ray Train refuses this)",
                          "drop GPU from resources_per_worker (1 GPU per worker), or set scaling.use_gpu=false")
    if s.use_gpu:
        res.setdefault("GPU", 1.0)
    if s.accelerator_type:
        res.setdefault(ACCELERATOR_PREFIX + s.accelerator_type, 0.001)
    return res


def trial_count(space) -> int:
    """Trials a sweep runs: num_samples x the product of the grid sizes."""
    return space.num_samples * math.prod(len(d.grid) for d in space.params.values() if d.kind == "grid")


def per_node(bundle: dict, resources: dict) -> int:
    """How many copies of `bundle` one node with `resources` holds."""
    counts = [math.floor(resources.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0]
    return min(counts) if counts else 0
