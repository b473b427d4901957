"""BOHB as Tune's TuneBOHB runs it, able to run the base trial outside its search space."""

from __future__ import annotations

import ConfigSpace
from ray.tune.search.bohb import TuneBOHB


class BOHBSearch(TuneBOHB):
    """Tune's TuneBOHB, able to run a point outside its space: the classic baseline as the base trial (dropout 0 when
    the space searches [0.2, 0.5], say). BOHB's model only takes configurations inside its space (ConfigSpace refuses
    the others, which would end the experiment): such a trial runs, and its results go to HyperBand only."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if inside(self._space, self.trial_to_params.get(trial_id)):
            super().on_trial_result(trial_id, result)
        elif trial_id not in self.paused:
            self.running.add(trial_id)  # what TuneBOHB does besides feeding its model


def inside(space: ConfigSpace.ConfigurationSpace, params: dict | None) -> bool:
    """Whether `params` is a configuration of `space`."""
    if params is None:
        return False
    try:
        ConfigSpace.Configuration(space, values=params)
    except (ValueError, KeyError):  # IllegalValueError, and the like for a name or value outside the space
        return False
    return True
