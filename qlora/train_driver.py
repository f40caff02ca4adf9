"""The Ray Train driver: one TorchTrainer run of scaling.num_workers workers (the training loop, or another
job's loop on the same resources), and the out-of-memory retries of train.auto_batch_size."""
from __future__ import annotations

import os
import signal
import sys

from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from qlora import console, failures, oom, preemption, resources, runtime, tracking
from qlora.config import JobConfig
from qlora.payload import WorkerPayload
from qlora.worker import train_loop_per_worker

# How often Ray Train's controller polls the workers, and so takes their reports: a worker's report queue holds
# one result, so each ray.train.report waits until the previous one is taken. At Ray's default of 2 s, reports
# from steps shorter than that blocked the training loop for the rest of the 2 s (measured on an H200: 1.2 s
# per report of 0.74 s steps); at 0.1 s a report costs milliseconds. Ray passes it on to controller and workers.
RAY_TRAIN_POLL_INTERVAL_S = "0.1"


class Trainer(TorchTrainer):
    """Ray's TorchTrainer with our failure policy (qlora.failures: a stop on a preemption notice is a preemption, a
    worker's own error is not retried) and our Ctrl+C."""

    def _initialize_and_run_controller(self, **kwargs):
        kwargs["failure_policy"] = failures.FailurePolicy(self.run_config.failure_config)
        return super()._initialize_and_run_controller(**kwargs)

    def _register_sigint_handler(self, controller):
        """Ctrl+C: Ray Train's graceful abort (its controller stops the workers), then KeyboardInterrupt in the
        driver, whose job closes its MLflow run as KILLED and names the resume. Ray's own handler exits the
        process from inside the handler (status 1, nothing printed); a second Ctrl+C interrupts at once."""
        import ray

        def on_sigint(signum, frame):
            signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                ray.get(controller.abort.remote(), timeout=60)
            except Exception:  # the controller has gone already: nothing left to abort
                pass
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)


class DriverOwnedTrainer(Trainer):
    """Our Trainer without Ray's placement-group cleaner, for runs the job's driver owns. The cleaner (a
    detached actor, Ray 2.60) polls the state API for the Train controller and reads an empty answer as a dead
    controller; on a loaded machine it then removed the placement group of a live run, whose workers died with
    "Destroying worker since its placement group was removed" (seen in this suite's e2e tests; ray-project/ray
    PR #65447 treats that answer as transient). A run started by the job's driver needs no cleaner: Ray removes
    its placement group with the driver. A sweep trial's run is owned by the trial's actor, not the driver, so
    sweeps keep Ray's trainer and its cleaner (ray-project/ray PR #58515 added it for that case)."""

    def _create_default_callbacks(self):
        return [c for c in super()._create_default_callbacks() if not isinstance(c, PlacementGroupCleanerCallback)]


def fit(cfg: JobConfig, payload: WorkerPayload, name: str, storage: str, callbacks=(), loop=train_loop_per_worker,
        what: str = "training", in_tune_trial: bool = False):
    """One Ray Train run of `scaling.num_workers` workers running `loop(payload)`; returns Ray's Result or raises
    TrainingFailure. `in_tune_trial`: started inside a Tune trial (see DriverOwnedTrainer)."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", RAY_TRAIN_POLL_INTERVAL_S)
    s = cfg.scaling
    trainer = (Trainer if in_tune_trial else DriverOwnedTrainer)(
        loop, train_loop_config=payload.to_dict(),
        scaling_config=ScalingConfig(**resources.scaling_kwargs(s)),  # the request `ray_jobs.plan` checks
        run_config=RunConfig(name=name, storage_path=storage,
                             callbacks=[*callbacks, preemption.NoticeOnSigterm()],
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=s.max_failures,
                                                          max_preemption_failures=s.max_preemptions),
                             logging_config=LoggingConfig(log_level=console.ray_train_log_level())),
    )
    try:
        return trainer.fit()
    except Exception as e:  # Ray wraps the worker's exception (TrainingFailed / WorkerGroupError)
        if not in_tune_trial:  # a trial's run is closed by the sweep driver, which knows whether ASHA stopped it
            runtime.finish_mlflow_run(payload.tracking_uri, payload.mlflow_run_id, "FAILED")
        raise failures.run_error(e, what, cfg, runtime.run_snapshot(storage, name), f"{storage}/{name}") from None


def fit_with_memory_retries(cfg: JobConfig, name: str, storage: str, uri: str | None, run_id: str | None,
                            data_cache: str):
    """fit(); with train.auto_batch_size, a GPU out-of-memory retries with half the micro-batch and twice
    the accumulation (same global batch) as a fresh run, until it fits or the micro-batch is 1."""
    base_name = name
    while True:
        payload = WorkerPayload(runtime.worker_config(cfg).to_json(), data_cache, uri, run_id, console.verbose(),
                                storage_root=storage)
        try:
            return fit(cfg, payload, name, storage)
        except oom.OutOfMemory as e:
            smaller = oom.halved(cfg) if cfg.train.auto_batch_size else None
            if smaller is None:
                raise
            print(f"[qlora] {e}\n[qlora] train.auto_batch_size: retrying with train.batch_size="
                  f"{smaller.train.batch_size}, train.gradient_accumulation={smaller.train.gradient_accumulation}",
                  file=sys.stderr, flush=True)
            if uri and run_id:
                tracking.client(uri).update_run(run_id, status="RUNNING")
                tracking.client(uri).set_tag(run_id, "auto_batch_size", str(smaller.train.batch_size))
            cfg, name = smaller, f"{base_name}-bs{smaller.train.batch_size}"  # a fresh Ray Train run folder
