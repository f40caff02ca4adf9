"""The Ray Train driver's trainer: Ray's default callbacks, less the placement-group cleaner (qlora/train_driver.py)."""
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from qlora.train_driver import Trainer


def test_the_trainer_has_rays_default_callbacks_but_the_placement_group_cleaner():
    def kinds(cls):
        trainer = cls(lambda config: None, scaling_config=ScalingConfig(num_workers=1))
        return [type(c) for c in trainer._create_default_callbacks()]

    ray_default, ours = kinds(TorchTrainer), kinds(Trainer)
    assert PlacementGroupCleanerCallback in ray_default  # what the subclass exists to drop is still there upstream
    assert ours == [k for k in ray_default if k is not PlacementGroupCleanerCallback]


def test_the_worker_payload_crosses_as_a_dict_and_refuses_unknown_or_missing_keys():
    import pytest

    from qlora.payload import WorkerPayload
    sent = WorkerPayload('{"data": {"path": "x.jsonl"}}', "/runs/data_cache/k", "sqlite:///m.db", "run1", True)
    assert WorkerPayload.from_dict(sent.to_dict()) == sent
    with pytest.raises(TypeError, match="cfg"):  # the spelling the evaluate driver once used
        WorkerPayload.from_dict({"cfg": "{}", "data_cache": "/c"})
    with pytest.raises(TypeError, match="expected"):
        WorkerPayload.from_dict({"config": "{}"})
