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
