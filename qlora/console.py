"""What a user sees while a job runs: our own progress lines, with the libraries' noise silenced at its source
(their logging levels and progress-bar switches), never their warnings that matter or any error.

Silenced: transformers' and MLflow's progress bars, bitsandbytes' notice that an optional CPU kernel package is
absent, FutureWarnings from transformers and peft about their own internal calls, MLflow's database-migration
INFO lines, and Ray Train's INFO lines (worker-group start, "Reporting training result" echoes, checkpoint paths;
still in Ray Train's log files). `--verbose` on any entry point (QLORA_VERBOSE=1) keeps everything.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "QLORA_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def ray_train_log_level() -> str:
    """Ray Train's console level (RunConfig's LoggingConfig): its INFO lines only with --verbose."""
    return "INFO" if verbose() else "WARNING"


def quiet_libraries() -> None:
    """Silence the libraries' noise in this process (the driver, and every Ray worker at its start). Call before
    they are imported: bitsandbytes logs its notice while it is imported."""
    if verbose():
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # bitsandbytes' CPU backend asks for the optional `kernels` package (a faster CPU matmul) at import.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    # Ray Train's INFO lines in this process (a worker's "Reporting training result N: TrainingReport(...)" echo
    # of every metric dict; RunConfig's LoggingConfig quiets the controller's).
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    _quiet_ray_train_reports()
    logging.getLogger("alembic").setLevel(logging.WARNING)
    for module in ("transformers", "peft"):  # deprecations of their own internal calls: nothing for a user to do
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    if "transformers" in sys.modules or _importable("transformers"):
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # "Loading weights" bars of every worker


def _quiet_ray_train_reports() -> None:
    """Ray Train 2.60 logs each report at INFO through a logger named after its source file's path (not under
    `ray.train`), so the level of `ray.train` does not reach it."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train version
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class _NewHeadReport(logging.Filter):
    """Drops transformers' load report when a classifier's head is all it lists as newly initialized: the head
    is new by design (the adapter carries the trained one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("newly initialized" in message and "score" in message and "UNEXPECTED" not in message)


def expect_new_classifier_head() -> None:
    """Quiet transformers' "score.weight | MISSING ... newly initialized" report for sequence classifiers."""
    logger = logging.getLogger("transformers.modeling_utils")
    if not verbose() and not any(isinstance(f, _NewHeadReport) for f in logger.filters):
        logger.addFilter(_NewHeadReport())


class _NoticeStopTraceback(logging.Filter):
    """Drops Ray Train's "Error in training function" traceback of a worker stopping on a preemption notice (a
    planned stop, announced by our own line; the run resumes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "WorkerPreempted" not in record.getMessage()


def expect_notice_stops() -> None:
    """Quiet the traceback Ray Train logs when a worker stops on a preemption notice (qlora.preemption)."""
    logger = logging.getLogger("ray.train.v2._internal.util")
    if not verbose() and not any(isinstance(f, _NoticeStopTraceback) for f in logger.filters):
        logger.addFilter(_NoticeStopTraceback())


def _importable(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def duration(seconds: float) -> str:
    """1m05s, 2h03m, 42s."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_line(step: int, total: int, elapsed: float, steps_done: int, metrics: dict) -> str:
    """`step 8/16 (50%) loss 0.0533 lr 6.1e-04 tokens/s 130 peak 2.60 GiB  ETA 1m05s`: `elapsed` seconds
    for the `steps_done` steps this process has trained (its own pace: a resumed run's ETA is right too)."""
    eta = elapsed / max(steps_done, 1) * (total - step)
    parts = [f"step {step}/{total} ({step / total:.0%})", f"loss {metrics['loss']:.4g}",
             f"lr {metrics['learning_rate']:.2g}", f"tokens/s {metrics['tokens_per_second']:,.0f}",
             f"peak {metrics['peak_memory_gib']:.2f} GiB"]
    if "eval_loss" in metrics:
        parts.append(f"eval_loss {metrics['eval_loss']:.4g}")
    return "  ".join(parts) + (f"  ETA {duration(eta)}" if step < total else f"  done in {duration(elapsed)}")
