"""A real multi-node Ray cluster on this machine: one `ray start --head` and worker nodes, each its own raylet.

Every node uses ports and a temp dir of its own and token auth is set explicitly, so the cluster never joins or
stops another Ray on the machine. Teardown kills exactly the processes of this cluster (found by its GCS port and
each node's node-manager port), never with `ray stop`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayNodes:
    def __init__(self, workers: int, cpus_per_node: int = 1, dashboard: bool = False):
        self.temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.gcs_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.node_manager_ports: list[int] = []  # head first
        self.dashboard_port = free_port()
        self._start("--head", f"--port={self.gcs_port}", f"--ray-client-server-port={free_port()}",
                    f"--include-dashboard={str(dashboard).lower()}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}", cpus=cpus_per_node)
        for _ in range(workers):
            self._start(f"--address={self.address}", cpus=cpus_per_node)
        self.wait_for_nodes(workers + 1)

    def _start(self, *args: str, cpus: int) -> None:
        port = free_port()
        subprocess.run(
            [RAY, "start", *args, f"--num-cpus={cpus}", "--object-store-memory=300000000",
             f"--node-manager-port={port}", f"--dashboard-agent-listen-port={free_port()}",
             "--disable-usage-stats"],
            check=True, capture_output=True, env=ENV, timeout=120,
        )
        self.node_manager_ports.append(port)

    def nodes(self) -> list[dict]:
        """Alive nodes as [{"node_id", "node_manager_port", "cpus"}], through a throwaway driver."""
        script = (
            "import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False);"
            "print(json.dumps([{'node_id': n['NodeID'], 'node_manager_port': n['NodeManagerPort'],"
            " 'cpus': n['Resources'].get('CPU', 0)} for n in ray.nodes() if n['Alive']]))" % self.address
        )
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=60)
        return json.loads(result.stdout.strip().splitlines()[-1])

    def wait_for_nodes(self, count: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.nodes()) != count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster did not reach {count} alive nodes")
            time.sleep(1)

    def node_id_of(self, node_manager_port: int) -> str:
        return next(n["node_id"] for n in self.nodes() if n["node_manager_port"] == node_manager_port)

    def kill_node(self, node_manager_port: int) -> int:
        """SIGKILLs a node's raylet and every process it started, as a machine crash would; returns how many."""
        return _kill_trees([rf"node[-_]manager[-_]port={node_manager_port}\b"])

    def shutdown(self) -> None:
        patterns = [rf":{self.gcs_port}\b", re.escape(self.temp_dir)]
        patterns += [rf"node[-_]manager[-_]port={port}\b" for port in self.node_manager_ports]
        _kill_trees(patterns)


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        table[int(entry.name)] = (parent, command)
    return table


def _kill_trees(patterns: list[str]) -> int:
    """SIGKILLs the processes whose command line matches a pattern, with all their descendants.

    Descendants matter: Ray renames its worker processes (ray::IDLE...), so only their parentage ties them to a node.
    """
    table = _processes()
    doomed = {pid for pid, (_, command) in table.items() if any(re.search(p, command) for p in patterns)}
    doomed.discard(os.getpid())
    while True:
        children = {pid for pid, (parent, _) in table.items() if parent in doomed} - doomed - {os.getpid()}
        if not children:
            break
        doomed |= children
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(doomed)
