"""The Ray Train driver's trainer: Ray's default callbacks, less the placement-group cleaner (qlora/train_driver.py);
the preemption notice on a worker and the failure policy that charges it to the preemption budget."""
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from qlora import failures, preemption
from qlora.errors import TrainingFailure
from qlora.distributed import Context
from qlora.train_driver import DriverOwnedTrainer


def test_the_trainer_has_rays_default_callbacks_but_the_placement_group_cleaner():
    def kinds(cls):
        trainer = cls(lambda config: None, scaling_config=ScalingConfig(num_workers=1))
        return [type(c) for c in trainer._create_default_callbacks()]

    ray_default, ours = kinds(TorchTrainer), kinds(DriverOwnedTrainer)
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


def test_sigterm_to_a_worker_process_is_a_notice_not_an_exit():
    import os
    import signal

    import torch
    previous = signal.getsignal(signal.SIGTERM)
    try:
        preemption.NoticeOnSigterm().after_init_train_context()  # what Ray Train runs in each worker's main thread
        ctx = Context(0, 1, torch.device("cpu"))
        assert preemption.noticed(ctx) is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.noticed(ctx) is not None  # this process is still here, and the loop sees the notice
    finally:
        signal.signal(signal.SIGTERM, previous)
        preemption.NOTICE.clear()


def test_a_stop_on_a_notice_is_charged_to_the_preemption_budget_and_a_crash_to_the_failure_budget():
    from ray.train import FailureConfig
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    def stopped(error):  # as Ray Train's controller gets a worker's exception
        return WorkerGroupError("rank 1", {1: UserExceptionWithTraceback(error, "Traceback ...")})

    policy = failures.FailurePolicy(FailureConfig(max_failures=0, max_preemption_failures=2))
    notice = preemption.WorkerPreempted("stopped at step 5 on a preemption notice")
    assert [policy.make_decision(stopped(notice)) for _ in range(3)] == [
        FailureDecision.RETRY, FailureDecision.RETRY, FailureDecision.RAISE]
    crash = failures.FailurePolicy(FailureConfig(max_failures=1, max_preemption_failures=-1))
    assert [crash.make_decision(stopped(RuntimeError("boom"))) for _ in range(2)] == [
        FailureDecision.RETRY, FailureDecision.RAISE]
    nan = failures.FailurePolicy(FailureConfig(max_failures=3))  # the worker's own error would only repeat
    assert nan.make_decision(stopped(TrainingFailure("loss became nan at step 3"))) == FailureDecision.RAISE


def test_a_dead_worker_is_named_with_how_it_died_what_was_kept_and_what_to_set():
    """Ray's exit information of a worker, read into one line (no page of actor details)."""
    import json

    from ray.exceptions import RayActorError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
    from ray.train.v2.api.exceptions import WorkerGroupError

    from qlora.config import load_config
    killed = RayActorError(error_msg="The actor died unexpectedly before finishing this task.\n\tpid: 4242\n\tip: "
                           "10.0.0.7\nThe actor is dead because its worker process has died. Worker exit type: "
                           "SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error code 2.")
    error = WorkerGroupError("rank 1", {1: WorkerHealthCheckFailedError("A worker health check failed.", killed)})
    snapshot = json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_x", "metrics": {"step": 8}}})
    cfg = load_config(None, ["data.path=x.jsonl", "scaling.max_failures=2"])
    message = str(failures.run_error(error, "training", cfg, snapshot, "/runs/r"))
    assert message.startswith("training failed: worker rank 1 (pid 4242 on 10.0.0.7) died: its process ended without "
                              "an error of its own")
    assert "scaling.max_failures=2 allowed 2 restart(s); kept: the checkpoint at step 8 (/runs/r/checkpoint_x)" in message
    assert "fix: run the same command again to resume from it, or raise scaling.max_failures" in message
    oom = RayActorError(error_msg="Worker exit type: NODE_OUT_OF_MEMORY Worker exit detail: Task was killed due to the "
                        "node running low on memory.")
    assert "too much host memory" in failures.how_it_died(oom)[0] and "train.batch_size" in failures.how_it_died(oom)[1]
    assert failures.kept(None, "/runs/r").startswith("kept: no checkpoint yet")
