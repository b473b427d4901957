"""Tune's per-trial logs (result.json, progress.csv) without losing rows when a trial restarts.

Tune's logger callbacks copy a restarting trial's log back from storage over the driver's own copy
(LoggerCallback._restore_from_remote). Storage lags the driver by up to one sync, so the rows written since then
vanish: a PBT exploit or a retried trial lost its earlier epochs, and with them their rows in trials.csv. The driver's
copy, where there is one, is the newest (storage only ever receives copies of it); storage's is needed only when the
driver has none, as when a resumed experiment runs on a new driver.
"""

from __future__ import annotations

from pathlib import Path

from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback


class _KeepsTheDriversCopy:
    def _restore_from_remote(self, file_name: str, trial) -> None:
        if not Path(trial.local_path, file_name).exists():
            super()._restore_from_remote(file_name, trial)


class JsonLog(_KeepsTheDriversCopy, JsonLoggerCallback):
    """result.json, one JSON line per result."""


class CsvLog(_KeepsTheDriversCopy, CSVLoggerCallback):
    """progress.csv, one row per result."""
