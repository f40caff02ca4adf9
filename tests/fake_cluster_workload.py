"""Driver run by tests/e2e/test_cluster.py against a local fake multi-node autoscaling cluster.

    python tests/fake_cluster_workload.py SPEC_JSON OUT_JSON

Imports first (slow on 2 cores), then waits for the cluster (SPEC["ready_file"]), connects, and runs one
real Ray Train job whose ScalingConfig comes from the project config (qlora.resources.scaling_kwargs), with a
custom resource standing in for GPUs. A thread samples the live nodes every 0.3 s from before the job until
every worker node is gone again (or SPEC["deadline_s"]). Writes the samples, the job's reports and the
timestamps to OUT_JSON.
"""
import json
import os
import sys
import threading
import time


def main(spec_path: str, out_path: str) -> None:
    t0 = time.time()
    spec = json.loads(open(spec_path).read())
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from qlora.config import JobConfig
    from qlora.resources import scaling_kwargs

    cfg = JobConfig.from_json(spec["config"])
    while not os.path.exists(spec["ready_file"]):
        time.sleep(0.1)
    ray.init(address=spec["address"], logging_level="ERROR", log_to_driver=False)
    types = spec["node_types"]  # name -> resources, to tell nodes apart by what they offer

    def node_type(resources: dict) -> str:
        offered = {k: v for k, v in resources.items() if k in ("CPU", "fake_gpu", "spot")
                   or k.startswith("accelerator_type:")}
        for name, res in types.items():
            if {k: v for k, v in res.items() if v} == {k: v for k, v in offered.items() if v}:
                return name
        return "?" + json.dumps(offered, sort_keys=True)

    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            alive = [n for n in ray.nodes() if n["Alive"]]
            samples.append([round(time.time() - t0, 1),
                            sorted([node_type(n["Resources"]), n["NodeID"]] for n in alive)])
            stop.wait(0.3)

    threading.Thread(target=sample, daemon=True).start()
    time.sleep(0.5)  # a few samples of the idle cluster first

    def loop(config):
        import json
        import os

        import ray
        import ray.train
        import torch
        import torch.distributed as dist
        rank = ray.train.get_context().get_world_rank()
        total = torch.tensor([float(rank + 1)])
        dist.all_reduce(total)  # the DDP process group (gloo) spans both worker nodes
        with open(os.path.join(config["marks"], f"rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "node": ray.get_runtime_context().get_node_id(), "allreduce": total.item()}, f)
        ray.train.report({"rank": rank, "allreduce": total.item()})

    marks = os.path.join(spec["storage"], "marks")
    os.makedirs(marks, exist_ok=True)
    out = {"connected_s": round(time.time() - t0, 1), "scaling_kwargs": scaling_kwargs(cfg.scaling)}
    out["fit_start_s"] = round(time.time() - t0, 1)
    result = TorchTrainer(loop, train_loop_config={"marks": marks},
                          scaling_config=ScalingConfig(**scaling_kwargs(cfg.scaling)),
                          run_config=RunConfig(name="fake-cluster-run", storage_path=spec["storage"])).fit()
    out["fit_end_s"] = round(time.time() - t0, 1)
    out["metrics"] = result.metrics
    out["error"] = repr(result.error) if result.error else None
    out["workers"] = [json.load(open(os.path.join(marks, f))) for f in sorted(os.listdir(marks))]
    while time.time() - t0 < spec["deadline_s"]:
        if samples and len(samples[-1][1]) == 1 and any(len(s[1]) > 1 for s in samples):
            break
        time.sleep(0.3)
    stop.set()
    out["end_s"] = round(time.time() - t0, 1)
    out["samples"] = samples
    with open(out_path, "w") as f:
        json.dump(out, f)
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
