"""Planning check: does one Ray Train worker of a config fit a node type of the cluster, and how many
nodes of which type will the autoscaler start for the job (or for a sweep's concurrent trials)?

Nothing is launched. The cluster is the cluster launcher YAML (cluster.yaml), read by qlora/cluster_config.py.
The choice of node types is Ray's own: the bin packing the cluster's autoscaler runs
(`ray.autoscaler._private.resource_demand_scheduler`, Ray 2.60) applied to the bundles the job will
request, in the order it requests them. tests/e2e/test_cluster.py checks the prediction against a real
autoscaler on a local fake multi-node cluster.
"""
from __future__ import annotations

import logging
from collections import Counter

from qlora.cluster_config import Cluster, load_cluster
from qlora.config import JobConfig
from qlora.errors import EnvironmentProblem
from qlora.resources import ACCELERATOR_PREFIX, TRIAL_RESOURCES, per_node, trial_count, worker_bundle

def fitting_types(cluster: Cluster, bundle: dict) -> dict[str, int]:
    """Node types (head included) on which one worker fits -> workers per node."""
    out = {}
    for name, t in cluster.node_types.items():
        if name != cluster.head and t.max_workers == 0:
            continue
        n = per_node(bundle, t.resources)
        if n:
            out[name] = n
    return out


def _no_fit(cluster: Cluster, bundle: dict, what: str) -> EnvironmentProblem:
    """The clearest reason no node type holds one worker, with the fix."""
    types = {n: t for n, t in cluster.node_types.items() if n == cluster.head or t.max_workers > 0}
    accelerators = sorted({k.removeprefix(ACCELERATOR_PREFIX) for t in types.values() for k in t.resources
                           if k.startswith(ACCELERATOR_PREFIX)})
    src = cluster.source
    for key, need in bundle.items():
        best = max(types.values(), key=lambda t: t.resources.get(key, 0.0))
        have = best.resources.get(key, 0.0)
        if have >= need:
            continue
        if key.startswith(ACCELERATOR_PREFIX):
            acc = key.removeprefix(ACCELERATOR_PREFIX)
            return EnvironmentProblem(
                f"{what}: scaling.accelerator_type={acc} but no node type of {src} has {acc} GPUs "
                f"(it has: {', '.join(accelerators) or 'none'})",
                f"set scaling.accelerator_type to one of {', '.join(accelerators) or '(none: unset it)'}, "
                f"or add a node type with {acc} GPUs to {src}")
        if key == "GPU":
            if have == 0:
                return EnvironmentProblem(f"{what}: each worker asks for {need:g} GPU but no node type of {src} has a GPU",
                                          f"set scaling.use_gpu=false, or add a GPU node type to {src}")
            return EnvironmentProblem(
                f"{what}: each worker asks for {need:g} GPUs but the largest GPU node type of {src} "
                f"({best.name}) has {have:g}",
                f"ask for at most {have:g} GPUs per worker (scaling.resources_per_worker.GPU; one GPU per worker "
                f"with more workers is the usual QLoRA setup), or add a node type with {need:g} GPUs to {src}")
        if key == "CPU":
            return EnvironmentProblem(
                f"{what}: each worker asks for {need:g} CPUs but the largest node type of {src} ({best.name}) has {have:g}",
                f"set scaling.cpus_per_worker to at most {have:g}, or add a larger node type to {src}")
        if have == 0:
            return EnvironmentProblem(
                f"{what}: each worker asks for resource '{key}' and no node type of {src} offers it",
                f"drop '{key}' from scaling.resources_per_worker, or add it to a node type's resources in {src}")
        return EnvironmentProblem(
            f"{what}: each worker asks for {key}={need:g} but the most any node type of {src} has is {have:g} ({best.name})",
            f"lower scaling.resources_per_worker.{key} to at most {have:g}, or raise it on a node type in {src}")
    # Every resource exists somewhere, but no single node type has all of them.
    closest = sorted(types.values(), key=lambda t: -sum(t.resources.get(k, 0) >= v for k, v in bundle.items()))[0]
    lacks = ", ".join(f"{k} {v:g} (has {closest.resources.get(k, 0):g})" for k, v in bundle.items()
                      if closest.resources.get(k, 0) < v)
    return EnvironmentProblem(
        f"{what}: no single node type of {src} has everything one worker asks for ({_fmt(bundle)}); "
        f"the closest, {closest.name}, lacks {lacks}",
        f"change scaling.* so one node type holds a worker, or add such a node type to {src}")


