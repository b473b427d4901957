"""Settings of the train stage: the Tune experiment and the search space, validated before anything runs.

A search space is written in YAML as `hyperparameter: {kind: arguments}`:

    learning_rate: {loguniform: [3.0e-4, 3.0e-3]}   # low, high
    dropout: {uniform: [0.2, 0.5]}                  # low, high
    dense_units: {randint: [256, 2048]}             # low (inclusive), high (exclusive)
    batch_size: {choice: [64, 128, 256]}            # sampled at random
    optimizer: {grid: [adam, adamw]}                # every value, times num_samples

Every name must be a field of `Hyperparameters`, and every value one that field accepts.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stages.hyperparameters import Hyperparameters, Real
from stages.redact import redact

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
MAX_VALUES = 1000  # of a choice or grid: more is a typo or generated, and a grid multiplies the trials
MAX_TRIALS = 10000  # num_samples times the size of every grid: Tune creates every trial up front


class Distribution(BaseModel):
    """One entry of the search space: a kind of distribution and its arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["choice", "grid", "uniform", "loguniform", "randint"]
    args: tuple[Any, ...]

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, value: Any) -> Any:
        if isinstance(value, dict) and len(value) == 1 and "kind" not in value:
            ((kind, args),) = value.items()
            if kind not in DISTRIBUTIONS:
                raise ValueError(f"unknown distribution {clip(kind)} (use one of {', '.join(DISTRIBUTIONS)})")
            if not isinstance(args, list):
                raise ValueError(f"{kind} takes a list, got {clip(args)}")
            return {"kind": kind, "args": tuple(args)}
        if isinstance(value, dict) and "kind" in value:
            return value
        raise ValueError(f"expected one mapping like {{choice: [...]}} or {{uniform: [low, high]}}, got {clip(value)}")

    @model_validator(mode="after")
    def _check_arguments(self) -> "Distribution":
        if self.kind in ("choice", "grid"):
            if not self.args:
                raise ValueError(f"{self.kind} needs at least one value")
            if len(self.args) > MAX_VALUES:
                raise ValueError(f"{self.kind} takes at most {MAX_VALUES} values, got {len(self.args)}")
            return self
        if len(self.args) != 2:
            raise ValueError(f"{self.kind} takes [low, high], got {clip(list(self.args))}")
        low, high = self.args
        if self.kind == "randint":
            if not all(type(bound) is int for bound in self.args):
                raise ValueError(f"randint bounds must be integers, got {clip(list(self.args))}")
        elif not all(type(bound) in (int, float) and math.isfinite(bound) for bound in self.args):
            raise ValueError(f"{self.kind} bounds must be finite numbers, got {clip(list(self.args))}")
        if not low < high:
            raise ValueError(f"{self.kind} needs low < high, got [{clip(low)}, {clip(high)}]")
        if self.kind == "loguniform" and low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {clip(low)}")
        return self

    def extremes(self) -> tuple[Any, ...]:
        """The values that stand for the whole distribution when checking it against a hyperparameter's range."""
        if self.kind == "randint":
            return (self.args[0], self.args[1] - 1)
        if self.kind in ("uniform", "loguniform"):
            return tuple(float(bound) for bound in self.args)  # samples are floats, even between integer bounds
        return self.args

    def to_tune(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        return getattr(tune, self.kind)(*self.args)


class TrainSettings(BaseModel):
    """The `train` section of the config."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    epochs: int = Field(10, ge=1, le=1000, description="epochs per trial at most (ASHA may stop a trial earlier)")
    num_samples: int = Field(8, ge=1, le=10000, description="trials to sample (times the size of any grid)")
    max_concurrent_trials: int | None = Field(
        None, ge=1, le=MAX_TRIALS, description="trials running at once; null: as many as the cluster's CPUs/GPUs allow"
    )
    cpus_per_trial: Real = Field(1.0, gt=0, le=1024, description="CPUs reserved by each trial; TF uses that many")
    gpus_per_trial: Real = Field(0.0, ge=0, le=64, description="GPUs per trial; fractions share a GPU")
    mixed_precision: bool = Field(False, description="train in float16 with float32 master weights (GPUs only)")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha stops weak trials early; fifo runs all")
    grace_period: int = Field(2, ge=1, le=1000, description="asha: epochs every trial gets before it may be stopped")
    # ASHA makes log(epochs / grace_period) / log(reduction_factor) rungs: a factor near 1 makes billions
    reduction_factor: Real = Field(
        2.0, ge=1.1, le=100, description="asha: 1/reduction_factor of trials go on at each rung"
    )
    # each kept checkpoint is a copy of the model in the run folder, per trial
    checkpoints_to_keep: int = Field(2, ge=1, le=100, description="best checkpoints kept per trial (plus the latest)")
    max_failures: int = Field(
        2, ge=-1, le=100, description="retries of a crashed trial from its last checkpoint; -1: forever"
    )
    include_base_trial: bool = Field(
        True, description="run the `model` section's values as they are as the first trial (one of num_samples)"
    )
    search_space: dict[str, Distribution] = Field(
        default_factory=lambda: {
            "learning_rate": Distribution(kind="loguniform", args=(3.0e-4, 3.0e-3)),
            "dropout": Distribution(kind="uniform", args=(0.2, 0.5)),
            "batch_size": Distribution(kind="choice", args=(64, 128, 256)),
            "lr_schedule": Distribution(kind="choice", args=("constant", "cosine")),
        },
        description="hyperparameter: {distribution: arguments}; see stages/train_settings.py",
    )

    @field_validator("search_space", mode="before")
    @classmethod
    def _drop_nulls(cls, value: Any) -> Any:
        """`--set train.search_space.dropout=null` removes an entry."""
        if isinstance(value, dict):
            return {name: spec for name, spec in value.items() if spec is not None}
        return value

    @field_validator("search_space")
    @classmethod
    def _check_against_hyperparameters(cls, space: dict[str, Distribution]) -> dict[str, Distribution]:
        fields = Hyperparameters.model_fields
        for name, distribution in space.items():
            if name not in fields:
                raise ValueError(f"{clip(name)} is not a hyperparameter{did_you_mean(name, fields)}")
            for value in distribution.extremes():
                try:
                    Hyperparameters.model_validate({name: value})
                except ValidationError as error:
                    hint = ""
                    if distribution.kind in ("uniform", "loguniform") and fields[name].annotation is int:
                        hint = " (use randint or choice for an integer hyperparameter)"
                    problem = error.errors()[0]["msg"]
                    raise ValueError(f"{name}: {clip(value)} is not allowed: {problem}{hint}") from None
        return space

    @model_validator(mode="after")
    def _trials_are_bounded(self) -> "TrainSettings":
        grids = [len(spec.args) for spec in self.search_space.values() if spec.kind == "grid"]
        trials = self.num_samples * math.prod(grids)
        if trials > MAX_TRIALS:
            sizes = "".join(f" x {size}" for size in grids)
            raise ValueError(
                f"num_samples: {self.num_samples}{sizes} (grid sizes) makes {trials} trials; at most {MAX_TRIALS}"
            )
        return self

    def param_space(self, base: Hyperparameters) -> dict:
        """Tune's param_space: the base hyperparameters with the searched ones replaced by distributions."""
        return {**base.model_dump(), **{name: spec.to_tune() for name, spec in self.search_space.items()}}


def did_you_mean(name: str, candidates) -> str:
    """A " (did you mean 'x'?)" suffix for error messages; lists the candidates when none is close."""
    import difflib

    # a name far longer than every candidate is close to none; difflib would only spend time on it
    plausible = isinstance(name, str) and len(name) <= 2 * max(map(len, candidates), default=0)
    close = difflib.get_close_matches(name, list(candidates), n=1) if plausible else []
    return f" (did you mean '{close[0]}'?)" if close else f" (one of: {', '.join(candidates)})"


class _ShortRepr(reprlib.Repr):
    """reprlib's repr with small limits at every level; a long string keeps its head, for `clip` to cut."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist, self.maxtuple, self.maxset = 3, 4, 6, 6, 6
        self.maxstring = self.maxother = width

    def repr_str(self, value: str, level: int) -> str:
        if "://" in value:  # redact before cutting: a cut URI might no longer look like one
            value = redact(value)
        return repr(value[: self.maxstring])

    def repr_int(self, value: int, level: int) -> str:
        # repr of an int of more than 4300 digits raises: say what it is instead
        return repr(value) if value.bit_length() <= 128 else f"<a {value.bit_length()}-bit integer>"


CLIP = 60  # characters of a bad value an error message quotes
_SHORT_REPR = _ShortRepr(CLIP)


def clip(value: Any, limit: int = CLIP) -> str:
    """`repr(value)` in at most `limit` characters, ending in '…' when cut: a bad value may be a megabyte long."""
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
