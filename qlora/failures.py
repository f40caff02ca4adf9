"""What a failed Ray Train run attempt means: whether Ray Train restarts it and against which budget (FailurePolicy,
run by Ray Train's controller), and what a run that fails for good tells its user.

A worker's own error (a UserError or TrainingFailure: a NaN loss, bad data, out of GPU memory) would happen again
on a restart, so it ends the run at once and comes back as it is, naming the problem and the fix. A stop on a
preemption notice is charged to scaling.max_preemptions. A worker that died is charged to scaling.max_failures;
after the last restart the error says which one, how (out of memory, killed or crashed, its node lost or
preempted: Ray's worker exit information), what the run kept and what to set, instead of Ray's page of actor
details.
"""
from __future__ import annotations

import json
import re

from ray.exceptions import RayActorError
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2.api.exceptions import PreemptionError, WorkerGroupError
from ray.train.v2.api.preemption import PreemptionInfo

from qlora.config import JobConfig
from qlora.errors import TrainingFailure, UserError
from qlora.preemption import WorkerPreempted


def root(error: BaseException) -> BaseException:
    """The exception a worker raised, out of Ray's wrappers (UserExceptionWithTraceback, RayTaskError) and
    exception chains."""
    while True:
        inner = getattr(error, "_base_exc", None) or getattr(error, "cause", None) or error.__cause__
        if inner is None or inner is error:
            return error
        error = inner


def own_errors(error: BaseException) -> list[BaseException]:
    """The workers' own errors in a failed attempt (UserError, TrainingFailure), by rank."""
    failures = getattr(error, "worker_failures", None) or {}
    return [r for _, e in sorted(failures.items()) if isinstance(r := root(e), (UserError, TrainingFailure))]


def is_notice_stop(error: BaseException) -> bool:
    """Whether a failed run attempt ended because its workers stopped on a preemption notice."""
    stopped = getattr(error, "worker_failures", None) or {}
    return any(isinstance(root(e), WorkerPreempted) for e in stopped.values())


class FailurePolicy(DefaultFailurePolicy):
    """Ray Train's default policy, except: a stop on a notice is a preemption (scaling.max_preemptions), and a
    worker's own error ends the run without a restart (it would repeat)."""

    def make_decision(self, training_failed_error):
        if isinstance(training_failed_error, WorkerGroupError):
            if is_notice_stop(training_failed_error):
                ranks = sorted(training_failed_error.worker_failures)
                training_failed_error = PreemptionError(PreemptionInfo(None, {"notice": ranks}), drain_timed_out=False)
            elif own_errors(training_failed_error):
                return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


def actor_death(error: BaseException) -> RayActorError | None:
    """The worker actor's death behind a failure (Ray Train wraps it in a failed health check), or None."""
    error = getattr(error, "health_check_failure", None) or error
    return error if isinstance(error, RayActorError) else None


def how_it_died(death: RayActorError) -> tuple[str, str]:
    """(what happened to the worker, the fix that goes with it), from Ray's exit information."""
    text = death.error_msg
    if death.preempted:
        return "its node was preempted (drained)", "raise scaling.max_preemptions"
    if re.search(r"NODE_OUT_OF_MEMORY|OutOfMemory|out of memory|low on memory", text):
        return ("it was killed for using too much host memory (Ray's memory monitor)",
                "lower train.batch_size or data.max_length, or give the worker more memory")
    if re.search(r"node .*(dead|died|removed)|NodeDied", text, re.I):
        return "its node died or left the cluster", "check the node, or raise scaling.max_failures"
    if "Worker exit type: SYSTEM_ERROR" in text:
        return ("its process ended without an error of its own: killed by a signal or by the kernel's "
                "out-of-memory killer, or crashed (dmesg on its node tells which)", "raise scaling.max_failures")
    detail = re.search(r"Worker exit detail: ([^.]*)", text)
    return (f"it died ({detail.group(1) if detail else text.splitlines()[0]})", "raise scaling.max_failures")


def kept(snapshot_text: str | None, where: str) -> str:
    """What the run kept, from Ray Train's checkpoint snapshot (runtime.RAY_TRAIN_SNAPSHOT) of its folder."""
    try:
        latest = json.loads(snapshot_text)["latest_checkpoint_result"]
        return f"kept: the checkpoint at step {latest['metrics']['step']} ({where}/{latest['checkpoint_dir_name']})"
    except (TypeError, ValueError, KeyError):
        return "kept: no checkpoint yet (a run saves every train.save_every steps and on a preemption notice)"


def run_error(error: BaseException, what: str, cfg: JobConfig, snapshot_text: str | None, where: str) -> Exception:
    """The error a failed Ray Train run raises to its user. `snapshot_text`: the run's checkpoint snapshot (or
    None), `where`: its folder, for saying what was kept."""
    failures = getattr(error, "worker_failures", None) or {}
    roots = [root(e) for _, e in sorted(failures.items())]
    own = own_errors(error)
    if own:
        return own[0]
    resume = "run the same command again to resume from it"
    s = cfg.scaling
    if isinstance(error, PreemptionError):
        return TrainingFailure(f"{what} stopped: preempted more often than scaling.max_preemptions={s.max_preemptions} "
                               f"allows; {kept(snapshot_text, where)}; fix: {resume}, or raise scaling.max_preemptions")
    deaths = [(rank, d) for rank, e in sorted(failures.items()) if (d := actor_death(e)) is not None]
    if deaths:
        rank, death = deaths[0]
        happened, fix = how_it_died(death)
        pid, ip = re.search(r"pid: (\d+)", death.error_msg), re.search(r"ip: (\S+)", death.error_msg)
        at = f" (pid {pid.group(1)}{f' on {ip.group(1)}' if ip else ''})" if pid else ""
        restarts = "no restart" if s.max_failures == 0 else f"{s.max_failures} restart(s)"
        return TrainingFailure(f"{what} failed: worker rank {rank}{at} died: {happened}; scaling.max_failures="
                               f"{s.max_failures} allowed {restarts}; {kept(snapshot_text, where)}; fix: {resume}, "
                               f"or {fix}")
    cause = roots[0] if roots else root(error)
    return TrainingFailure(f"{what} failed: {type(cause).__name__}: {cause}; {kept(snapshot_text, where)}")