def launch(cluster: Cluster, phases: list[list[dict]], unbounded: bool = False) -> tuple[dict[str, int], list[dict]]:
    """Nodes the autoscaler adds for `phases` (bundles requested together; a later phase only after the
    earlier one runs), and the bundles that still do not fit. Ray's autoscaler (v1) bin packing."""
    from ray.autoscaler._private.resource_demand_scheduler import _resource_based_utilization_scorer

    big = 10 ** 6
    limits = {n: {"resources": t.resources, "min_workers": t.min_workers,
                  "max_workers": (0 if n == cluster.head else big if unbounded else t.max_workers)}
              for n, t in cluster.node_types.items()}
    global_max = big if unbounded else cluster.max_workers
    running = Counter({cluster.head: 1})
    nodes = [dict(cluster.node_types[cluster.head].resources)]
    for n, t in cluster.node_types.items():  # min_workers nodes are always there
        if n != cluster.head and t.min_workers:
            running[n] += t.min_workers
            nodes += [dict(t.resources) for _ in range(t.min_workers)]

    def scorer(node_resources, demands, node_type):
        return _resource_based_utilization_scorer(node_resources, demands, node_availability_summary=None)

    quiet = logging.getLogger("ray.autoscaler._private.resource_demand_scheduler")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its "could not find a node type" warning: the plan reports that itself
    try:
        return _launch(cluster, phases, limits, global_max, running, nodes, scorer)
    finally:
        quiet.setLevel(level)


def _launch(cluster, phases, limits, global_max, running, nodes, scorer):
    from ray.autoscaler._private.resource_demand_scheduler import get_bin_pack_residual, get_nodes_for
    added: Counter = Counter()
    for phase in phases:
        unfulfilled, nodes = get_bin_pack_residual(nodes, phase)
        if not unfulfilled:
            continue
        room = global_max - (sum(running.values()) - 1)
        to_add, residual = get_nodes_for(limits, dict(running), cluster.head, room, unfulfilled, scorer)
        for n, k in to_add.items():
            running[n] += k
            added[n] += k
            nodes += [dict(cluster.node_types[n].resources) for _ in range(k)]
        if residual:
            return dict(added), residual
        left, nodes = get_bin_pack_residual(nodes, unfulfilled)
        if left:
            return dict(added), left
    return dict(added), []


def _phases(bundle: dict, workers: int, trials: int, sweep: bool) -> list[list[dict]]:
    if not sweep:
        return [[bundle] * workers]
    # Tune starts the trials first (each a 0.01-CPU actor); each then asks for its workers.
    return [[dict(TRIAL_RESOURCES)] * trials, [bundle] * (workers * trials)]


def plan(cfg: JobConfig, cluster: Cluster, space=None) -> dict:
    """The plan as a dict; raises ConfigError / EnvironmentProblem for requests the cluster cannot serve."""
    sweep = space is not None
    candidates = _trial_scalings(cfg, space) if sweep else [("", cfg)]
    results = []
    for label, c in candidates:
        results.append(_plan_one(c, cluster, space, label))
    chosen = max(results, key=lambda r: (r["worker_nodes"], r["workers_per_trial"]))
    if len(results) > 1:
        chosen["planned_for"] = chosen.pop("_label") + " (the sweep's largest trial)"
    else:
        chosen.pop("_label")
    chosen["warnings"] = _warnings(cfg, cluster, chosen)
    return chosen


def _trial_scalings(cfg: JobConfig, space) -> list[tuple[str, JobConfig]]:
    """A sweep over scaling.* paths: one config per extreme value (every trial must fit; plan the largest)."""
    from qlora.search_space import apply_params
    swept = {p: d for p, d in space.params.items() if p.startswith("scaling.")}
    if not swept:
        return [("", cfg)]
    out = []
    for path, dist in swept.items():
        for value in dist.extremes():
            out.append((f"{path}={value}", apply_params(cfg, {path: value}, space.tied)))
    return out


def _plan_one(cfg: JobConfig, cluster: Cluster, space, label: str) -> dict:
    s = cfg.scaling
    bundle = worker_bundle(s)
    what = f"{label}: " if label else ""
    what += f"{s.num_workers} worker{'s' if s.num_workers > 1 else ''} of {_fmt(bundle)}"
    fits = fitting_types(cluster, bundle)
    if not fits:
        raise _no_fit(cluster, bundle, what)
    sweep = space is not None
    total = trial_count(space) if sweep else 1
    asked = (space.max_concurrent_trials or total) if sweep else 1
    concurrent = min(asked, total)

    def needs(k: int, unbounded: bool = False):
        return launch(cluster, _phases(bundle, s.num_workers, k, sweep), unbounded)

    added, residual = needs(concurrent)
    if residual:
        fit_k = _largest_fitting(lambda k: not needs(k)[1], concurrent - 1)
        if sweep and space.max_concurrent_trials is None and fit_k >= 1:
            concurrent = fit_k  # Tune runs as many trials at once as the cluster holds
            added, _ = needs(concurrent)
        else:
            wanted, _ = needs(concurrent, unbounded=True)
            job = f"{concurrent} concurrent trials x {what}" if sweep else what
            if sweep and fit_k:
                fix = f"set max_concurrent_trials to at most {fit_k} in the search space, or "
            else:
                fit_n = _largest_fitting(lambda n: not launch(cluster, _phases(bundle, n, 1, sweep))[1],
                                         s.num_workers - 1)
                fix = f"lower scaling.num_workers to at most {fit_n}, or " if fit_n else ""
            raise EnvironmentProblem(
                f"{job} need {_fmt_nodes(wanted)}, more than {cluster.source} allows ({_over_limits(cluster, wanted)})",
                f"{fix}raise {' and '.join(_limit_names(cluster, wanted))} in {cluster.source}")
    return {
        "_label": label,
        "cluster": cluster.name, "cluster_file": cluster.source, "job": "sweep" if sweep else "train",
        "worker_resources": bundle, "workers_per_trial": s.num_workers,
        **({"trials": total, "concurrent_trials": concurrent} if sweep else {}),
        "fits_node_types": fits,
        "nodes": added, "worker_nodes": sum(added.values()), "max_workers": cluster.max_workers,
        "head": {"type": cluster.head, "resources": cluster.node_types[cluster.head].resources},
    }


