"""A finished search continued with a larger time budget: more rounds of the same search, inside its experiment.

A run whose search finished within `time_budget_s` and is resumed with a larger one does not start over: its trials,
checkpoints and results stay as they are, and a new round searches for the time added (the new budget less the
rounds' budgets before it), sampling trials in proportion to that time (round_settings). Each round is a Tune
experiment of its own, `continued-<n>` inside the first one's folder (tune/), so everything that reads or guards the
experiment folder covers it; ROUNDS_FILE there lists the rounds in order with their budgets and whether they
finished. A round that stops half way (a crash, SIGTERM) is restored like any experiment when the run is resumed
with the same budget.

Round n draws from `seed + n`, so it samples new settings where round 0 sampled its own (the same run continued the
same way gives the same trials), and skips the base trial, which round 0 trained. A model-based searcher takes every
earlier round's trial as evaluated already (`earlier`); the random searcher has nothing to learn from them.
The outcome is the rounds' trials together, ranked by validation accuracy (of equal ones, the earlier round's): the
winner and the ensemble's members may come from any round.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from stages.common import storage
from stages.common.errors import BadInputError, DataError
from stages.training.train_settings import MAX_TRIALS, TrainSettings
from stages.training.tune_results import TuneOutcome

ROUNDS_FILE = "rounds.json"  # in the first round's experiment folder
CONTINUED_PREFIX = "continued-"
MAX_ROUNDS_BYTES = 2**20  # a few rounds take a few hundred bytes


@dataclass(frozen=True)
class SearchRound:
    experiment: str  # the experiment's folder: the first round's own (its name), or continued-<n> inside it
    budget_s: float  # seconds this round may search
    finished: bool


def read_rounds(experiment_path: str) -> list[SearchRound]:
    """The rounds recorded in the experiment folder; none for a search never continued.

    Raises:
      DataError: the file is not what write_rounds writes.
    """
    location = storage.join(experiment_path, ROUNDS_FILE)
    if not storage.exists(location):
        return []
    data = storage.read_bytes(location)
    try:
        if len(data) > MAX_ROUNDS_BYTES:
            raise ValueError(f"{len(data)} bytes")
        rounds = [SearchRound(str(r["experiment"]), float(r["budget_s"]), bool(r["finished"]))
                  for r in json.loads(data)["rounds"]]
        names = [r.experiment for r in rounds[1:]]
        if not rounds or names != [f"{CONTINUED_PREFIX}{n}" for n in range(1, len(rounds))] or \
                any(r.budget_s <= 0 for r in rounds):
            raise ValueError("not rounds this program wrote")
    except (ValueError, TypeError, KeyError) as error:
        raise DataError(f"{location}: damaged ({error})") from None
    return rounds


def write_rounds(experiment_path: str, rounds: list[SearchRound]) -> None:
    storage.write_json(storage.join(experiment_path, ROUNDS_FILE),
                       {"rounds": [dataclasses.asdict(r) for r in rounds]})


def plan_rounds(
    experiment_path: str, experiment_name: str, budget_s: float | None, continued_from_s: float | None
) -> list[SearchRound]:
    """The rounds the search has, with a new one when the budget grew; none for a search of one round.

    Args:
      experiment_path: the first round's experiment folder.
      experiment_name: its name.
      budget_s: train.time_budget_s now.
      continued_from_s: the budget the finished search had, when it is resumed with a larger one (else None).

    Raises:
      BadInputError: the budget is smaller than the rounds so far had (they cannot be undone), or absent.
    """
    rounds = read_rounds(experiment_path)
    if not rounds and continued_from_s is None:
        return []
    if not rounds:
        rounds = [SearchRound(experiment_name, continued_from_s, finished=True)]
    spent = sum(r.budget_s for r in rounds)
    if budget_s is None or budget_s < spent - 1e-6:
        raise BadInputError(
            f"train.time_budget_s: this run's search had {spent:g} s in {len(rounds)} round"
            f"{'s' if len(rounds) > 1 else ''}; resume it with that budget, or a larger one to search on"
        )
    if budget_s > spent + 1e-6 and rounds[-1].finished:
        rounds.append(SearchRound(f"{CONTINUED_PREFIX}{len(rounds)}", budget_s - spent, finished=False))
        write_rounds(experiment_path, rounds)
    return rounds


def round_settings(settings: TrainSettings, search_round: SearchRound, first_budget_s: float) -> TrainSettings:
    """The search's settings for a later round: its budget; trials in proportion to it against the first round's
    (15 minutes added to a 30-minute search sample half as many: halving's finalists then get as long a last rung
    as the first round's did, not one squeezed behind a full first rung), at least `finalists`; no base trial."""
    grid = settings.trial_count // settings.num_samples
    samples = round(settings.num_samples * search_round.budget_s / first_budget_s)
    samples = min(max(samples, min(settings.finalists, settings.num_samples), 1), MAX_TRIALS // grid)
    return settings.model_copy(
        update={"time_budget_s": search_round.budget_s, "num_samples": samples, "include_base_trial": False})


def merge_outcomes(outcomes: list[TuneOutcome]) -> TuneOutcome:
    """The rounds' outcomes as one: every trial, ranked by validation accuracy (stable: of equal ones, the earlier
    round's first); why the search ended early is the last round's."""
    return TuneOutcome.from_ranked(
        ranked=sorted((entry for outcome in outcomes for entry in outcome.ranked), key=lambda e: -e.val_accuracy),
        trials=[trial for outcome in outcomes for trial in outcome.trials],
        history=[row for outcome in outcomes for row in outcome.history],
        experiment_path=outcomes[0].experiment_path,
        stop_reason=outcomes[-1].stop_reason,
    )
