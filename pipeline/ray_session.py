"""The run's Ray: a local one of its own (started and, with all its processes, ended here) or a cluster it joins."""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from typing import Iterator

import ray

from pipeline.config import Config
from pipeline.local_ray import adopt_orphans, descendants, end_processes
from pipeline.ray_startup import RayTarget, explain_start_failure, ray_target
from pipeline.task_failures import first_line
from stages.common.errors import BadInputError
from stages.common.redact import redact

log = logging.getLogger(__name__)


@contextmanager
def ray_session(config: Config) -> Iterator[str | None]:
    """Starts a local Ray for the run (no address) or joins a cluster; yields the dashboard URL, if any.

    A Ray this function started is shut down afterwards, and its processes (workers included, which otherwise
    notice their raylet's end in their own time) are gone when this returns; a cluster it joined is left running.
    """
    # Like ray.init(): RAY_ADDRESS (set by `ray job submit` and our `ray submit` entry point) joins that cluster
    target = ray_target(config.ray.address)
    address = target.address
    if address is None:
        adopt_orphans()
    try:  # ray.init too: stopped while Ray starts (SIGTERM), what it started is shut down as well
        if address is None:
            context = _start_local(config)
        else:
            context = _join(target)
        url = context.dashboard_url
        yield f"http://{url}" if url else None
    finally:
        local_ray = descendants() if address is None else []
        ray.shutdown()
        _close_progress_bars()
        if address is None:  # and what the raylet's end left orphaned (adopted: see adopt_orphans)
            end_processes(local_ray + descendants())


def _start_local(config: Config):
    """ray.init of a Ray of our own; one that cannot write what it needs (an unwritable home) is said as such.

    Raises:
      BadInputError: naming the file Ray could not write and the variable that places it.
    """
    try:
        return ray.init(
            address="local",  # a Ray of our own, never one that happens to run on this machine
            num_cpus=config.ray.num_cpus,
            num_gpus=config.ray.num_gpus,
            include_dashboard=config.ray.include_dashboard,
            dashboard_host=config.ray.dashboard_host,
            dashboard_port=_free_port_from(config.ray.dashboard_host, config.ray.dashboard_port, say=bool(
                config.ray.include_dashboard)),
            logging_level=logging.WARNING,
        )
    except OSError as error:
        if isinstance(error, ConnectionError):
            raise
        raise explain_start_failure(error) from None


def _join(target: RayTarget):
    """ray.init(address), with the cluster's token when one is at hand (as `ray.init("auto")` does for any address),
    and a refusal for want of the right token said as such.

    Raises:
      BadInputError: no cluster there, or it requires a token this process does not have (or has another).
    """
    address = target.address
    if "RAY_AUTH_MODE" not in os.environ:
        try:  # Ray's own rule for `address="auto"`: a token in RAY_AUTH_TOKEN(_PATH) or ~/.ray/auth_token turns it on
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available,
            )

            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        except ImportError:  # a Ray without token authentication
            pass
    try:
        return ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError as error:
        if not _about_authentication(error):
            raise BadInputError(f"{target.source}={redact(address)}: {first_line(error)}") from None
        mode = os.environ.get("RAY_AUTH_MODE", "unset")
        raise BadInputError(
            f"the Ray cluster at {address} refused this client's authentication token (RAY_AUTH_MODE={mode}): "
            "give the cluster's token in RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, "
            "with RAY_AUTH_MODE=token"
        ) from None


def _about_authentication(error: BaseException) -> bool:
    """Whether a failure to join came from the cluster refusing this client's token (somewhere in its causes)."""
    while error is not None:
        if type(error).__name__ == "AuthenticationError" or "token-auth" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _close_progress_bars() -> None:
    """Ray draws the tasks' progress bars on this console; a bar whose closing message never arrived (a download
    that failed as the run ended) would print itself again at exit, after the run's last line."""
    try:
        import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm.tqdm, "_instances", [])):
        bar.close()


def _free_port_from(host: str, port: int, attempts: int = 50, *, say: bool = True) -> int:
    """The first port from `port` on that is free: Ray refuses to start when the dashboard's port is taken (even
    with the dashboard off: its API server takes the port); `say`: tell the user of another port."""
    for candidate in range(port, min(port + attempts, 65536)):
        with socket.socket() as probe:
            try:
                probe.bind((host, candidate))
            except OSError:
                continue
        if candidate != port and say:
            log.warning("dashboard port %d is in use; using %d", port, candidate)
        return candidate
    return port
