"""A real multi-node Ray cluster on this machine whose nodes share nothing but a run root, as real machines do.

Every node (`ray start --head`, then `ray start --address` for each worker) lives in a mount namespace of its own
with a private /root (home, `~/.cache/mnist-pipeline`, `~/.ray`) and /tmp (Ray's session folders); see
private_disks.py. What every node sees: the installed software, the MNIST mirror, and `shared`, the folder that
stands in for an NFS mount (use it as `run.root` with `run.shared_filesystem=true`). Drivers run *on* a node
(`command()`: the head by default, as `ray submit` and Ray Jobs do), never on the test machine itself.

Token authentication is on when asked for: the token is written into each node's own ~/.ray/auth_token, as a
launcher would distribute it, and a client on the test machine passes it in `RAY_AUTH_TOKEN`.

Every node uses ports of its own, so the cluster never joins or stops another Ray on the machine. Teardown kills
exactly the processes in the cluster's mount namespaces, never with `ray stop`.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from private_disks import private_disk_script, software_paths

RAY = str(Path(sys.executable).parent / "ray")
MNIST = Path(os.environ.get("MNIST_MIRROR", Path(__file__).resolve().parents[2] / "shared" / "mnist")).resolve()

ENV = {
    **os.environ,
    "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",  # `python` is this environment's
    "RAY_AUTH_MODE": "disabled",  # explicit for every process: a token in ~/.ray would otherwise split the nodes
    "RAY_ADDRESS": "",
    # notice a dead node within seconds instead of the default ~30 s
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
for _inherited in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
    ENV.pop(_inherited, None)


@dataclass(frozen=True)
class Node:
    """One node's resources: CPUs, GPUs (Ray accepts GPUs a machine does not have) and custom resources."""

    cpus: int = 1
    gpus: int = 0
    resources: dict[str, float] = field(default_factory=dict)

    def ray_start_options(self) -> list[str]:
        options = [f"--num-cpus={self.cpus}"]
        if self.gpus:
            options.append(f"--num-gpus={self.gpus}")
        if self.resources:
            options.append(f"--resources={json.dumps(self.resources)}")
        return options


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayNodes:
    """A head and workers, each on its own private disks; see the module docstring.

    Args:
      workers: how many 1-CPU workers, or the resources of each worker.
      head: the head's resources (default: 1 CPU).
      dashboard: start the dashboard (and with it the Jobs API) on the head.
      auth: token authentication on every node; the token is `self.token`.
      work: the folder that holds every node's folder and the shared one (a test's tmp_path).
    """

    def __init__(self, workers: int | list[Node], *, work: Path, head: Node = Node(), dashboard: bool = False,
                 auth: bool = False):
        specs = [Node() for _ in range(workers)] if isinstance(workers, int) else list(workers)
        self.base = Path(tempfile.mkdtemp(prefix="nodes", dir=work))
        self.shared = self.base / "shared"  # the run root every node mounts, like NFS
        self.shared.mkdir()
        self.token = secrets.token_hex(32) if auth else None
        self.env = {**ENV, "RAY_AUTH_MODE": "token" if auth else "disabled"}
        self.gcs_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_port = free_port()
        self.node_manager_ports: list[int] = []  # head first
        self._anchors: list[subprocess.Popen] = []  # one process per node holding its mount namespace
        try:
            self._start(0, head, "--head", f"--port={self.gcs_port}", f"--ray-client-server-port={free_port()}",
                        f"--include-dashboard={str(dashboard).lower()}", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={self.dashboard_port}")
            for index, spec in enumerate(specs, start=1):
                self._start(index, spec, f"--address={self.address}")
            self.wait_for_nodes(len(specs) + 1)
        except BaseException:
            self.shutdown()
            raise

    # --- nodes ---------------------------------------------------------------------------------------------------

    def node_dir(self, index: int) -> Path:
        """The node's own folder on the test machine: `root/` is its /root, `tmp/` its /tmp."""
        return self.base / f"node{index}"

    def _start(self, index: int, spec: Node, *options: str) -> None:
        home = self.node_dir(index) / "root"
        if self.token:  # distributed like a launcher does: a file in the node's own home, readable by its user only
            (home / ".ray").mkdir(parents=True)
            (home / ".ray" / "auth_token").write_text(self.token)
            (home / ".ray" / "auth_token").chmod(0o600)
        script = private_disk_script(self.node_dir(index), [*software_paths(), MNIST, self.shared])
        anchor = subprocess.Popen(  # holds the namespace; says `ready` once the disks are in place
            ["unshare", "--mount", "--propagation", "private", "bash", "-c",
             f"{script}\necho ready\nexec sleep infinity"],
            stdout=subprocess.PIPE, text=True, start_new_session=True,
        )
        self._anchors.append(anchor)
        if anchor.stdout.readline().strip() != "ready":
            raise RuntimeError(f"node {index}: could not set up its private disks")
        port = free_port()
        self.node_manager_ports.append(port)
        subprocess.run(
            self.command(
                RAY, "start", *options, *spec.ray_start_options(), "--object-store-memory=300000000",
                f"--node-manager-port={port}", f"--dashboard-agent-listen-port={free_port()}",
                f"--metrics-export-port={free_port()}", "--disable-usage-stats", node=index,
            ),
            check=True, capture_output=True, env=self.env, timeout=120,
        )

    def command(self, *argv: str, node: int = 0, cwd: Path | str = "/") -> list[str]:
        """`argv` as run on a node (the head by default), in `cwd`: inside its mount namespace, with its disks."""
        return ["nsenter", "-t", str(self._anchors[node].pid), "-m", f"--wd={cwd}", "--", *map(str, argv)]

    def nodes(self) -> list[dict]:
        """Alive nodes as [{"node_id", "node_manager_port", "cpus"}], through a throwaway driver on the head."""
        script = (
            "import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False);"
            "print(json.dumps([{'node_id': n['NodeID'], 'node_manager_port': n['NodeManagerPort'],"
            " 'cpus': n['Resources'].get('CPU', 0)} for n in ray.nodes() if n['Alive']]))" % self.address
        )
        result = subprocess.run(
            self.command(sys.executable, "-c", script), capture_output=True, text=True, env=self.env, timeout=60
        )
        return json.loads(result.stdout.strip().splitlines()[-1])

    def wait_for_nodes(self, count: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.nodes()) != count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster did not reach {count} alive nodes")
            time.sleep(1)

    def node_id_of(self, node_manager_port: int) -> str:
        return next(n["node_id"] for n in self.nodes() if n["node_manager_port"] == node_manager_port)

    def index_of(self, node_id: str) -> int:
        port = next(n["node_manager_port"] for n in self.nodes() if n["node_id"] == node_id)
        return self.node_manager_ports.index(port)

    def kill_node(self, index: int) -> int:
        """SIGKILLs every process of node `index`, as a machine crash would; returns how many."""
        return _kill_namespace(self._anchors[index].pid)

    def shutdown(self) -> None:
        """Ends every process of every node; their mounts go with them. The folders stay for the test to read."""
        for anchor in self._anchors:
            _kill_namespace(anchor.pid)
            anchor.wait(timeout=30)


def _namespace_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _kill_namespace(anchor_pid: int) -> int:
    """SIGKILLs every process in the mount namespace that `anchor_pid` holds (the anchor included).

    Ray renames its worker processes and daemonizes its servers, so neither command lines nor parentage find them
    all; the namespace does. Killing until none is left covers processes forked meanwhile.
    """
    namespace = _namespace_of(anchor_pid)
    if namespace is None or namespace == _namespace_of(os.getpid()):
        return 0
    killed: set[int] = set()
    for _ in range(50):
        doomed = [
            int(entry.name) for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and _namespace_of(int(entry.name)) == namespace
        ]
        if not doomed:
            break
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    return len(killed)
