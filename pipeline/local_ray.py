"""The processes of the local Ray a driver starts: its descendants, which it can signal, wait for and end.

A joined cluster's processes are not the driver's; nothing here touches them.
"""

from __future__ import annotations

import signal
import time
from typing import Callable

TRAIN_TASK_TITLE = "ray::train_task"  # the process title Ray gives a worker while it runs train_task


def stop_train_tasks(grace_s: float, hurry: Callable[[], bool] = lambda: False) -> tuple[int, int]:
    """Asks the train tasks of the local Ray this driver started to stop, and waits until they did (at most
    `grace_s` seconds, less once `hurry()` is true); returns how many there were and how many still run.

    SIGTERM makes a train task end Tune's loop as Ctrl-C ends it in a plain Tune script: the experiment's state is
    written one last time, the trials are stopped (see stages.train). A joined cluster's train task has no such
    handle here: it ends with this driver's job, and the state Tune saved at most a snapshot period before counts.
    """
    tasks = [process for process in descendants() if _title(process).startswith(TRAIN_TASK_TITLE)]
    for process in tasks:
        try:
            process.send_signal(signal.SIGTERM)
        except Exception:  # gone already
            pass

    def running() -> int:
        return sum(_title(process).startswith(TRAIN_TASK_TITLE) for process in tasks)

    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and not hurry() and running():
        time.sleep(0.1)
    return len(tasks), running()


def descendants() -> list:
    """This process's descendants: the processes of a local Ray it started (psutil comes with Ray)."""
    try:
        import psutil

        return psutil.Process().children(recursive=True)
    except Exception:  # no psutil, or a process ended while being listed
        return []


def _title(process) -> str:
    try:
        return " ".join(process.cmdline())
    except Exception:  # ended, or not ours to read
        return ""


def adopt_orphans() -> None:
    """Makes this process the one that inherits its descendants whose parent died (Linux: a child subreaper), so
    that the workers and agents of a local Ray stay this process's descendants after the raylet is gone, to be
    waited for and ended. Elsewhere (macOS) they are ended while they are still known, before the shutdown."""
    try:
        import ctypes

        PR_SET_CHILD_SUBREAPER = 36
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def end_processes(processes: list, wait_s: float = 2.0) -> None:
    """Waits for the processes of a shut-down local Ray to end, then kills what is left of them."""
    processes = list({process.pid: process for process in processes}.values())
    if not processes:
        return
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=wait_s)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=wait_s)
