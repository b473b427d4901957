"""Which hyperparameters mattered: fANOVA (Optuna's evaluator: a random forest over the trials) of the searched
hyperparameters against validation accuracy, at the epoch every trial reached (the first rung, with halving or ASHA),
where the trials compare on equal terms."""

from __future__ import annotations

import logging

from stages.evaluation.metrics import TrialSummary
from stages.training.train_settings import Distribution

log = logging.getLogger(__name__)

MIN_TRIALS = 4  # fewer leave a forest nothing to split


def hyperparameter_importance(trials: list[TrialSummary], space: dict[str, Distribution]) -> dict[str, float]:
    """Each searched hyperparameter's share of the variance of validation accuracy (they add up to 1), the largest
    first; empty when fewer than MIN_TRIALS trials lie inside the search space (the base trial may not) or nothing
    varies. Needs optuna and scikit-learn."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    distributions = {name: _distribution(spec) for name, spec in space.items()}
    distributions = {name: d for name, d in distributions.items() if d is not None}
    finished = [t for t in trials if t.status != "ERROR" and t.val_accuracy_by_epoch]
    if not distributions or len(finished) < MIN_TRIALS:
        return {}
    epoch = min(len(t.val_accuracy_by_epoch) for t in finished)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for trial in finished:
        params = {name: trial.hyperparameters.get(name) for name in distributions}
        if all(_inside(distributions[name], value) for name, value in params.items()):
            study.add_trial(optuna.trial.create_trial(
                params=params, distributions=distributions, value=trial.val_accuracy_by_epoch[epoch - 1]
            ))
    if len(study.trials) < MIN_TRIALS:
        return {}
    return dict(get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0)))


def _distribution(spec: Distribution):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if spec.kind in ("choice", "grid"):
        return CategoricalDistribution(list(spec.args)) if len(spec.args) > 1 else None
    low, high = spec.args
    if spec.kind == "randint":
        return IntDistribution(low, high - 1) if high - low > 1 else None
    return FloatDistribution(float(low), float(high), log=spec.kind == "loguniform")


def _inside(distribution, value) -> bool:
    try:
        return value is not None and distribution._contains(distribution.to_internal_repr(value))
    except (ValueError, TypeError):
        return False
