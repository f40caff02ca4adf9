"""The typed schema of a Ray Tune search space file (tune_spaces/*.yaml).

Each key of `params` is a dotted path into JobConfig (checked against the schema when loaded, so a
typo fails before any trial starts); each value is one distribution. `tied` states rules such as
"lora.alpha is 2 x lora.r".
"""
from __future__ import annotations

import difflib
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field, model_validator

from qlora.config import JobConfig, Section
from qlora.errors import ConfigError

KINDS = ("choice", "grid", "uniform", "loguniform", "randint", "qloguniform")


class Distribution(Section):
    """Exactly one of the fields is set, e.g. {loguniform: [1e-5, 5e-4]} or {choice: [8, 16]}."""
    choice: Optional[list[Any]] = Field(None, min_length=1, description="Sample one of these.")
    grid: Optional[list[Any]] = Field(None, min_length=1, description="Try every one of these (grid search).")
    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[float, float]] = None
    randint: Optional[tuple[int, int]] = Field(None, description="[low, high) integers.")
    qloguniform: Optional[tuple[float, float, float]] = Field(None, description="[low, high, q].")

    @model_validator(mode="after")
    def _exactly_one(self):
        set_kinds = [k for k in KINDS if getattr(self, k) is not None]
        if len(set_kinds) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)} (got {set_kinds or 'none'})")
        bounds = getattr(self, set_kinds[0])
        if set_kinds[0] in ("uniform", "loguniform", "randint", "qloguniform"):
            if not bounds[0] < bounds[1]:
                raise ValueError(f"{set_kinds[0]} needs low < high (got {list(bounds)})")
            if set_kinds[0] in ("loguniform", "qloguniform") and bounds[0] <= 0:
                raise ValueError(f"{set_kinds[0]} needs low > 0 (got {bounds[0]})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def args(self):
        return getattr(self, self.kind)

    def extremes(self) -> list:
        """Values that bound what this distribution can produce (validated against the config up front)."""
        a = self.args
        return list(a) if self.kind in ("choice", "grid") else [a[0], a[1] - 1 if self.kind == "randint" else a[1]]

    def to_tune(self):
        from ray import tune
        if self.kind in ("choice", "grid"):
            return (tune.choice if self.kind == "choice" else tune.grid_search)(list(self.args))
        return getattr(tune, self.kind)(*self.args)  # tune.uniform / loguniform / randint / qloguniform


class Tie(Section):
    """`target = multiply * source`, applied after sampling (e.g. lora.alpha = 2 x lora.r)."""
    source: str
    multiply: float = Field(1.0, gt=0)


class Scheduler(Section):
    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, gt=0, description="Reports every trial gets before it can be stopped.")
    reduction_factor: float = Field(2.0, gt=1)


class SearchSpace(Section):
    metric: str = Field("eval_loss", description="Reported metric to optimize.")
    mode: Literal["min", "max"] = "min"
    search: Literal["random", "grid", "optuna"] = "random"
    num_samples: int = Field(4, gt=0, description="Trials (per grid point for grid values).")
    max_concurrent_trials: Optional[int] = Field(None, gt=0, description="Unset: as many as the cluster fits.")
    time_budget_s: Optional[float] = Field(None, gt=0, description="Stop starting/continuing trials after this.")
    scheduler: Scheduler = Field(default_factory=Scheduler)
    params: dict[str, Distribution] = Field(..., min_length=1)
    tied: dict[str, Tie] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _search_fits_distributions(self):
        kinds = {d.kind for d in self.params.values()}
        if self.search == "optuna" and "grid" in kinds:
            raise ValueError("search=optuna cannot take grid values: use choice, or search=grid")
        if self.search == "grid" and kinds - {"grid"}:
            raise ValueError("search=grid needs every param as grid: [...]")
        return self

    def check_against(self, base: JobConfig) -> None:
        """Every path exists in JobConfig and every extreme value validates there. Raises ConfigError."""
        for path in [*self.params, *self.tied, *(t.source for t in self.tied.values())]:
            if not config_path_exists(path):
                hint = difflib.get_close_matches(path, config_paths(), n=1, cutoff=0.7)
                raise ConfigError(f"search space: '{path}' is not a config path"
                                  + (f" (did you mean '{hint[0]}'?)" if hint else ""),
                                  "use dotted JobConfig paths such as lora.r, train.learning_rate, data.fraction")
        for target, tie in self.tied.items():
            if target in self.params:
                raise ConfigError(f"search space: '{target}' is both sampled (params) and tied to '{tie.source}'",
                                  f"drop '{target}' from params or from tied")
            if tie.source not in self.params:
                raise ConfigError(f"search space: tied '{target}' follows '{tie.source}', which is not sampled, so "
                                  "the tie would never apply",
                                  f"add '{tie.source}' to params, or drop the tie of '{target}'")
        for path, dist in self.params.items():
            for value in dist.extremes():
                try:
                    apply_params(base, {path: value}, self.tied)
                except ConfigError as e:
                    raise ConfigError(f"search space: {path}={value!r} is not a valid value ({e.problem})",
                                      "narrow the distribution to values the config accepts") from None


def config_paths(model: type[BaseModel] = JobConfig, prefix: str = "") -> list[str]:
    """Every dotted leaf path of the config schema (for did-you-mean hints)."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += config_paths(ann, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def config_path_exists(path: str, model: type[BaseModel] = JobConfig) -> bool:
    for part in path.split("."):
        field = model.model_fields.get(part)
        if field is None:
            return False
        model = field.annotation
    return not (isinstance(model, type) and issubclass(model, BaseModel))


def with_tied(params: dict[str, Any], tied: dict[str, Tie]) -> dict[str, Any]:
    """Sampled values plus the values tied to them (e.g. lora.alpha = 2 x lora.r)."""
    return {**params, **{target: params[tie.source] * tie.multiply
                         for target, tie in tied.items() if tie.source in params}}


def apply_params(base: JobConfig, params: dict[str, Any], tied: dict[str, Tie]) -> JobConfig:
    """The trial's config: base + sampled values + tied values, validated like any config."""
    return base.with_changes(with_tied(params, tied))
