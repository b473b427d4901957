"""A finished search resumed with a larger `train.time_budget_s` goes on searching instead of starting over: real
pipeline runs (CLI, local Ray, Tune's successive halving) on a slice of real MNIST."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SLICE = [
    "data.max_train_images=2000", "data.validation_size=500", "data.max_test_images=500",
    "model.conv1_filters=4", "model.conv2_filters=8", "model.dense_units=32", "model.lr_schedule=one_cycle",
    "train.num_samples=4", "train.finalists=2", "train.grace_period=1", "train.epochs=3",
    "train.search_space={dropout: {uniform: [0.0, 0.4]}, learning_rate: {loguniform: [1.0e-3, 1.0e-2]}}",
    "ray.num_cpus=2", "ray.include_dashboard=false", "evaluate.ensemble_top_k=3",
]
BUDGET = 300  # seconds: far more than 4 trials of this slice need, so time never cuts a rung short here


def pipeline(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def metrics(work: Path, run: str) -> dict:
    return json.loads((work / "runs" / run / "metrics.json").read_text())


def searched_values(trials: list[dict]) -> list[tuple[float, float]]:
    return sorted((t["hyperparameters"]["dropout"], t["hyperparameters"]["learning_rate"]) for t in trials)


@pytest.fixture(scope="module")
def continued(mnist_mirror, tmp_path_factory):
    """A search of 4 trials within BUDGET, then resumed with twice the budget."""
    work = tmp_path_factory.mktemp("continued")
    common = [f"run.root={work / 'runs'}", f"data.cache_dir={work / 'cache'}", f"data.mirrors=[{mnist_mirror}]"]
    sets = [part for setting in [*common, *SLICE] for part in ("--set", setting)]
    first = pipeline("run", "--run-id", "grow", *sets, "--set", f"train.time_budget_s={BUDGET}", cwd=work)
    assert first.returncode == 0, first.stderr[-3000:]
    before = metrics(work, "grow")
    first_train_s = json.loads((work / "runs" / "grow" / "stages.json").read_text())["train"]["seconds"]
    tune = work / "runs" / "grow" / "tune"
    results = {path: path.read_bytes() for path in tune.glob("*/result.json")}
    grown = pipeline("run", "--resume", "grow", "--set", f"run.root={work / 'runs'}",
                     "--set", f"train.time_budget_s={2 * BUDGET}", cwd=work)
    assert grown.returncode == 0, grown.stderr[-3000:]
    return work, before, metrics(work, "grow"), results, grown, first_train_s


def round_2_train_s(result: subprocess.CompletedProcess) -> float:
    """The seconds of the resumed train stage, from its 'stage train: done in 12.3s (...)' line."""
    line = next(line for line in result.stderr.splitlines() if "stage train: done in" in line)
    text = line.split("done in ", 1)[1].split(" ", 1)[0]
    minutes, _, seconds = text.rpartition("m")
    return float(minutes or 0) * 60 + float(seconds.rstrip("s"))


def test_a_larger_budget_continues_the_finished_search_in_a_new_round(continued):
    work, before, after, results, grown, first_train_s = continued
    tune = work / "runs" / "grow" / "tune"
    assert json.loads((tune / "rounds.json").read_text()) == {"rounds": [
        {"experiment": "tune", "budget_s": BUDGET, "finished": True},
        {"experiment": "continued-1", "budget_s": BUDGET, "finished": True},
    ]}
    assert "round 2 of the search: 5m00s more (the time budget grew from 5m00s)" in grown.stdout + grown.stderr
    # the train stage's time is both rounds' (the report says it against the whole budget)
    stages = json.loads((work / "runs" / "grow" / "stages.json").read_text())
    assert stages["train"]["seconds"] == pytest.approx(first_train_s + round_2_train_s(grown), abs=1.0)
    # the first round is kept as it was: not one of its results written again
    assert {path: path.read_bytes() for path in tune.glob("*/result.json")} == results
    first_ids = {t["trial_id"] for t in before["trials"]}
    new = [t for t in after["trials"] if t["trial_id"] not in first_ids]
    assert len(before["trials"]) == 4 and len(new) == 4
    by_id = lambda trials: sorted(trials, key=lambda t: t["trial_id"])  # noqa: E731  Tune lists them in no fixed order
    assert by_id(t for t in after["trials"] if t["trial_id"] in first_ids) == by_id(before["trials"])
    assert {path.parent.name.split("_")[2] + "_" + path.parent.name.split("_")[3]
            for path in (tune / "continued-1").glob("*/result.json")} == {t["trial_id"] for t in new}
    # new settings (round 2 draws from seed + 1, and the base trial trained in round 1 only), halved like round 1
    assert not set(searched_values(new)) & set(searched_values(before["trials"]))
    assert all(t["rungs"][0] == 1 and t["epochs"] in (1, 3) for t in new)
    assert "rung 1 decided at epoch 1" in grown.stdout  # round 2 halves its trials, as round 1 did
    # the winner and the ensemble come from both rounds' trials, ranked by validation accuracy
    best = max(after["trials"], key=lambda t: t["best_val_accuracy"])
    assert after["val_accuracy"] == best["best_val_accuracy"] >= before["val_accuracy"]
    ranked = sorted(after["trials"], key=lambda t: -t["best_val_accuracy"])
    assert after["ensemble"]["trial_ids"] == [t["trial_id"] for t in ranked][: after["ensemble"]["k"]]


def test_a_continued_search_resumed_as_it_is_runs_nothing_and_a_smaller_budget_is_refused(continued):
    work, _, after, _, _, _ = continued
    runs = ["--set", f"run.root={work / 'runs'}"]
    again = pipeline("run", "--resume", "grow", *runs, cwd=work)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage train: finished earlier" in again.stdout + again.stderr
    assert metrics(work, "grow") == after
    smaller = pipeline("run", "--resume", "grow", *runs, "--set", f"train.time_budget_s={BUDGET}", cwd=work)
    assert smaller.returncode == 2 and smaller.stderr.count("\n") == 1
    assert f"train.time_budget_s: {2 * BUDGET}.0 -> {BUDGET}" in smaller.stderr or \
        f"train.time_budget_s: {2 * BUDGET} -> {BUDGET}" in smaller.stderr, smaller.stderr


def test_rounds_are_planned_from_the_budgets_so_far(tmp_path):
    from stages.common.errors import BadInputError, DataError
    from stages.training.search_rounds import SearchRound, plan_rounds, read_rounds

    experiment = str(tmp_path)
    assert plan_rounds(experiment, "tune", 1800, None) == []  # never continued: one round, no file
    assert not (tmp_path / "rounds.json").exists()
    rounds = plan_rounds(experiment, "tune", 2700, 1800)
    assert rounds == [SearchRound("tune", 1800, True), SearchRound("continued-1", 900, False)]
    assert read_rounds(experiment) == rounds
    assert plan_rounds(experiment, "tune", 2700, None) == rounds  # an unfinished round is restored, not added to
    with pytest.raises(BadInputError, match="had 2700 s in 2 rounds"):
        plan_rounds(experiment, "tune", 2000, None)
    (tmp_path / "rounds.json").write_text('{"rounds": [{"experiment": "tune", "budget_s": 1800, "finished": true},'
                                          ' {"experiment": "../elsewhere", "budget_s": 900, "finished": true}]}')
    with pytest.raises(DataError, match="rounds.json: damaged"):
        read_rounds(experiment)


def test_only_a_larger_budget_alone_continues_a_finished_search():
    from pipeline.runner import budget_growth

    recorded = {"train.time_budget_s": 1800.0, "train.epochs": 20, "run.seed": 0}
    assert budget_growth(recorded, {**recorded, "train.time_budget_s": 2700}) == 1800.0
    assert budget_growth(recorded, recorded) is None
    assert budget_growth(recorded, {**recorded, "train.time_budget_s": 900}) is None  # refused by check_resume
    assert budget_growth(recorded, {**recorded, "train.time_budget_s": None}) is None  # no budget: not a round
    assert budget_growth({**recorded, "train.time_budget_s": None}, recorded) is None
    assert budget_growth(recorded, {**recorded, "train.time_budget_s": 2700, "train.epochs": 24}) is None


def test_a_later_round_samples_trials_in_proportion_to_its_budget():
    from stages.training.search_rounds import SearchRound, round_settings
    from stages.training.train_settings import TrainSettings

    settings = TrainSettings.model_validate({"num_samples": 16, "finalists": 4, "time_budget_s": 2700})

    def later(budget_s: float, first_s: float = 1800, base: TrainSettings = settings) -> TrainSettings:
        return round_settings(base, SearchRound("continued-1", budget_s, False), first_s)

    half = later(900)
    assert (half.num_samples, half.time_budget_s, half.include_base_trial) == (8, 900, False)
    assert later(3600).num_samples == 32 and later(1800).num_samples == 16
    assert later(60).num_samples == 4  # never fewer than the finalists
    grid = TrainSettings.model_validate({"num_samples": 2, "search_space": {"optimizer": {"grid": ["adam", "adamw"]}},
                                         "finalists": 4})
    assert later(1800, first_s=0.1, base=grid).num_samples == 5000  # times the grid: at most 10,000 trials
