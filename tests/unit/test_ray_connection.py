"""scaling.ray_address unset starts a local cluster of the job's own, as documented, even where `ray start` left its
address file on the machine (Ray's ray.init() would join that cluster: another user's or another job's)."""
import subprocess
import sys
import tempfile

from conftest import ROOT

JOB = """
import ray
from qlora import runtime
started = runtime.connect_ray(None)
print("started here:", started, "| nodes:", len(ray.nodes()), "| address:", ray.get_runtime_context().gcs_address)
ray.shutdown()
"""


def test_an_unset_address_starts_a_local_cluster_whatever_ray_start_left_behind():
    with tempfile.TemporaryDirectory(prefix="rt", dir="/tmp") as tmp:  # Ray's socket paths need a short folder
        # What `ray start` leaves for ray.init() to find: the address of the cluster it started (here one that is gone).
        subprocess.run(["mkdir", "-p", f"{tmp}/ray"], check=True)
        with open(f"{tmp}/ray/ray_current_cluster", "w") as f:
            f.write("127.0.0.1:9")
        env = {"RAY_TMPDIR": tmp, "PATH": "/usr/bin:/bin", "HOME": tmp, "RAY_USAGE_STATS_ENABLED": "0"}
        out = subprocess.run([sys.executable, "-c", JOB], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=90)  # Ray retries a dead address for minutes
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "started here: True | nodes: 1" in out.stdout and "127.0.0.1:9" not in out.stdout, out.stdout
