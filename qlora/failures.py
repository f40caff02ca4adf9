"""What a failed Ray Train run tells its user. A worker's own error comes back as it is (a UserError or
TrainingFailure names the problem and the fix). A worker that died says which one, how (out of memory, killed or
crashed, its node lost or preempted: read from Ray's worker exit information), what the run kept, and what to set,
instead of Ray's page of actor details.
"""
from __future__ import annotations

import json
import re

from ray.exceptions import RayActorError
from ray.train.v2.api.exceptions import PreemptionError

from qlora.config import JobConfig
from qlora.errors import TrainingFailure, UserError


def root(error: BaseException) -> BaseException:
    """The exception a worker raised, out of Ray's wrappers (UserExceptionWithTraceback, RayTaskError) and
    exception chains."""
    while True:
        inner = getattr(error, "_base_exc", None) or getattr(error, "cause", None) or error.__cause__
        if inner is None or inner is error:
            return error
        error = inner


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
    own = [r for r in roots if isinstance(r, (UserError, TrainingFailure))]
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