def _largest_fitting(ok, upper: int) -> int:
    """Largest k in [0, upper] with ok(k) (ok is monotone: fewer always fits if more does)."""
    lo, hi = 0, max(upper, 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _over_limits(cluster: Cluster, wanted: dict[str, int]) -> str:
    parts = [f"{n}: max_workers {cluster.node_types[n].max_workers}" for n, k in wanted.items()
             if k > cluster.node_types[n].max_workers]
    if sum(wanted.values()) > cluster.max_workers:
        parts.append(f"global max_workers {cluster.max_workers}")
    return ", ".join(parts) or "max_workers"


def _limit_names(cluster: Cluster, wanted: dict[str, int]) -> list[str]:
    names = [f"available_node_types.{n}.max_workers" for n, k in wanted.items()
             if k > cluster.node_types[n].max_workers]
    if sum(wanted.values()) > cluster.max_workers:
        names.append("max_workers")
    return names or ["max_workers"]


def _warnings(cfg: JobConfig, cluster: Cluster, p: dict) -> list[str]:
    out = []
    s = cfg.scaling
    off_head = p["worker_nodes"] > 0
    if off_head and "://" not in s.storage_path:
        out.append(f"scaling.storage_path={s.storage_path} is a local path, but workers run on other nodes than "
                   "the driver: use storage every node reads, e.g. --set scaling.storage_path=s3://BUCKET/qlora-runs "
                   "(or a shared file system mounted at the same path on every node)")
    uri = cfg.tracking.uri
    if off_head and cfg.tracking.enabled and (uri is None or not uri.startswith(("http://", "https://", "databricks"))):
        out.append(f"tracking.uri={uri or '(default: a sqlite file beside the driver)'} is local to one node; "
                   "workers on other nodes log metrics to it: point tracking.uri at an MLflow server "
                   "(http://...), or set tracking.enabled=false")
    if s.accelerator_type and not s.use_gpu:
        out.append(f"scaling.accelerator_type={s.accelerator_type} with scaling.use_gpu=false: workers land on "
                   f"{s.accelerator_type} nodes but use no GPU")
    return out


def _fmt(res: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in res.items()) + "}"


def _fmt_nodes(nodes: dict[str, int]) -> str:
    return " + ".join(f"{k} x {n}" for n, k in nodes.items()) or "no new nodes"


def describe(p: dict, cluster: Cluster) -> str:
    lines = [f"cluster {p['cluster']} ({p['cluster_file']}): head '{p['head']['type']}' {_fmt(p['head']['resources'])}, "
             f"at most {p['max_workers']} worker nodes"]
    lines.append(f"each Ray Train worker asks for {_fmt(p['worker_resources'])}")
    for name, k in p["fits_node_types"].items():
        t = cluster.node_types[name]
        lines.append(f"  fits on {name}{f' ({t.instance_type})' if t.instance_type else ''}: {k} per node, "
                     f"max_workers {t.max_workers}")
    if p["job"] == "sweep":
        lines.append(f"sweep: {p['trials']} trials, {p['concurrent_trials']} at once, {p['workers_per_trial']} "
                     f"workers each" + (f"; planned for {p['planned_for']}" if p.get("planned_for") else ""))
    else:
        lines.append(f"train: {p['workers_per_trial']} workers")
    if p["nodes"]:
        nodes = ", ".join(f"{k} x {n}" + (f" ({cluster.node_types[n].instance_type})"
                                           if cluster.node_types[n].instance_type else "")
                          for n, k in p["nodes"].items())
        lines.append(f"the autoscaler will start {p['worker_nodes']} worker node(s): {nodes}")
    else:
        lines.append("the autoscaler will start no worker nodes (everything fits on the running nodes)")
    lines += [f"warning: {w}" for w in p["warnings"]]
    return "\n".join(lines)


def plan_job(cfg: JobConfig, cluster_path, space=None) -> dict:
    """Entry point of `python -m ray_jobs.plan`: print the plan, return it (the last stdout line)."""
    cluster = load_cluster(cluster_path)
    if space is not None:
        space.check_against(cfg)
    p = plan(cfg, cluster, space)
    print(describe(p, cluster), flush=True)
    return p
