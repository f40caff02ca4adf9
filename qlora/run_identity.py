"""Whether the checkpoints found under a run's name belong to the run a config describes. A run name reused with
another learning rate (or data, model, LoRA shape...) used to resume the old run silently: it trained nothing
more and returned the old adapter. A resume now goes on only where nothing that changes the trained adapter
differs from the config saved in the run's latest checkpoint; otherwise the job stops before Ray starts,
naming the keys."""
from __future__ import annotations

import yaml

from qlora.config import JobConfig, flatten
from qlora.errors import ConfigError

# Keys that do not change the adapter a run trains: where it runs and reports, how it is evaluated, how often
# it logs, evaluates and saves (a resume is exact whatever the cadence), how many failures it may survive.
NEUTRAL_PREFIXES = ("tracking.", "evaluation.")
NEUTRAL_KEYS = frozenset({
    "train.log_every", "train.eval_every", "train.save_every", "scaling.ray_address", "scaling.storage_path",
    "scaling.max_failures", "scaling.max_preemptions", "scaling.cpus_per_worker", "scaling.accelerator_type"})
# A run may resume on another worker count (qlora.batching: a step is the same global micro-batches on any count):
# what must match is the global batch, compared as GLOBAL_BATCH, not these three.
WORKER_COUNT_KEYS = frozenset({"scaling.num_workers", "scaling.min_workers", "train.gradient_accumulation"})
GLOBAL_BATCH = "global batch (train.batch_size x train.gradient_accumulation x scaling.num_workers)"
# What the job fills in itself: a classifier's label count, inferred from the data when the config leaves it out.
INFERRED_KEYS = frozenset({"model.num_labels"})
# train.auto_batch_size may have halved the micro-batch after an out-of-memory error (raising the accumulation
# to keep the global batch): the saved config then differs from the one the user wrote in these two.
AUTO_BATCH_KEYS = frozenset({"train.batch_size", "train.gradient_accumulation"})


def changed_keys(saved: dict, cfg: JobConfig) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for every setting that changes the trained adapter and differs. `cfg` as
    the workers saw it (runtime.worker_config: local paths absolute, as the checkpoint saved them)."""
    old, new = with_global_batch(flatten(saved)), with_global_batch(flatten(cfg))
    skip = set(NEUTRAL_KEYS) | WORKER_COUNT_KEYS | (AUTO_BATCH_KEYS if cfg.train.auto_batch_size else set())
    changes = []
    for key in sorted(old.keys() | new.keys()):
        if key in skip or key.startswith(NEUTRAL_PREFIXES):
            continue
        if key in INFERRED_KEYS and new.get(key) is None:
            continue
        if old.get(key) != new.get(key):
            changes.append((key, old.get(key), new.get(key)))
    return changes


def with_global_batch(flat: dict) -> dict:
    return {**flat, GLOBAL_BATCH: flat["train.batch_size"] * flat["train.gradient_accumulation"]
            * flat["scaling.num_workers"]}


def check_same_run(saved_yaml: str | None, cfg: JobConfig, name: str, storage: str) -> None:
    """Raise ConfigError when the run's saved config differs from `cfg` (as the workers see it) in anything
    that changes the result. `saved_yaml`: the config.yaml of the run's latest checkpoint (None when no
    checkpoint holds one)."""
    if saved_yaml is None:
        return
    changes = changed_keys(yaml.safe_load(saved_yaml), cfg)
    if not changes:
        return
    listed = "; ".join(f"{key}: {old!r} in the run, {new!r} now" for key, old, new in changes[:8])
    more = f" (and {len(changes) - 8} more)" if len(changes) > 8 else ""
    raise ConfigError(
        f"run {name} has checkpoints in {storage} trained with another config: {listed}{more}. Resuming would "
        "continue the old run and return its adapter, not one trained with this config",
        "set tracking.run_name to a new name to train a new run (or leave it out: the default name carries the "
        "start time), or put back the run's values to resume it")
