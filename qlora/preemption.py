"""Preemption notices, on the workers and in Ray Train's failure policy.

A notice is a SIGTERM to a Ray Train worker process (what cloud providers and Kubernetes send before they
reclaim a machine) or Ray draining the worker's node (Ray Train's preemption information, from the autoscaler
or `ray drain-node`). At the next step boundary every rank learns of it (one all-reduce per step), the step's
checkpoint is written and registered with Ray Train, and the workers stop with WorkerPreempted. Ray Train then
restarts the worker group (on however many workers are left, with scaling.min_workers) and the run resumes at
exactly that step. Ray Train's failure policy (qlora.failures) charges such a stop to scaling.max_preemptions,
not scaling.max_failures.

Ray's own SIGTERM handler in a worker process exits at once (ray/_private/worker.py); NoticeOnSigterm replaces
it in each worker's main thread, where Ray Train runs after_init_train_context and signal handlers must be set.
"""
from __future__ import annotations

import signal
import threading
import time

from ray.train.v2._internal.execution.callback import WorkerCallback
from ray.train.v2._internal.execution.context import get_train_context

from qlora import console, distributed

NOTICE = threading.Event()  # set in a worker process by SIGTERM
_NOTICE_TIME = [0.0]  # when (time.time()) this process saw its notice first


class WorkerPreempted(Exception):
    """Raised by every rank after the checkpoint written on a notice, so that Ray Train restarts the group."""


class NoticeOnSigterm(WorkerCallback):
    """A worker's SIGTERM becomes a notice instead of an immediate exit."""

    def after_init_train_context(self):
        console.expect_notice_stops()
        NOTICE.clear()
        signal.signal(signal.SIGTERM, lambda signum, frame: _note())


def _note() -> None:
    if not NOTICE.is_set():
        _NOTICE_TIME[0] = time.time()
        NOTICE.set()


def _ray_notice() -> bool:
    """Whether Ray Train has marked this worker's group preempted (a node drain). Read from the worker's own
    context: the public ray.train.get_preemption_info() is a barrier through an actor, too slow for every step."""
    try:
        return get_train_context().preemption_context.preemption_info is not None
    except Exception:  # outside a Ray Train worker (benchmarks, tests in one process)
        return False


def wait_until_collected(timeout_s: float = 120.0) -> bool:
    """Block until Ray Train's controller has collected this worker's last report (its result queue drained), or
    timeout_s passed; whether it was collected. A report still queued when the worker stops is lost: the controller
    polls each rank at most once every 2 s, one report per poll, and restarts the group at the first error it
    sees, even where another rank's report of the same step is still queued (seen under load: the notice step's
    checkpoint dropped and the run resumed one step earlier)."""
    try:
        reports = get_train_context().execution_context.result_queue
    except Exception:  # outside a Ray Train worker (benchmarks, tests in one process)
        return True
    deadline = time.monotonic() + timeout_s
    while not reports.empty() and time.monotonic() < deadline:
        time.sleep(0.05)
    return reports.empty()


def noticed(ctx: distributed.Context) -> float | None:
    """When the earliest notice of any rank came (time.time(), comparable across nodes only as far as their clocks
    agree), or None. A collective: every rank calls it after the same step; only a notice costs a second one."""
    if _ray_notice():
        _note()
    if distributed.all_sum([1.0 if NOTICE.is_set() else 0.0], ctx)[0] == 0:
        return None
    return min(t for t in distributed.per_rank(_NOTICE_TIME[0] if NOTICE.is_set() else None, ctx) if t is not None)
