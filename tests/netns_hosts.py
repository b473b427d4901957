"""Separate hosts on one machine for launcher tests: a network namespace and a PID namespace per host, sshd as its
PID 1, a private /root and /tmp/ray, all hosts on one bridge.

Killing a host's sshd ends every process of that host (a real crash); `ray stop` run on a host sees only that
host's processes, so nothing here can touch another Ray on the machine. Addresses live in a private range used only
inside these namespaces.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

VENV_BIN = str(Path(sys.executable).parent.resolve())


def missing_prerequisites() -> str | None:
    """Why this machine cannot host namespaced hosts, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, bind mounts)"
    for tool in ("ip", "unshare", "ssh", "ssh-keygen", "rsync"):
        if not shutil.which(tool):
            return f"needs {tool} on PATH"
    if not Path("/usr/sbin/sshd").exists():
        return "needs sshd (apt-get install openssh-server)"
    probe = f"mpprobe{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "cannot create network namespaces here"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=60)


class NetnsHosts:
    """`hosts` SSH hosts at 10.213.N.2, .3, ... plus a launcher namespace at .100 to run `ray up` from."""

    def __init__(self, hosts: int, work: Path):
        self.work = work
        tag = os.getpid() % 10000
        self.prefix = f"mp{tag}"
        subnet = f"10.213.{tag % 250}"
        self.bridge = f"{self.prefix}br"
        self.ips = [f"{subnet}.{2 + i}" for i in range(hosts)]
        self.launcher = f"{self.prefix}l"
        self.key = work / "id_ed25519"
        self._sshd: list[subprocess.Popen] = []
        self._namespaces = [self.bridge]
        _run("ip", "netns", "add", self.bridge)
        _run("ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.bridge, "link", "set", "br0", "up")
        for index, address in [(i, ip) for i, ip in enumerate(self.ips)] + [(99, f"{subnet}.100")]:
            namespace = self.launcher if index == 99 else f"{self.prefix}h{index}"
            self._attach(namespace, index, address)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "host_key")], check=True)
        for index, address in enumerate(self.ips):
            self._start_host(index, address)
        for address in self.ips:
            self._wait_for_ssh(address)

    def _attach(self, namespace: str, index: int, address: str) -> None:
        inside, outside = f"{self.prefix}v{index}", f"{self.prefix}b{index}"
        _run("ip", "netns", "add", namespace)
        self._namespaces.append(namespace)
        _run("ip", "link", "add", inside, "type", "veth", "peer", "name", outside)
        _run("ip", "link", "set", inside, "netns", namespace)
        _run("ip", "link", "set", outside, "netns", self.bridge)
        _run("ip", "-n", self.bridge, "link", "set", outside, "master", "br0", "up")
        _run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", inside)
        _run("ip", "-n", namespace, "link", "set", inside, "up")
        _run("ip", "-n", namespace, "link", "set", "lo", "up")

    def _start_host(self, index: int, address: str) -> None:
        home = self.work / f"host{index}" / "root"
        ray_tmp = self.work / f"host{index}" / "ray"
        (home / ".ssh").mkdir(parents=True)
        ray_tmp.mkdir()
        (home / ".ssh" / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        (home / "venv").symlink_to(Path(VENV_BIN).parent)  # the launcher configs call ~/venv/bin/ray
        (home / ".bashrc").write_text(
            f"export PATH={VENV_BIN}:$PATH\nexport RAY_AUTH_MODE=disabled\n"
        )
        config = self.work / f"host{index}" / "sshd_config"
        config.write_text(
            f"Port 22\nListenAddress {address}\nHostKey {self.work / 'host_key'}\nPidFile none\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nStrictModes no\nUsePAM no\n"
            f"AuthorizedKeysFile {home / '.ssh' / 'authorized_keys'}\n"
        )
        keep = ""  # the Python the venv links to may live under /root (pyenv): keep it visible in the new /root
        python_home = Path(sys.base_prefix)
        if python_home.is_relative_to("/root"):
            inside_home = home / python_home.relative_to("/root")
            inside_home.mkdir(parents=True)
            keep = f"mount --bind {python_home} {inside_home} && "
        script = (
            f"mkdir -p /run/sshd /tmp/ray && {keep}mount --rbind {home} /root && mount --bind {ray_tmp} /tmp/ray && "
            f"exec /usr/sbin/sshd -D -e -f {config}"
        )
        self._sshd.append(
            subprocess.Popen(
                ["ip", "netns", "exec", f"{self.prefix}h{index}", "unshare", "--mount", "--pid", "--fork",
                 "--mount-proc", "--propagation", "private", "bash", "-c", script],
                stdout=subprocess.DEVNULL, stderr=open(self.work / f"host{index}" / "sshd.log", "w"),
                start_new_session=True,
            )
        )

    def ssh_command(self, address: str, command: str) -> list[str]:
        return self.in_launcher(
            "ssh", "-i", str(self.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=3", f"root@{address}", command,
        )

    def in_launcher(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.launcher, *command]

    def _wait_for_ssh(self, address: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while subprocess.run(self.ssh_command(address, "true"), capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"sshd on {address} did not answer")
            time.sleep(0.5)

    def kill_host(self, index: int) -> None:
        """Ends the host's sshd, its PID 1: the kernel ends every process of the host with it."""
        process = self._sshd[index]
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)

    def teardown(self) -> None:
        for index in range(len(self._sshd)):
            self.kill_host(index)
        for namespace in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
