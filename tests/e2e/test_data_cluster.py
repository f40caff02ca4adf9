"""On a Ray cluster of two nodes (two raylets on this machine, one CPU each), the Ray Data preparation runs on
the CPUs of both, and gives the examples the in-memory path gives."""
import pytest

from qlora.config import DataSection
from qlora.data import pipeline, prepare_in_memory

from conftest import ROOT


@pytest.fixture
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster
    ray.shutdown()  # the test process's shared cluster (conftest.ray_cluster), if it runs, steps aside
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_ray_data_preparation_uses_the_cpus_of_both_nodes(two_nodes, smollm_tokenizer, tmp_path):
    cfg = DataSection(path=str(ROOT / "data" / "people_json.jsonl"), format="alpaca", max_length=128,
                      pipeline="ray_data")
    data = pipeline.prepare(pipeline.plan(cfg, smollm_tokenizer, str(tmp_path)))
    assert data.work["executor"] == "ray_data" and data.work["nodes"] == 2, data.work
    reference = prepare_in_memory(cfg, smollm_tokenizer)
    assert [e["input_ids"] for e in data.train] == [e["input_ids"] for e in reference.train]
