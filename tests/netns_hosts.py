"""Separate hosts on one machine for launcher tests: a network namespace and a PID namespace per host, sshd as its
PID 1, all hosts on one bridge, and private disks as real machines have (private_disks.py).

Each host's /root (its home: `~/.cache/mnist-pipeline`, `~/.ray`, what `ray up` copies there) and /tmp (Ray's
session folders) are folders of its own, `host_dir(i)/root` and `host_dir(i)/tmp` on the test machine. Of the test
machine's /root and /tmp a host sees only the installed software (the Python the environment runs on) and the
paths it is given as `visible` (the MNIST mirror, the one shared run root that stands in for an NFS mount), each at
its own path: not pytest's tmp_path, not the machine's caches. Its sshd's config, host key and authorized_keys live
in its own home. Outside /root and /tmp it sees the machine as it is (the repository and its environment).

Killing a host's sshd ends every process of that host (a real crash) and with them its mount namespace; `ray stop`
run on a host sees only that host's processes, so nothing here can touch another Ray on the machine. Addresses
live in a private range used only inside these namespaces.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from private_disks import private_disk_script, software_paths

VENV_BIN = str(Path(sys.executable).parent.resolve())


def missing_prerequisites() -> str | None:
    """Why this machine cannot host namespaced hosts, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, bind mounts)"
    for tool in ("ip", "unshare", "mount", "ssh", "ssh-keygen", "rsync"):
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
    """`hosts` SSH hosts at 10.213.N.2, .3, ... plus a launcher namespace at .100 to run `ray up` from.

    Args:
      hosts: how many hosts.
      work: the test's folder (tmp_path): holds each host's folder and the launcher's SSH key.
      visible: paths every host sees at the same place besides the installed software (the MNIST mirror, the
        shared run root); everything else under /root and /tmp is the host's own.
    """

    def __init__(self, hosts: int, work: Path, visible: list[Path] = ()):
        self.work = work
        self.visible = [*software_paths(), *visible]
        tag = os.getpid() % 10000
        self.prefix = f"mp{tag}"
        subnet = f"10.213.{tag % 250}"
        self.bridge = f"{self.prefix}br"
        self.ips = [f"{subnet}.{2 + i}" for i in range(hosts)]
        self.launcher = f"{self.prefix}l"
        self.key = work / "id_ed25519"
        self._sshd: list[subprocess.Popen] = []
        self._logs: list = []
        self._namespaces = [self.bridge]
        try:
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
        except BaseException:
            self.teardown()
            raise

    def _attach(self, namespace: str, index: int, address: str) -> None:
        inside, outside = f"{self.prefix}v{index}", f"{self.prefix}b{index}"
        self._namespaces.append(namespace)
        _run("ip", "netns", "add", namespace)
        _run("ip", "link", "add", inside, "type", "veth", "peer", "name", outside)
        _run("ip", "link", "set", inside, "netns", namespace)
        _run("ip", "link", "set", outside, "netns", self.bridge)
        _run("ip", "-n", self.bridge, "link", "set", outside, "master", "br0", "up")
        _run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", inside)
        _run("ip", "-n", namespace, "link", "set", inside, "up")
        _run("ip", "-n", namespace, "link", "set", "lo", "up")

    def host_dir(self, index: int) -> Path:
        """The host's own folder on the test machine: `root/` is its /root, `tmp/` its /tmp."""
        return self.work / f"host{index}"

    def _start_host(self, index: int, address: str) -> None:
        home = self.host_dir(index) / "root"
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh" / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        (home / "venv").symlink_to(Path(VENV_BIN).parent)  # the launcher configs call ~/venv/bin/ray
        # the environment first on PATH; Ray's settings (RAY_AUTH_MODE) come from the launcher config's setup_commands
        (home / ".bashrc").write_text(f"export PATH={VENV_BIN}:$PATH\n")
        sshd = home / ".sshd"  # the host's sshd files, in its own home: the test machine's /tmp is out of its sight
        sshd.mkdir()
        shutil.copy2(self.work / "host_key", sshd / "host_key")
        (sshd / "sshd_config").write_text(
            f"Port 22\nListenAddress {address}\nHostKey /root/.sshd/host_key\nPidFile none\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nStrictModes no\nUsePAM no\n"
            "AuthorizedKeysFile /root/.ssh/authorized_keys\n"
        )
        script = (
            f"{private_disk_script(self.host_dir(index), self.visible)}\n"
            "mkdir -p /run/sshd\nexec /usr/sbin/sshd -D -e -f /root/.sshd/sshd_config"
        )
        self._logs.append(open(self.host_dir(index) / "sshd.log", "w"))
        self._sshd.append(
            subprocess.Popen(
                ["ip", "netns", "exec", f"{self.prefix}h{index}", "unshare", "--mount", "--pid", "--fork",
                 "--mount-proc", "--propagation", "private", "bash", "-c", script],
                stdout=subprocess.DEVNULL, stderr=self._logs[-1], start_new_session=True,
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
        for log in self._logs:
            log.close()
