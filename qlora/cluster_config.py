"""A cluster launcher YAML (cluster.yaml) as node types and their resources; for AWS node types the CPUs, GPUs and
accelerator type come from the EC2 instance type (`AWS_INSTANCE_TYPES`, the table Ray's AWS provider would fill
in from the EC2 API), explicit `resources` win."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from qlora.errors import ConfigError
from qlora.resources import ACCELERATOR_PREFIX

# EC2 instance type -> (vCPUs, memory GiB, GPUs, accelerator type as Ray names it), for the types that
# cluster.yaml uses (and close relatives). Add a row when cluster.yaml gets a new instance type, or
# write the node type's `resources` explicitly.
AWS_INSTANCE_TYPES: dict[str, tuple[int, int, int, Optional[str]]] = {
    "m5.large": (2, 8, 0, None),
    "m5.xlarge": (4, 16, 0, None),
    "m5.2xlarge": (8, 32, 0, None),
    "m5.4xlarge": (16, 64, 0, None),
    "g5.xlarge": (4, 16, 1, "A10G"),
    "g5.2xlarge": (8, 32, 1, "A10G"),
    "g5.12xlarge": (48, 192, 4, "A10G"),
    "g5.48xlarge": (192, 768, 8, "A10G"),
    "g6.xlarge": (4, 16, 1, "L4"),
    "p4d.24xlarge": (96, 1152, 8, "A100"),
    "p4de.24xlarge": (96, 1152, 8, "A100"),
    "p5.48xlarge": (192, 2048, 8, "H100"),
}


# Ray's AWS provider advertises this share of a worker's RAM as the `memory` resource (the rest is
# left to the object store): ray._private.ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION = 0.3.
_MEMORY_SHARE = 0.7


@dataclass
class NodeType:
    name: str
    resources: dict[str, float]
    min_workers: int
    max_workers: int
    instance_type: Optional[str] = None


@dataclass
class Cluster:
    name: str
    source: str
    head: str
    max_workers: int
    node_types: dict[str, NodeType]

    def workers(self) -> dict[str, NodeType]:
        return {n: t for n, t in self.node_types.items() if n != self.head and t.max_workers > 0}


def load_cluster(path) -> Cluster:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"cluster file {p} does not exist", "pass --cluster with a Ray cluster launcher YAML, "
                          "e.g. cluster.yaml")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"cluster file {p} is not valid YAML: {e}", "fix the YAML syntax") from None
    return cluster_from_dict(raw, str(p))


def cluster_from_dict(raw: Any, source: str = "cluster config") -> Cluster:
    """Node types with the resources the autoscaler will assume for them. Raises ConfigError."""
    def bad(problem: str, fix: str):
        raise ConfigError(f"{source}: {problem}", fix)

    if not isinstance(raw, dict):
        bad("is not a mapping", "write a Ray cluster launcher config (cluster_name, provider, available_node_types, ...)")
    types = raw.get("available_node_types")
    head = raw.get("head_node_type")
    if not isinstance(types, dict) or not types:
        bad("has no available_node_types", "list the head and worker node types under available_node_types")
    if head not in types:
        bad(f"head_node_type {head!r} is not one of available_node_types ({', '.join(types)})",
            "set head_node_type to the name of the head's node type")
    max_workers = raw.get("max_workers", 2)  # Ray's default for the cluster launcher
    if not isinstance(max_workers, int) or max_workers < 0:
        bad(f"max_workers must be a whole number >= 0 (got {max_workers!r})", "set max_workers, e.g. max_workers: 10")
    provider = (raw.get("provider") or {}).get("type")
    node_types = {}
    for name, spec in types.items():
        if not isinstance(spec, dict):
            bad(f"node type {name} is not a mapping", "give it resources, node_config, min_workers, max_workers")
        explicit = spec.get("resources") or {}
        if not isinstance(explicit, dict) or not all(isinstance(v, (int, float)) for v in explicit.values()):
            bad(f"node type {name}: resources must map names to numbers (got {explicit!r})",
                'write e.g. resources: {"CPU": 4, "GPU": 1}')
        instance = (spec.get("node_config") or {}).get("InstanceType")
        resources = dict(explicit)
        if provider == "aws":
            if instance in AWS_INSTANCE_TYPES:
                resources = {**_aws_resources(instance, worker=name != head), **explicit}
            elif "CPU" not in explicit:
                bad(f"node type {name}: instance type {instance!r} is not in qlora/cluster_config.py's AWS_INSTANCE_TYPES "
                    "and its resources do not say how many CPUs (and GPUs) it has",
                    f"write them under available_node_types.{name}.resources (e.g. {{\"CPU\": 8, \"GPU\": 1, "
                    "\"accelerator_type:A10G\": 1}}), or add the instance type to AWS_INSTANCE_TYPES")
        default_max = 0 if name == head else max_workers
        node_types[name] = NodeType(name, {k: float(v) for k, v in resources.items()},
                                    int(spec.get("min_workers", 0)), int(spec.get("max_workers", default_max)),
                                    instance)
    return Cluster(str(raw.get("cluster_name", "default")), source, head, max_workers, node_types)


def _aws_resources(instance: str, worker: bool) -> dict[str, float]:
    cpus, gib, gpus, accelerator = AWS_INSTANCE_TYPES[instance]
    res: dict[str, float] = {"CPU": cpus}
    if worker:  # Ray autodetects `memory` for worker types only
        res["memory"] = int(gib * 1024 ** 3 * _MEMORY_SHARE)
    if gpus:
        res["GPU"] = gpus
        if accelerator:
            res[ACCELERATOR_PREFIX + accelerator] = 1
    return res
