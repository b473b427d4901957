"""Which Ray a run uses, checked before anything is created, so that a Ray that cannot be reached or started ends
the run within seconds, in one line naming the setting or variable to fix.

Ray's own join retries an address for minutes (its GCS client waits ~15-40 s per attempt, 20 attempts) whatever is
wrong with it, and its start-up failures surface as tracebacks of its internals.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from stages.common.errors import BadInputError
from stages.common.redact import redact

REACH_TIMEOUT_S = 10.0  # a cluster's head answers in milliseconds; a slow WAN link in a second or two


@dataclass(frozen=True)
class RayTarget:
    """The Ray cluster a run joins (`address`), or None for a Ray of its own; `source` names where it came from."""

    address: str | None
    source: str  # "ray.address" or "RAY_ADDRESS"


def ray_target(configured: str | None) -> RayTarget:
    """The config's ray.address, else RAY_ADDRESS (as ray.init reads it: `ray job submit` and our `ray submit`
    entry point set it), its form checked like the config's.

    Raises:
      BadInputError: RAY_ADDRESS is not a Ray address.
    """
    if configured is not None:
        return RayTarget(configured, "ray.address")
    address = os.environ.get("RAY_ADDRESS", "").strip() or None
    if address is not None:
        from pipeline.config import check_ray_address

        try:
            check_ray_address(address)
        except ValueError as error:
            raise BadInputError(f"RAY_ADDRESS: {error} (unset it to start a local Ray)") from None
    return RayTarget(address, "RAY_ADDRESS")


def check_reachable(target: RayTarget, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """Refuses, within `timeout_s`, an address where no Ray answers: a name that does not resolve, a port nobody
    listens on, a host that does not answer, or a port that does not speak gRPC (Ray's GCS and its client server
    both do). "auto" is left to Ray, which looks for a local cluster at once.

    Raises:
      BadInputError: naming the address, where it came from, and what went wrong.
    """
    if target.address is None or target.address == "auto":
        return
    host_port = target.address.removeprefix("ray://")
    host, _, port = host_port.rpartition(":")
    gcs = not target.address.startswith("ray://")
    problem = _tcp_problem(host, int(port), timeout_s) or _grpc_problem(host_port, timeout_s, gcs=gcs)
    if problem:
        raise BadInputError(
            f"{target.source}={redact(target.address)}: no Ray cluster answers there: {problem}; check that the "
            f"cluster is up (`ray status` on its head) and the address, or leave {target.source} unset for a "
            "local Ray"
        )


def _tcp_problem(host: str, port: int, timeout_s: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except socket.gaierror:
        return f"the name {host!r} does not resolve"
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except OSError as error:
        return (error.strerror or str(error)).lower()


def _grpc_problem(host_port: str, timeout_s: float, *, gcs: bool) -> str | None:
    """Whether the port answers as Ray does: its GCS answers GetClusterId (or refuses this client's token); a Ray
    client server at least completes a gRPC handshake. A web server or another gRPC service does not."""
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return None  # the handshake would need the cluster's certificates; Ray's own join checks this one
    import grpc

    channel = grpc.insecure_channel(host_port)
    try:
        if not _handshakes(channel, timeout_s):
            return "the port is open but does not speak gRPC"
        if gcs:
            ask = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")
            ask(b"", timeout=timeout_s)  # an empty GetClusterIdRequest
        return None
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNAUTHENTICATED:
            return None  # a Ray with token authentication: the join says what to do about the token
        return f"the port does not answer as Ray's GCS does ({error.code().name.lower()})"
    finally:
        channel.close()


def _handshakes(channel, timeout_s: float) -> bool:
    """Whether the channel gets READY; its first TRANSIENT_FAILURE (a handshake the other side botched) is a no
    without waiting for the reconnect attempts gRPC would go on making."""
    import grpc

    settled, outcome = threading.Event(), []

    def watch(state: grpc.ChannelConnectivity) -> None:
        if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE) and not outcome:
            outcome.append(state is grpc.ChannelConnectivity.READY)
            settled.set()

    channel.subscribe(watch, try_to_connect=True)
    try:
        settled.wait(timeout_s)
    finally:
        channel.unsubscribe(watch)
    return bool(outcome and outcome[0])


def explain_start_failure(error: OSError) -> BadInputError:
    """A local Ray that could not write what it needs: the file, and the variable that decides where it goes."""
    path = str(error.filename or "")
    home, ray_tmpdir = str(Path.home()), os.environ.get("RAY_TMPDIR")

    def under(folder: str) -> bool:
        return bool(path) and (path == folder or path.startswith(folder.rstrip("/") + "/"))

    if ray_tmpdir and under(ray_tmpdir):
        fix = f"RAY_TMPDIR={ray_tmpdir} is not writable here: set it to a writable folder"
    elif under(home):
        fix = f"HOME={home} is not writable here (Ray keeps its token in ~/.ray): set HOME to a writable folder"
    elif under(tempfile.gettempdir()):
        fix = "Ray's session folder is not writable: set RAY_TMPDIR to a writable folder"
    else:
        fix = "fix the permissions or the disk"
    what = f"cannot write {path}" if path else "cannot write its files"
    return BadInputError(f"Ray could not start: {what} ({error.strerror or error}); {fix}")
