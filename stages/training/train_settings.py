"""Settings of the train stage: the Tune experiment and the search space, validated before anything runs.

A search space is written in YAML as `hyperparameter: {kind: arguments}`:

    learning_rate: {loguniform: [3.0e-4, 3.0e-3]}   # low, high
    dropout: {uniform: [0.2, 0.5]}                  # low, high
    dense_units: {randint: [256, 2048]}             # low (inclusive), high (exclusive)
    batch_size: {choice: [64, 128, 256]}            # sampled at random
    optimizer: {grid: [adam, adamw]}                # every value, times num_samples

Every name must be a field of `Hyperparameters`, and every value one that field accepts. Only the `random` searcher
takes `grid` entries; the model-based ones (optuna, hyperopt, bohb) sample every entry from their own model.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stages.common.redact import redact
from stages.training.hyperparameters import Hyperparameters, Real
from stages.training.precision import MIXED_PRECISION_CHOICES, MixedPrecision

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
MAX_VALUES = 1000  # of a choice or grid: more is a typo or generated, and a grid multiplies the trials
MAX_TRIALS = 10000  # num_samples times the size of every grid: Tune creates every trial up front
MAX_BUDGET_S = 30 * 86400  # a time budget is for a search someone waits for: more is a typo (minutes for seconds)
RUNGS_KEY = "rungs"  # stages.training.trial's: a trial's rungs in its config (halving)
MODEL_BASED = ("optuna", "hyperopt", "bohb")  # searchers that suggest each trial from the results before it
SEARCHER_NAMES = {"optuna": "Optuna's TPE", "hyperopt": "HyperOpt's TPE", "bohb": "BOHB"}


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

    def is_mutable(self) -> bool:
        """Whether the distribution holds more than one value (what PBT can move a trial between)."""
        if self.kind in ("choice", "grid"):
            return len(self.args) > 1
        if self.kind == "randint":
            return self.args[1] - self.args[0] > 1
        return True

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


# The space that matters for the classic CNN's family (same layers; the classic network is the base trial): batch
# norm, regularization (dropout, decoupled weight decay, label smoothing, augmentation), the optimizer and its
# schedule, the batch size and the three widths.
DEFAULT_SEARCH_SPACE = {
    "batch_norm": Distribution(kind="choice", args=(True, False)),
    "dropout": Distribution(kind="uniform", args=(0.1, 0.5)),
    "optimizer": Distribution(kind="choice", args=("adam", "adamw")),
    "weight_decay": Distribution(kind="loguniform", args=(1.0e-4, 5.0e-2)),
    "learning_rate": Distribution(kind="loguniform", args=(5.0e-4, 5.0e-3)),
    "lr_schedule": Distribution(kind="choice", args=("one_cycle", "warmup_cosine", "constant")),
    "label_smoothing": Distribution(kind="uniform", args=(0.0, 0.15)),
    "augment_shift": Distribution(kind="uniform", args=(0.0, 0.15)),
    "augment_rotation": Distribution(kind="uniform", args=(0.0, 15.0)),
    "augment_zoom": Distribution(kind="uniform", args=(0.0, 0.15)),
    "batch_size": Distribution(kind="choice", args=(64, 128, 256)),
    "conv1_filters": Distribution(kind="choice", args=(16, 32, 48)),
    "conv2_filters": Distribution(kind="choice", args=(32, 64, 96)),
    "dense_units": Distribution(kind="choice", args=(512, 1024, 1536)),
}


class TrainSettings(BaseModel):
    """The `train` section of the config."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    epochs: int = Field(
        20, ge=1, le=1000,
        description="epochs per trial at most (halving, asha, hyperband and bohb stop most trials earlier)",
    )
    num_samples: int = Field(
        16, ge=1, le=10000, description="trials to sample (times the size of any grid); halving: its first rung"
    )
    max_concurrent_trials: int | None = Field(
        None, ge=1, le=MAX_TRIALS, description="trials running at once; null: as many as the cluster's CPUs/GPUs allow"
    )
    cpus_per_trial: Real = Field(1.0, gt=0, le=1024, description="CPUs reserved by each trial; TF uses that many")
    gpus_per_trial: Real = Field(0.0, ge=0, le=64, description="GPUs per trial; fractions share a GPU")
    mixed_precision: MixedPrecision = Field(
        True,
        description="16-bit compute with float32 weights. true: where the trial's hardware computes 16 bits natively "
        "(float16 on GPUs with tensor cores, bfloat16 on CPUs with AVX512-BF16 or AMX), float32 elsewhere; "
        "float16, bfloat16: that type wherever the trial runs; false: float32",
    )
    searcher: Literal["random", "optuna", "hyperopt", "bohb"] = Field(
        "random",
        description="random: Tune's random sampling, grid entries expanded; optuna, hyperopt: TPE, each trial "
        "suggested from the results before it; bohb: BOHB (with scheduler bohb)",
    )
    scheduler: Literal["halving", "asha", "fifo", "hyperband", "bohb", "pbt"] = Field(
        "halving",
        description="halving: synchronous successive halving over epochs, its last rung planned within "
        "time_budget_s (stages/training/halving.py); asha: stop weak trials early; fifo: run all; hyperband: "
        "HyperBand's brackets; bohb: HyperBand for searcher bohb; pbt: population based training",
    )
    grace_period: int = Field(
        2, ge=1, le=1000, description="halving, asha: epochs every trial gets before it may be stopped"
    )
    # ASHA makes log(epochs / grace_period) / log(reduction_factor) rungs: a factor near 1 makes billions
    reduction_factor: Real = Field(
        2.0, ge=1.1, le=100,
        description="halving, asha, hyperband, bohb: 1/reduction_factor of trials go on at each rung",
    )
    finalists: int = Field(
        4, ge=1, le=MAX_TRIALS,
        description="halving: trials that train the last rung, the longest (the ensemble's members come from them)",
    )
    pbt_interval: int = Field(
        2, ge=1, le=1000,
        description="pbt: epochs between perturbations (the weakest trials continue from a copy of a strong one's "
        "checkpoint, its hyperparameters perturbed)",
    )
    target_val_accuracy: Real | None = Field(
        None, gt=0, le=1, description="end the whole search once any trial reaches this val_accuracy; null: no target"
    )
    time_budget_s: Real | None = Field(
        1800.0, gt=0, le=MAX_BUDGET_S,
        description="end the whole search this many seconds after it started (in this attempt); halving plans its "
        "last rung to end 5 % before it (room for the evaluation); null: no budget",
    )
    # each kept checkpoint is a copy of the model in the run folder, per trial
    # while it runs; what a finished search keeps is slim_checkpoints' business
    checkpoints_to_keep: int = Field(1, ge=1, le=100, description="best checkpoints kept per trial (plus the latest)")
    slim_checkpoints: bool = Field(
        True,
        description="once the search has finished, keep only each trial's best checkpoint, without optimizer state "
        "(a third of the size); false: keep what Tune kept",
    )
    reuse_actors: bool = Field(
        True,
        description="a trial that ends hands its process, TensorFlow loaded, to the next trial (Tune's "
        "reuse_actors); false: every trial starts a fresh process",
    )
    max_failures: int = Field(
        2, ge=-1, le=100, description="retries of a crashed trial from its last checkpoint; -1: forever"
    )
    warm_start: list[str] = Field(
        default_factory=list, max_length=100,
        description="earlier runs (ids under run.root, folders or URIs) whose trials seed this search: the random "
        "searcher tries their best settings first, optuna starts its model from all their results",
    )
    trial_seed: int | None = Field(
        None, ge=0, lt=2**31,
        description="every trial's seed (initial weights, data order, dropout and augmentation); null: each trial's "
        "own, derived from run.seed and its index. export-config sets it to retrain one trial exactly",
    )
    lr_cycle_ends: list[int] = Field(
        default_factory=list, max_length=1000,
        description="epochs at which the learning-rate schedule's cycles end, the last ending the schedule (what "
        "halving's rungs give a promoted trial); empty: one cycle over epochs. export-config sets them",
    )
    include_base_trial: bool = Field(
        True, description="run the `model` section's values as they are as the first trial (one of num_samples)"
    )
    search_space: dict[str, Distribution] = Field(
        default_factory=lambda: dict(DEFAULT_SEARCH_SPACE),
        description="hyperparameter: {distribution: arguments}; see stages/training/train_settings.py",
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _one_of_the_precisions(cls, value: Any) -> Any:
        """One line naming the choices, instead of one error per member of the union."""
        if value not in MIXED_PRECISION_CHOICES or type(value) not in (bool, str):
            raise ValueError(f"use true, false, float16 or bfloat16, got {clip(value)}")
        return value

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

    @property
    def trial_count(self) -> int:
        """How many trials the search runs: num_samples times the size of every grid."""
        grids = [len(spec.args) for spec in self.search_space.values() if spec.kind == "grid"]
        return self.num_samples * math.prod(grids)

    @model_validator(mode="after")
    def _trials_are_bounded(self) -> "TrainSettings":
        if self.trial_count > MAX_TRIALS:
            sizes = "".join(f" x {len(spec.args)}" for spec in self.search_space.values() if spec.kind == "grid")
            raise ValueError(
                f"num_samples: {self.num_samples}{sizes} (grid sizes) makes {self.trial_count} trials; "
                f"at most {MAX_TRIALS}"
            )
        return self

    @model_validator(mode="after")
    def _searcher_fits(self) -> "TrainSettings":
        """Refuses a searcher with what it cannot take, rather than letting Tune fail later or ignore a setting."""
        grids = [name for name, spec in self.search_space.items() if spec.kind == "grid"]
        if self.searcher != "random" and grids:
            raise ValueError(
                f"searcher: {self.searcher} cannot take grid entries (search_space.{grids[0]}): only searcher random "
                "expands grids; use choice"
            )
        if self.searcher in MODEL_BASED and not self.search_space:
            raise ValueError(
                f"searcher: {self.searcher} needs at least one search_space entry to search; with none, every trial "
                "is the base trial (use searcher random)"
            )
        if self.searcher == "bohb" and self.scheduler != "bohb":
            raise ValueError(f"searcher: bohb needs scheduler bohb (its brackets give BOHB its budgets), "
                             f"got scheduler {self.scheduler}")
        if self.scheduler == "bohb" and self.searcher != "bohb":
            raise ValueError(f"scheduler: bohb works only with searcher bohb, got searcher {self.searcher}")
        return self

    @model_validator(mode="after")
    def _warm_start_fits(self) -> "TrainSettings":
        if self.warm_start and self.searcher not in ("random", "optuna"):
            raise ValueError(f"warm_start: searcher {self.searcher} takes no earlier results; use random (which tries "
                             "the earlier runs' best settings first) or optuna (which starts its model from them)")
        return self

    @model_validator(mode="after")
    def _cycles_fit(self) -> "TrainSettings":
        ends = self.lr_cycle_ends
        if ends and (ends[0] < 1 or any(a >= b for a, b in zip(ends, ends[1:]))):
            raise ValueError(f"lr_cycle_ends: {clip(ends)} must be increasing epochs from 1")
        if ends and self.scheduler == "halving":
            raise ValueError("lr_cycle_ends: scheduler halving ends each trial's cycles at its rungs itself; "
                             "use another scheduler (fifo) with lr_cycle_ends")
        return self

    @model_validator(mode="after")
    def _scheduler_fits(self) -> "TrainSettings":
        """Refuses a scheduler setting that would do nothing, or not what it says."""
        if self.scheduler == "pbt":
            if self.searcher != "random":
                raise ValueError(
                    f"scheduler: pbt takes its population from searcher random (Tune refuses other searchers with "
                    f"PBT), got searcher {self.searcher}"
                )
            if not any(spec.is_mutable() for spec in self.search_space.values()):
                raise ValueError("scheduler: pbt needs a search_space entry with more than one value to perturb, "
                                 "and there is none")
            if self.trial_count < 2:
                raise ValueError("scheduler: pbt needs a population of at least 2 trials (num_samples times any grid), "
                                 f"got {self.trial_count}")
            if self.pbt_interval >= self.epochs:
                raise ValueError(f"pbt_interval: {self.pbt_interval} is not below epochs ({self.epochs}): PBT would "
                                 "never perturb a trial")
        limit = self.max_concurrent_trials
        if self.scheduler in ("halving", "hyperband", "pbt") and limit is not None and limit < self.trial_count:
            raise ValueError(
                f"max_concurrent_trials: {limit} is below the {self.trial_count} trials, and scheduler "
                f"{self.scheduler} pauses trials until the others catch up while paused trials keep their slots: "
                f"leave it null (the cluster's CPUs and GPUs then limit the trials at once) or set it to "
                f"{self.trial_count} or more"
            )
        return self

    def param_space(self, base: Hyperparameters) -> dict:
        """Tune's param_space: the base hyperparameters with the searched ones replaced by distributions; with
        scheduler halving, the first rung's end too (stages.training.halving)."""
        space = {**base.model_dump(), **{name: spec.to_tune() for name, spec in self.search_space.items()}}
        if self.scheduler == "halving":
            space[RUNGS_KEY] = [self.halving_plan().first_rung_end(self.epochs)]
        elif self.lr_cycle_ends:
            space[RUNGS_KEY] = list(self.lr_cycle_ends)
        return space

    def halving_plan(self):
        """scheduler halving's rungs (stages.training.halving.HalvingPlan)."""
        from stages.training.halving import HalvingPlan

        return HalvingPlan.make(
            num_samples=self.trial_count, grace_period=self.grace_period, reduction_factor=self.reduction_factor,
            finalists=self.finalists, max_epochs=self.epochs,
        )


def base_trial_problem(settings: TrainSettings, base: Hyperparameters) -> str | None:
    """Why the base trial cannot open this search, or None.

    Optuna and HyperOpt take the base trial as their first point, and their models have no place for a value of a
    `choice` entry outside its choices. Values outside a uniform, loguniform or randint range are fine for them, and
    BOHB (stages.training.search_algorithms) and the random searcher run any point.

    Returns:
      One line starting with the setting to change ("include_base_trial: ..."), or None.
    """
    if not settings.include_base_trial or settings.searcher not in ("optuna", "hyperopt"):
        return None
    for name, spec in settings.search_space.items():
        value = getattr(base, name)
        if spec.kind == "choice" and not any(type(value) is type(c) and value == c for c in spec.args):
            return (
                f"include_base_trial: searcher {settings.searcher} starts from the model section's values, and "
                f"model.{name} ({clip(value)}) is not among search_space.{name}'s choices: add it to them, or set "
                "include_base_trial: false"
            )
    return None


def unrepeatable_because(settings: TrainSettings, concurrent_trials: int) -> str | None:
    """Why this search cannot be repeated exactly from the same run.seed, in one sentence naming the repeatable
    alternative; None when it can be (given trials that are themselves deterministic).

    Args:
      settings: the train section.
      concurrent_trials: how many trials can run at once: max_concurrent_trials, or what the cluster's CPUs and GPUs
        allow. A search with fewer trials than that runs them all at once.

    What stays repeatable at any concurrency: the random searcher's samples (seeded), halving's rungs, fifo,
    hyperband and bohb's brackets (synchronous: each rung is decided once all its trials reported) and pbt (run
    synchronously, its random draws seeded in the Tune driver). Under halving a model-based searcher repeats too:
    every trial starts in the first rung, and no trial finishes before all of them reached it, so each suggestion is
    made from the same results (none of this run's; warm_start's earlier trials) in the same order.
    """
    at_once = min(concurrent_trials, settings.trial_count)
    reasons = []
    if at_once > 1:
        if settings.scheduler == "asha":
            reasons.append(
                f"ASHA compares each trial with those that reached the same epoch before it, and with {at_once} "
                "trials at once which one reports first varies (scheduler hyperband or fifo, or "
                "max_concurrent_trials: 1, repeat exactly)"
            )
        if settings.searcher in MODEL_BASED and settings.scheduler != "halving":
            reasons.append(
                f"{SEARCHER_NAMES[settings.searcher]} suggests each trial from the results that arrived before it, and "
                f"with {at_once} trials at once their order varies (max_concurrent_trials: 1 repeats exactly)"
            )
        if settings.target_val_accuracy is not None:
            reasons.append(
                "how far the other trials got when one reaches target_val_accuracy depends on their speed "
                "(max_concurrent_trials: 1 repeats exactly)"
            )
    # halving plans its last rung within the budget instead of being cut by it: the plan (printed) is what may vary
    if settings.time_budget_s is not None and settings.scheduler != "halving":
        reasons.append(
            "where time_budget_s falls depends on the machine's speed and load (time_budget_s: null, with "
            "num_samples or target_val_accuracy to bound the search, repeats exactly)"
        )
    if not reasons:
        return None
    return "this search cannot be repeated exactly from run.seed: " + "; and ".join(reasons) + "."


def did_you_mean(name: str, candidates) -> str:
    """A " (did you mean 'x'?)" suffix for error messages; lists the candidates when none is close."""
    import difflib

    # a name far longer than every candidate is close to none; difflib would only spend time on it
    plausible = isinstance(name, str) and len(name) <= 2 * max(map(len, candidates), default=0)
    close = difflib.get_close_matches(name, list(candidates), n=1) if plausible else []
    if close:
        return f" (did you mean '{close[0]}'?)"
    names = list(candidates)
    return f" (one of: {', '.join(names[:MAX_LISTED])}{', …' if len(names) > MAX_LISTED else ''})"


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
MAX_LISTED = 12  # names an "unknown key" message lists
_SHORT_REPR = _ShortRepr(CLIP)


def clip(value: Any, limit: int = CLIP) -> str:
    """`repr(value)` in at most `limit` characters, ending in '…' when cut: a bad value may be a megabyte long."""
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
