"""Stopping a run by signal: SIGINT (Ctrl-C) and SIGTERM (`kill`, `docker stop`, Kubernetes, Slurm, systemd).

Both stop a run the same way: Tune saves its experiment, Ray shuts down, nothing partial is left, the process exits
with 128 + the signal's number (130, 143), and `run --resume` continues the run.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from pipeline.local_ray import stop_train_tasks
from stages.common.redact import redact

log = logging.getLogger("pipeline")


# How long a stopping run waits for Tune to end: it writes its experiment state at once, then gives its trials up to 5 s
# to stop. Docker waits 10 s between SIGTERM and SIGKILL; Ray's shutdown takes the rest.
STOP_GRACE_S = 6.0


def stop_tune(run) -> None:
    """Asks the local Ray's train task to end Tune cleanly before Ray shuts down (within STOP_GRACE_S; a second
    signal cuts the wait short). Tune also snapshots its experiment every 0.5 s: killed mid-way, it loses at most
    that and the epochs under way."""
    log.warning("run %s: %s received: stopping (Tune saves the experiment, Ray shuts down)", run.run_id,
                STOP.name())
    asked, running = stop_train_tasks(STOP_GRACE_S, hurry=lambda: STOP.repeated)
    if asked and not running:
        log.info("run %s: the Tune experiment stopped", run.run_id)
    elif running:
        log.warning("run %s: the Tune experiment did not stop in time: Ray ends it (its state saved last counts)",
                    run.run_id)


def remove_partial_files(run, config) -> None:
    from stages.common import storage
    from stages.common.atomic import sweep_stale_parts

    folders = [Path(config.data.cache_dir).expanduser()]
    if not storage.is_uri(run.location):
        folders.append(Path(run.location))
    for folder in folders:
        if folder.is_dir():
            sweep_stale_parts(folder, recursive=True)


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (`kill`, `docker stop`, Kubernetes, Slurm, systemd) stop a run the same way.

    The first one raises KeyboardInterrupt in the main thread (Ray's waits turn whatever a handler raises into
    that anyway); the run then stops its Tune experiment cleanly, Ray shuts down, and main() prints one line and
    exits with 128 + the signal's number. A second signal while stopping only cuts the wait for Tune short.
    """

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.repeated = False
        self.run: str | None = None  # the run's folder or URI, once it exists: what --resume takes

    def start(self) -> dict:
        """Forgets an earlier run's stop and installs the handlers; returns those they replace (for restore)."""
        self.__init__()
        if threading.current_thread() is not threading.main_thread():
            return {}
        handlers = {signum: signal.getsignal(signum) for signum in self._SIGNALS}
        self.install()
        return handlers

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in self._SIGNALS:
                signal.signal(signum, self._handle)

    def restore(self, handlers: dict) -> None:
        for signum, handler in handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            raise KeyboardInterrupt
        self.repeated = True

    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGINT).name

    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def outcome(self) -> str:
        """'interrupted' (Ctrl-C) or 'stopped (SIGTERM)', and how to continue the run: main()'s last line."""
        return ("stopped (SIGTERM)" if self.signum == signal.SIGTERM else "interrupted") + self._continue()

    def reason(self) -> str:
        """What stopped the run, for its log."""
        return f"{self.name()} received" + self._continue()

    def _continue(self) -> str:
        return f"; continue with: mnist-pipeline run --resume {redact(self.run)}" if self.run else ""


STOP = StopSignals()
