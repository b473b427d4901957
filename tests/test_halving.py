"""Successive halving within a time budget (scheduler halving, the default): its plan, and real Tune searches of the
real trainable on a slice of real MNIST (the `data` fixture: 1,000 training and 500 validation images) with a tiny
CNN.

Each test replays the scheduler's rule from the trials' own results, so that a rung decided on anything but the
validation accuracy at the rung, a promotion that kept the old schedule, or a budget that plans nothing fails.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from test_search import epochs_of, trials_in_order

from stages.training.halving import LAST_RUNG_STEP, RESTART_S, HalvingPlan, final_epochs
from stages.training.hyperparameters import Hyperparameters
from stages.training.model import ONE_CYCLE_DIV_FACTOR, ONE_CYCLE_FINAL_DIV_FACTOR
from stages.training.train_settings import RUNGS_KEY, TrainSettings

pytestmark = pytest.mark.e2e

PEAK = 3e-3
BASE = Hyperparameters(conv1_filters=4, conv2_filters=8, dense_units=32, learning_rate=PEAK, lr_schedule="one_cycle")
SEED = 11


def halving(**changes) -> TrainSettings:
    values = {
        "scheduler": "halving", "num_samples": 6, "finalists": 2, "epochs": 4, "grace_period": 1,
        "reduction_factor": 3.0, "max_failures": 0, "include_base_trial": False, "time_budget_s": None,
        "search_space": {"dropout": {"uniform": [0.0, 0.5]}, "batch_size": {"choice": [32, 64]}},
    }
    return TrainSettings.model_validate({**values, **changes})


def search(data, root: Path, settings: TrainSettings):
    from stages.train import train

    return train(*data, base=BASE, settings=settings, storage_path=str(root), seed=SEED)


# --- the plan ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("samples, grace, factor, finalists, epochs, rungs, last", [
    (12, 1, 3.0, 4, 30, ((12, 1),), 4),
    (16, 2, 2.0, 4, 20, ((16, 2), (8, 4)), 4),  # the default: 16 trials of 2 epochs, 8 of 4, the best 4 to the end
    (36, 1, 3.0, 4, 30, ((36, 1), (12, 3)), 4),
    (16, 1, 2.0, 2, 30, ((16, 1), (8, 2), (4, 4)), 2),
    (40, 2, 3.0, 4, 30, ((40, 2), (13, 6)), 4),
    (36, 1, 3.0, 4, 2, ((36, 1),), 12),  # no rung at the last epoch: the trials left then train to it
    (3, 1, 3.0, 4, 30, (), 3),  # no more trials than finalists: no halving
])
def test_the_plan_halves_the_trials_and_multiplies_the_epochs_until_the_finalists_are_left(
        samples, grace, factor, finalists, epochs, rungs, last):
    plan = HalvingPlan.make(num_samples=samples, grace_period=grace, reduction_factor=factor, finalists=finalists,
                            max_epochs=epochs)
    assert plan.rungs == rungs and plan.finalists == last


def test_the_last_rung_is_as_long_as_the_time_left_allows_for_its_trials_side_by_side():
    start, seconds = {"a": 3, "b": 3, "c": 3, "d": 3}, {"a": 10.0, "b": 10.0, "c": 20.0, "d": 20.0}
    # two slots: (T - 3) * (10 + 10 + 20 + 20) / 2 + 2 restarts' share <= 600  ->  T - 3 <= 19.67
    assert final_epochs(start_epochs=start, epoch_seconds=seconds, slots=2, seconds_left=600, max_epochs=100) == 22
    assert final_epochs(start_epochs=start, epoch_seconds=seconds, slots=2, seconds_left=600, max_epochs=10) == 10
    # one slot: the work adds up
    assert final_epochs(start_epochs=start, epoch_seconds=seconds, slots=1, seconds_left=600,
                        max_epochs=100) == 3 + int((600 - 4 * RESTART_S) // 60)
    # more slots than trials: the slowest trial decides
    assert final_epochs(start_epochs=start, epoch_seconds=seconds, slots=8, seconds_left=600, max_epochs=100) == 3 + 29
    # no time left: one more epoch all the same (the budget's stopper ends the search in time)
    assert final_epochs(start_epochs=start, epoch_seconds=seconds, slots=2, seconds_left=0, max_epochs=100) == 4
    # in steps: below the cap, the last rung ends at a multiple of `step` (22 -> 20); the cap itself is kept
    assert final_epochs(start_epochs=start, epoch_seconds=seconds, slots=2, seconds_left=600, max_epochs=100,
                        step=4) == 20
    assert final_epochs(start_epochs=start, epoch_seconds=seconds, slots=2, seconds_left=600, max_epochs=22,
                        step=4) == 22
    assert final_epochs(start_epochs=start, epoch_seconds=seconds, slots=2, seconds_left=0, max_epochs=100,
                        step=4) == 4


def test_settings_refuse_a_limit_on_trials_at_once_that_paused_trials_would_fill():
    with pytest.raises(ValueError, match="max_concurrent_trials: 2 is below the 6 trials, and scheduler halving"):
        halving(max_concurrent_trials=2)


# --- real searches ----------------------------------------------------------------------------------------------------


def test_each_rung_promotes_its_best_trials_on_validation_and_their_schedule_covers_the_new_length(data, tmp_path):
    runs = []
    for attempt in ("one", "two"):
        outcome = search(data, tmp_path / attempt, halving())
        trials = trials_in_order(Path(outcome.experiment_path))
        runs.append([(t["number"], [(row["epoch"], row["val_accuracy"]) for row in t["rows"]]) for t in trials])
    assert runs[0] == runs[1], "the same seed must give the same trials, promotions and numbers"

    assert len(trials) == 6
    first_rung = sorted(trials, key=lambda t: (-t["rows"][0]["val_accuracy"], t["number"]))
    promoted, stopped = first_rung[:2], first_rung[2:]
    for trial in stopped:
        assert epochs_of(trial) == [1], f"trial {trial['number']} was not among the best 2 at epoch 1"
        assert trial["rows"][-1]["config"][RUNGS_KEY] == [1]
    final = PEAK / ONE_CYCLE_DIV_FACTOR / ONE_CYCLE_FINAL_DIV_FACTOR
    for trial in promoted:
        assert epochs_of(trial) == [1, 2, 3, 4], f"trial {trial['number']} was among the best 2 at epoch 1"
        assert [row["config"][RUNGS_KEY] for row in trial["rows"]] == [[1], [1, 4], [1, 4], [1, 4]]
        rates = [row["end_learning_rate"] for row in trial["rows"]]
        # each rung's cycle ends annealed; the second warms up again and runs its course over epochs 2-4
        assert rates[0] == pytest.approx(final, rel=0.01)
        assert rates[1] > PEAK / 2 and rates[1] > rates[2] > rates[3]
        assert rates[3] == pytest.approx(final, rel=0.01)
    assert outcome.best_trial_id in {t["id"] for t in promoted}


def test_a_model_based_searcher_under_halving_suggests_and_promotes_the_same_trials_again(data, tmp_path, caplog):
    """Optuna's TPE with two trials at once: every trial is suggested before any finishes (all pause at the first
    rung), so the run says nothing about repeatability and the same seed gives the same trials and promotions."""
    tpe = halving(searcher="optuna", num_samples=4, finalists=2, epochs=2, reduction_factor=2.0)
    runs = []
    for attempt in ("one", "two"):
        with caplog.at_level(logging.INFO, logger="stages.train"):
            outcome = search(data, tmp_path / attempt, tpe)
        trials = trials_in_order(Path(outcome.experiment_path))
        runs.append([(t["rows"][0]["config"]["dropout"], t["rows"][0]["config"]["batch_size"],
                      [(row["epoch"], row["val_accuracy"]) for row in t["rows"]]) for t in trials])
    assert "cannot be repeated" not in caplog.text
    assert runs[0] == runs[1], "the same seed must give the same suggestions, promotions and numbers"
    assert len({(dropout, batch) for dropout, batch, _ in runs[0]}) == 4, "four different suggestions"
    assert sorted(len(rows) for *_, rows in runs[0]) == [1, 1, 2, 2]


def test_the_budget_plans_the_last_rung_and_the_search_ends_inside_it(data, tmp_path, capsys):
    budget = 60.0
    outcome = search(data, tmp_path, halving(num_samples=4, epochs=500, time_budget_s=budget))
    printed = capsys.readouterr().out
    assert "[search] plan: 4 trials x 1 epoch; the best 2 train on as long as the time budget allows" in printed
    # the scheduler's decision, which the machine's speed cannot change: the best 2 of 4 go on to a planned epoch
    decision = re.search(r"rung 1 decided at epoch 1: 2 of 4 trials go on to epoch (\d+) \(([^)]*)\)", printed)
    assert decision, printed
    last, promoted = int(decision[1]), {entry.split()[0] for entry in decision[2].split(", ")}
    # from the budget, not from epochs: in steps of LAST_RUNG_STEP, or one epoch past the first rung where a busy
    # machine leaves no room for a step (how far it gets depends on the machine's speed, not asserted)
    assert last < 500, "the last rung's length comes from the budget, not from epochs"
    assert last == 2 or last % LAST_RUNG_STEP == 0
    trials = trials_in_order(Path(outcome.experiment_path))
    assert len(trials) == 4 and len(promoted) == 2
    trained_on = {t["id"] for t in trials if len(t["rows"]) > 1}
    assert trained_on <= promoted, "only the promoted trials train past the first rung"
    promoted_trials = [t for t in trials if t["id"] in promoted]
    assert all(t["rows"][-1]["config"][RUNGS_KEY] == [1, last] for t in promoted_trials if len(t["rows"]) > 1)
    # none trains past the planned rung; on a machine slowed down after the plan (a busy CI machine), the budget's
    # stopper may end them before it, and then says so
    assert all(epochs_of(t)[-1] <= last for t in promoted_trials)
    if any(epochs_of(t)[-1] < last for t in promoted_trials):
        assert outcome.stop_reason and outcome.stop_reason.startswith("time budget")


def test_the_progress_line_counts_trials_waiting_at_a_rung_as_paused():
    from types import SimpleNamespace

    from stages.training.progress import SearchProgress

    trials = [
        SimpleNamespace(status=status, trial_id=f"t{i}", config={RUNGS_KEY: [2]}, metric_analysis={},
                        last_result={"training_iteration": 2 if status == "PAUSED" else 1, "val_accuracy": 0.9})
        for i, status in enumerate(["PAUSED", "PAUSED", "RUNNING", "PENDING"])
    ]
    line = SearchProgress(trials=6, epochs=30).status(trials)
    assert line.startswith("trials 0 done, 1 running, 2 paused, 3 pending | epochs 6/68 |"), line
    trials[0].status = trials[1].status = "TERMINATED"
    assert SearchProgress(trials=6, epochs=30).status(trials).startswith("trials 2 done, 1 running, 3 pending")
    # how a trial ended: at which rung halving stopped it, or its last rung done
    lines = []
    progress = SearchProgress(trials=6, epochs=30, printer=lambda line, **_: lines.append(line), halving_rungs=2)
    for rungs, epochs in [([2], 2), ([2, 4], 4), ([2, 4, 24], 24), ([2, 4, 24], 9), ([2, 4, 40], 30)]:
        ended = SimpleNamespace(status="TERMINATED", trial_id="t", config={RUNGS_KEY: rungs}, metric_analysis={},
                                last_result={"training_iteration": epochs, "val_accuracy": 0.99})
        progress.on_trial_complete(0, [], ended)
    assert [line.split(": best")[0] for line in lines] == [
        "[search] trial t stopped at the first rung (epoch 2)", "[search] trial t stopped at rung 2 (epoch 4)",
        "[search] trial t finished", "[search] trial t stopped early after epoch 9",
        "[search] trial t finished",  # export-config's replay: its last cycle ends after the epochs it trains
    ]
