"""Errors a user can fix. Each names the problem and the fix; entry points turn them into exit code 2."""


class UserError(Exception):
    """Bad input (config, data, environment) found before any training step. Exit code 2."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem}" + (f"\n  fix: {fix}" if fix else ""))


class ConfigError(UserError):
    """A config key, type, value or combination is wrong."""


class DataError(UserError):
    """A dataset file is missing, empty, malformed or lacks the columns its format needs."""


class EnvironmentProblem(UserError):
    """The machine or a service cannot do what the config asks (no GPU, MLflow/Ray unreachable)."""


class TrainingFailure(Exception):
    """Training started and then failed (NaN loss, worker crash). Exit code 1."""


class Interrupted(Exception):
    """The job's driver was stopped (Ctrl+C, or SIGTERM) after it started. Exit code 130; the message says what was
    kept and how to resume."""

    def __init__(self, what: str, resume: str):
        super().__init__(f"{what}\n  resume: {resume}")


def stop_signal(e: BaseException) -> bool:
    """Whether `e` is how a stop reaches the driver's main thread: KeyboardInterrupt (Ctrl+C), or the SystemExit
    that Ray's SIGTERM handler in a driver raises (sys.exit(SIGTERM))."""
    return isinstance(e, KeyboardInterrupt) or (isinstance(e, SystemExit) and e.code == 15)
