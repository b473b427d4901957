"""Successive halving planned within a time budget: the default way a search spends its time (scheduler `halving`).

Epochs are the fidelity. Every trial of the first rung trains `grace_period` epochs; at each rung the best
1/`reduction_factor` go on to `reduction_factor` times as many epochs, the others stop, until `finalists` trials are
left; they train the last rung, as long as the budget allows at the speed measured so far (at most `epochs`). A budget
with room to spare once the finalists reach `epochs` promotes more of the next best (more members for the ensemble).

The rungs are synchronous: a trial that reaches its rung pauses (its slot goes to the next trial) until every trial of
the rung has reached it, then the rung is decided on validation accuracy alone, ties by trial order. So which trials go
on never depends on which finished first: with the random searcher the same seed gives the same trials and the same
promotions. What the budget decides is how long the last rung is: it comes from the measured speed, in steps of
LAST_RUNG_STEP epochs up to `epochs` (printed with the rung's decision), so that the few percent a machine's speed
varies from run to run rarely change it; a machine that runs much slower or faster than before plans it shorter or
longer.

Each rung is one learning-rate cycle (the trial's config carries its rungs under RUNGS_KEY: stages.training.model's
WarmRestarts): a promotion adds a cycle ending at the next rung, so a one-cycle or cosine schedule is always complete
at the epoch the rung is judged on, and the longest cycle goes to the trials that earned it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from stages.training.train_settings import RUNGS_KEY
from stages.training.trial import trial_key

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController

log = logging.getLogger(__name__)

RESTART_S = 5.0  # a paused trial's restart: its process, the model's build, the checkpoint's load
RESERVE_FRACTION, MIN_RESERVE_S = 0.05, 10.0  # of the budget, left for what follows the search (evaluate, report)
# The speed a plan is made from varies: one 2-CPU machine measured its first two rungs 599, 646 and 675 s in three runs
# within an hour (2026-12-07). So that such noise rarely changes the plan (and every number after it), the last rung
# ends at a multiple of LAST_RUNG_STEP epochs (or at `epochs`), and a finalist beyond `finalists` is promoted only
# when the last rung would still reach `epochs` in EXTRA_FINALIST_SHARE of the time left.
LAST_RUNG_STEP = 4
EXTRA_FINALIST_SHARE = 0.85


@dataclass(frozen=True)
class HalvingPlan:
    """The rungs before the last, as (trials, epochs at the rung's end), and how many trials train the last rung."""

    rungs: tuple[tuple[int, int], ...]
    finalists: int

    @classmethod
    def make(cls, *, num_samples: int, grace_period: int, reduction_factor: float, finalists: int,
             max_epochs: int) -> "HalvingPlan":
        rungs, trials, epochs = [], num_samples, min(grace_period, max_epochs)
        while trials > finalists and epochs < max_epochs:
            rungs.append((trials, epochs))
            trials = max(finalists, math.floor(trials / reduction_factor))
            epochs = max(epochs + 1, round(epochs * reduction_factor))
        return cls(tuple(rungs), min(trials, num_samples))

    def first_rung_end(self, max_epochs: int) -> int:
        """The epoch every trial trains to first: the first rung's, or max_epochs without halving rungs."""
        return self.rungs[0][1] if self.rungs else max_epochs

    def describe(self, max_epochs: int, budget_s: float | None) -> str:
        """The plan in a line, as the run says it at its start."""
        steps = [f"{trials} trials x {epochs} epoch{'s' if epochs != 1 else ''}" for trials, epochs in self.rungs]
        if not self.rungs:
            return f"{self.finalists} trials of at most {max_epochs} epochs, no halving"
        if budget_s is None:
            return "; ".join([*steps, f"the best {self.finalists} train on to epoch {max_epochs}"])
        return "; ".join([*steps, f"the best {self.finalists} train on as long as the time budget allows (at most "
                                  f"{max_epochs} epochs; more of them where the budget has room)"])


def final_epochs(
    *, start_epochs: dict[str, int], epoch_seconds: dict[str, float], slots: int, seconds_left: float, max_epochs: int,
    step: int = 1,
) -> int:
    """How many epochs the last rung's trials can reach in `seconds_left`: the largest T <= max_epochs such that every
    trial training from its `start_epochs` to T (each epoch taking its measured `epoch_seconds`), `slots` at a time,
    ends in time; below max_epochs, rounded down to a multiple of `step`. At least one epoch more than the furthest
    trial has, when that does not fit either: a last rung of no epochs would train nothing (the budget's stopper still
    ends the search in time)."""
    furthest = max(start_epochs.values())

    def makespan(target: int) -> float:
        work = [(target - start_epochs[trial]) * epoch_seconds[trial] + RESTART_S for trial in start_epochs]
        return max(sum(work) / max(1, min(slots, len(work))), max(work))

    target = furthest + 1
    while target < max_epochs and makespan(target + 1) <= seconds_left:
        target += 1
    if target < max_epochs:
        target = max(furthest + 1, target // step * step)
    return target


@dataclass
class _Member:
    rung: int  # index of the rung it trains towards (len(plan.rungs): the last)
    score: float | None = None  # validation accuracy at that rung's end, once reached
    epoch_seconds: list[float] = field(default_factory=list)
    index: int | str = 0  # creation order: ties go to the earlier trial


class SuccessiveHalving(FIFOScheduler):
    """Synchronous successive halving over epochs whose last rung is planned within a time budget (module docstring).

    Trials must carry RUNGS_KEY in their config (a list holding the first rung's epochs) and report `epoch` and the
    metric; the trainable must train on past a rung's end (the scheduler pauses or stops it there) and build one
    learning-rate cycle per rung.
    """

    def __init__(
        self,
        *,
        plan: HalvingPlan,
        max_epochs: int,
        slots: int,
        time_budget_s: float | None,
        say: Callable[[str], None] = log.info,
    ) -> None:
        super().__init__()
        self.plan, self.max_epochs, self.slots, self.time_budget_s = plan, max_epochs, slots, time_budget_s
        self._metric, self._mode, self.say = None, "max", say  # metric and mode: the Tuner's
        self._members: dict[Trial, _Member] = {}
        self._to_unpause: list[Trial] = []
        self._added = 0  # trials the search created, every one of which starts in the first rung
        self._started = time.monotonic()

    def __getstate__(self) -> dict:
        """Tune pickles the scheduler with the experiment: a restored one learns its trials again from on_trial_add
        (each trial's config and last result say its rung), and its clock starts anew, as the budget's stopper's."""
        return {**self.__dict__, "_members": {}, "_to_unpause": [], "_added": 0}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._started = time.monotonic()

    # --- what Tune calls -------------------------------------------------------------------------------------------

    _supports_buffered_results = False  # a rung's end must come as its own result, for the trial to pause there

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        if metric:
            self._metric = metric
        if mode:
            self._mode = mode
        return True

    def on_trial_add(self, tune_controller: "TuneController", trial: Trial) -> None:
        if trial in self._members:
            return  # a failed trial Tune retries (or a paused one whose process died) comes back as it was
        self._added += 1
        if trial.status in (Trial.TERMINATED, Trial.ERROR):
            return  # a restored experiment's finished, stopped or failed trial: nothing left to decide on it
        rungs = list(trial.config.get(RUNGS_KEY) or [])
        # a restored experiment adds its trials again: the config says which rung each trains towards, its last
        # result whether it reached it
        member = _Member(rung=self._rung_of(rungs), index=trial_key(trial.trial_id))
        last = trial.last_result or {}
        if rungs and last.get("epoch", 0) >= rungs[-1] and self._metric in last:
            member.score = float(last[self._metric])
        self._members[trial] = member

    def on_trial_result(self, tune_controller: "TuneController", trial: Trial, result: dict) -> str:
        member = self._members.get(trial)
        if member is None:
            return TrialScheduler.CONTINUE
        seconds = float(result.get("time_this_iter_s") or 0.0) - float(result.get("startup_seconds") or 0.0)
        if seconds > 0 and not result.get("repeated"):
            member.epoch_seconds.append(seconds)
        end = self._rung_end(trial)
        if result.get("epoch", 0) < end:
            return TrialScheduler.CONTINUE
        if member.rung >= len(self.plan.rungs):
            return TrialScheduler.STOP  # the last rung is done
        if member.score is None:  # a restored trial reports its rung's end again (run_trial): the first score stays
            member.score = float(result[self._metric])
        return self._decide_if_complete(tune_controller, current=trial)

    def on_trial_complete(self, tune_controller: "TuneController", trial: Trial, result: dict) -> None:
        self._leave(tune_controller, trial)

    def on_trial_error(self, tune_controller: "TuneController", trial: Trial) -> None:
        if trial.should_recover():
            return  # Tune retries it from its checkpoint (on_trial_add again): it stays in its rung
        self._leave(tune_controller, trial)

    def on_trial_remove(self, tune_controller: "TuneController", trial: Trial) -> None:
        self._leave(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller: "TuneController") -> Trial | None:
        """Promoted trials first (paused at their rung, now with their next rung in the config), then new ones; never
        a trial waiting at its rung for the others."""
        for trial in list(self._to_unpause):
            if trial.status in (Trial.TERMINATED, Trial.ERROR):
                self._to_unpause.remove(trial)
            elif trial.status == Trial.PAUSED:
                self._to_unpause.remove(trial)
                return trial
        for trial in tune_controller.get_trials():
            member = self._members.get(trial)
            waiting_at_rung = member is not None and member.score is not None
            # PAUSED and not waiting: promoted before the experiment was restored
            if trial.status in (Trial.PENDING, Trial.PAUSED) and not waiting_at_rung:
                return trial
        return None

    def debug_string(self) -> str:
        return f"Using successive halving: {self.plan.describe(self.max_epochs, self.time_budget_s)}."

    # --- the rungs -------------------------------------------------------------------------------------------------

    def _rung_of(self, rungs: list[int]) -> int:
        """The index of the rung a trial with these rungs trains towards: a halving rung whose epochs its last rung
        is, else the last rung (planned, or reached by skipping rungs the budget had no room for)."""
        if not rungs:
            return len(self.plan.rungs)
        for index, (_, epochs) in enumerate(self.plan.rungs):
            if rungs[-1] == epochs and len(rungs) == index + 1:
                return index
        return len(self.plan.rungs)

    def _rung_end(self, trial: Trial) -> int:
        rungs = trial.config.get(RUNGS_KEY) or [self.max_epochs]
        return int(rungs[-1])

    def _leave(self, tune_controller: "TuneController", trial: Trial) -> None:
        """A trial ended (finished, stopped or failed for good): a rung waiting for it is decided without it."""
        if self._members.pop(trial, None) is None:
            return  # stopped by a decision, which took it out before
        if trial in self._to_unpause:
            self._to_unpause.remove(trial)
        self._decide_if_complete(tune_controller, current=None)

    def _decide_if_complete(self, tune_controller: "TuneController", current: Trial | None) -> str:
        """Decides every rung whose trials have all reached its end, lowest first (for the first rung, every trial
        the search makes must have been created). Returns what the current trial does."""
        decision = TrialScheduler.PAUSE if current is not None else TrialScheduler.CONTINUE
        while True:
            open_rungs = [member.rung for member in self._members.values() if member.rung < len(self.plan.rungs)]
            if not open_rungs:
                return decision
            rung = min(open_rungs)
            waiting = {trial: member for trial, member in self._members.items() if member.rung == rung}
            if any(member.score is None for member in waiting.values()):
                return decision
            if rung == 0 and self._added < self.plan.rungs[0][0] and not self._searcher_finished(tune_controller):
                return decision
            outcome = self._decide(tune_controller, rung, waiting, current)
            if current is not None and current in waiting:
                decision = outcome

    @staticmethod
    def _searcher_finished(tune_controller: "TuneController") -> bool:
        """Whether the searcher has made every trial it will (fewer than num_samples times the grids when the base
        trial's values override grid entries)."""
        search = getattr(tune_controller, "search_alg", None)
        return search is not None and search.is_finished()

    def _decide(self, tune_controller, rung: int, waiting: dict[Trial, _Member], current: Trial | None) -> str:
        def order(trial: Trial):  # the best first; of equal ones, the first created
            score, index = waiting[trial].score or 0.0, waiting[trial].index
            return (-score if self._mode == "max" else score, isinstance(index, str), index)

        ranked = sorted(waiting, key=order)
        next_rung = rung + 1
        last = next_rung >= len(self.plan.rungs)
        if not last and not self._next_rung_fits(ranked, next_rung, waiting):
            next_rung, last = len(self.plan.rungs), True  # skip the rungs the budget has no room for
        keep = self.plan.finalists if last else self.plan.rungs[next_rung][0]
        if last:
            end = self._plan_last_rung(ranked[:keep], waiting)
            # a budget that lets the finalists reach `epochs` with time to spare trains more of them (ensemble members)
            while self.time_budget_s is not None and keep < len(ranked) and end is not None \
                    and end >= self.max_epochs \
                    and self._plan_last_rung(ranked[: keep + 1], waiting, EXTRA_FINALIST_SHARE) >= self.max_epochs:
                keep += 1
        else:
            end = self.plan.rungs[next_rung][1]
        promoted, stopped = ranked[:keep], ranked[keep:]
        decision = TrialScheduler.PAUSE if current is not None else TrialScheduler.CONTINUE
        if end is None or end <= self._rung_end(promoted[0]):  # nothing left to train
            stopped, promoted = ranked, []
        scores = ", ".join(f"{t.trial_id} {waiting[t].score:.4f}" for t in promoted)
        message = (f"rung {rung + 1} decided at epoch {self._rung_end(ranked[0])}: "
                   + (f"{len(promoted)} of {len(ranked)} trials go on to epoch {end} ({scores})" if promoted
                      else f"no time left to train further; the search ends with {len(ranked)} trials"))
        self.say(message)
        for trial in stopped:
            del self._members[trial]
            if trial is current:
                decision = TrialScheduler.STOP
            elif trial.status in (Trial.PAUSED, Trial.PENDING, Trial.RUNNING):
                tune_controller.stop_trial(trial)
        for trial in promoted:
            member = self._members[trial]
            member.rung, member.score = next_rung, None
            trial.set_config({**trial.config, RUNGS_KEY: [*trial.config[RUNGS_KEY], end]})
            if trial is not current:
                self._to_unpause.append(trial)
        if current is not None and current in promoted:
            self._to_unpause.insert(0, current)  # paused now (to take its new config), the first to run again
        return decision

    def _seconds_left(self) -> float:
        if self.time_budget_s is None:
            return math.inf
        reserve = max(MIN_RESERVE_S, RESERVE_FRACTION * self.time_budget_s)
        return self.time_budget_s - reserve - (time.monotonic() - self._started)

    def _epoch_seconds(self, trial: Trial, waiting: dict[Trial, _Member]) -> float:
        measured = sorted(waiting[trial].epoch_seconds)
        if measured:
            return measured[len(measured) // 2]
        others = sorted(s for m in waiting.values() for s in m.epoch_seconds)
        return others[len(others) // 2] if others else 0.0

    def _next_rung_fits(self, ranked: list[Trial], next_rung: int, waiting: dict[Trial, _Member]) -> bool:
        """Whether the next halving rung, and after it a last rung at least as long again, fit in what is left."""
        if self.time_budget_s is None:
            return True
        trials, epochs = self.plan.rungs[next_rung]
        promoted = ranked[:trials]
        start = self._rung_end(ranked[0])
        finalists = promoted[: self.plan.finalists]
        need = sum((epochs - start) * self._epoch_seconds(t, waiting) + RESTART_S for t in promoted)
        need = need / max(1, min(self.slots, len(promoted)))
        need += sum(epochs * self._epoch_seconds(t, waiting) + RESTART_S for t in finalists) / max(
            1, min(self.slots, len(finalists)))
        return need <= self._seconds_left()

    def _plan_last_rung(self, promoted: list[Trial], waiting: dict[Trial, _Member], share: float = 1.0) -> int | None:
        """The epoch the last rung of these trials can reach within `share` of what is left of the budget
        (final_epochs, in steps of LAST_RUNG_STEP), or None for none."""
        if not promoted:
            return None
        if self.time_budget_s is None:
            return self.max_epochs
        return final_epochs(
            start_epochs={t.trial_id: self._rung_end(t) for t in promoted},
            epoch_seconds={t.trial_id: self._epoch_seconds(t, waiting) for t in promoted},
            slots=self.slots,
            seconds_left=self._seconds_left() * share,
            max_epochs=self.max_epochs,
            step=LAST_RUNG_STEP,
        )
