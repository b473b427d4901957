"""The cluster launcher for real: `ray up` of clusters/onprem.yaml onto three SSH hosts on this machine that share
nothing but the run root (network, PID and mount namespaces, see netns_hosts.py), with token authentication on;
`ray submit CONFIG pipeline` as users type it (no arguments: the cluster's own config) and with an explicit
`-- run --config mnist-pipeline/configs/cluster.yaml`, both to completion; `ray down`.

The launcher config is clusters/onprem.yaml itself, with only what differs on test hosts replaced: their
addresses, the SSH login and key, where the project is, no package install (the hosts share this test's
environment instead of building their own), sizing (three hosts share two cores), and the config a bare
`ray submit` runs: one in the shared folder, pointed at the shared run root and a slice of MNIST. Everything else
(token authentication, the default `data.cache_dir`) is as users get it.
"""

import contextlib
import getpass
import json
import os
import shutil
import stat
import subprocess
import time
from hashlib import sha256
from pathlib import Path

import pytest
import yaml
from netns_hosts import VENV_BIN, NetnsHosts, missing_prerequisites
from run_data import dataset_file

REPO = Path(__file__).resolve().parent.parent
RAY = f"{VENV_BIN}/ray"
SLICE = {"max_train_images": 1000, "validation_size": 200, "max_test_images": 200}
TRAIN = {"epochs": 1, "num_samples": 2, "scheduler": "fifo", "search_space": {}}

why_not = missing_prerequisites()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(why_not is not None, reason=f"launcher test: {why_not}")]


def launcher_config(hosts: NetnsHosts, name: str, submit_config: Path) -> dict:
    config = yaml.safe_load((REPO / "clusters" / "onprem.yaml").read_text())
    config["cluster_name"] = name
    config["provider"].update(head_ip=hosts.ips[0], worker_ips=hosts.ips[1:])
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(hosts.key)}
    config["min_workers"] = config["max_workers"] = len(hosts.ips) - 1
    config["file_mounts"] = {"~/mnist-pipeline": str(REPO)}
    config["setup_commands"] = [c for c in config["setup_commands"] if "pip install" not in c]
    names_config = [c for c in config["head_setup_commands"] if "~/pipeline/config-path" in c]
    assert len(names_config) == 1, config["head_setup_commands"]
    config["head_setup_commands"] = [
        f"echo {submit_config} > ~/pipeline/config-path" if c in names_config else c
        for c in config["head_setup_commands"]
    ]
    # Three hosts share two cores: one CPU and a small object store each, and fixed ports for the node's agents (each
    # host has its own network) so that a raylet never gives up waiting for a slow agent to report the port it took
    sizing = (
        " --num-cpus=1 --object-store-memory=300000000"
        " --dashboard-agent-grpc-port=52366 --metrics-export-port=52367 --runtime-env-agent-port=52368"
    )
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        config[key] = [c + sizing if "ray start" in c else c for c in config[key]]
    return config


class Launcher:
    """Runs commands in the launcher namespace and keeps everything they printed (to look for the token in)."""

    def __init__(self, hosts: NetnsHosts, config_file: Path, env: dict):
        self.hosts, self.config_file, self.env = hosts, config_file, env
        self.console: list[str] = []

    def __call__(self, *command: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(
            self.hosts.in_launcher(*command), capture_output=True, text=True, env={**self.env, **(env or {})},
            cwd=REPO, timeout=timeout,
        )
        self.console += [result.stdout, result.stderr]
        return result

    def ray(self, verb: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self(RAY, verb, str(self.config_file), *args, timeout=timeout)

    def on_head(self, command: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return self.ray("exec", "--no-config-cache", command, timeout=timeout)


def alive_nodes(launcher: Launcher) -> dict[str, str]:
    """Node id -> address of every live node, asked on the head."""
    script = (
        "import json, ray; ray.init(address='auto', logging_level='ERROR', log_to_driver=False); "
        "print('ALIVE', json.dumps({n['NodeID']: n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']}))"
    )
    result = launcher.on_head(f'python -c "{script}"', timeout=120)
    lines = [line for line in result.stdout.splitlines() if line.startswith("ALIVE")]
    return json.loads(lines[-1].split(maxsplit=1)[1]) if lines else {}


def finished_run(folder: Path) -> dict:
    """The run's metrics after checking that it finished with every trial, on two nodes at least, and its model."""
    metrics = json.loads((folder / "metrics.json").read_text())
    nodes = {node for trial in metrics["trials"] for node in trial["nodes"]}
    assert len(metrics["trials"]) == TRAIN["num_samples"], metrics["trials"]
    assert all(t["status"] == "TERMINATED" for t in metrics["trials"]), metrics["trials"]
    assert len(nodes) >= 2, f"all trials ran on {nodes}"
    assert (folder / "model" / "model.keras").is_file()
    return metrics


def data_nodes(folder: Path) -> tuple[set[str], set[str]]:
    """The nodes the run's download and preprocess stages ran on, from its stages.json."""
    records = json.loads((folder / "stages.json").read_text())
    return {records["download"]["outputs"]["node"]}, {records["preprocess"]["outputs"]["node"]}


def files_holding(secret: str, folders: list[Path]) -> list[Path]:
    needle = secret.encode()
    found = []
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 64 << 20:
                if needle in path.read_bytes():
                    found.append(path)
    return found


def test_ray_up_submit_down_on_three_hosts_sharing_only_the_run_root(tmp_path, mnist_mirror):
    started = time.monotonic()
    shared = tmp_path / "shared"  # the NFS export: the one folder every host sees, at the same path
    shared.mkdir()
    runs = shared / "runs"
    launcher_tmp = tmp_path / "launcher-tmp"  # the launcher's cluster state and config cache, not the machine's /tmp
    launcher_tmp.mkdir()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "", "TMPDIR": str(launcher_tmp)}
    for inherited in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(inherited, None)
    name = f"mnist-test-{os.getpid()}"
    config_file = tmp_path / "onprem-test.yaml"
    submit_config = shared / "submit-config.yaml"  # what a bare `ray submit ... pipeline` runs on this cluster
    token_copy = tmp_path / "client" / "mnist-onprem.token"  # a Jobs client's copy, fetched as the README says
    token_copy.parent.mkdir()
    hosts = NetnsHosts(3, tmp_path, visible=[mnist_mirror, shared])
    launcher = Launcher(hosts, config_file, env)
    head = hosts.ips[0]
    try:
        submit_config.write_text(yaml.safe_dump({
            "run": {"root": str(runs), "shared_filesystem": True},
            # download on one worker, preprocess on the other: what one node hands the next crosses the network
            "ray": {"stage_resources": {"download": {f"node:{hosts.ips[1]}": 0.01},
                                        "preprocess": {f"node:{hosts.ips[2]}": 0.01}}},
            "data": {"mirrors": [str(mnist_mirror)], **SLICE},
            "train": TRAIN,
        }))
        config_file.write_text(yaml.safe_dump(launcher_config(hosts, name, submit_config)))
        up = launcher.ray("up", "-y", "--no-config-cache", timeout=600)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        deadline = time.monotonic() + 240
        while len(nodes := alive_nodes(launcher)) < 3:
            assert time.monotonic() < deadline, f"the autoscaler did not start Ray on both workers: {nodes}"
            time.sleep(3)
        host_of = {node: hosts.ips.index(address) for node, address in nodes.items()}

        # Token authentication: refused without the token, served with it (the GCS, and the Jobs API)
        fetch = launcher.ray("rsync-down", "~/.ray/auth_token", str(token_copy))
        assert fetch.returncode == 0 and token_copy.stat().st_size > 0, fetch.stdout[-2000:] + fetch.stderr[-2000:]
        with_token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_copy)}
        refused = launcher(RAY, "status", f"--address={head}:6379", timeout=120)
        assert refused.returncode != 0 and "InvalidAuthToken" in refused.stdout + refused.stderr, refused.stderr[-2000:]
        served = launcher(RAY, "status", f"--address={head}:6379", timeout=120, env=with_token)
        assert served.returncode == 0 and "Active:" in served.stdout, served.stdout[-2000:] + served.stderr[-2000:]
        jobs_refused = launcher.on_head("RAY_AUTH_MODE=disabled ray job list --address=http://127.0.0.1:8265")
        assert "Unauthorized: Missing authentication token" in jobs_refused.stdout + jobs_refused.stderr
        jobs_served = launcher.on_head("ray job list --address=http://127.0.0.1:8265")
        assert "JobDetails" in jobs_served.stdout + jobs_served.stderr, jobs_served.stdout[-2000:]

        # `ray submit CONFIG pipeline` exactly as users type it: the cluster's own config
        bare = launcher.ray("submit", "--no-config-cache", "pipeline", timeout=900)
        assert bare.returncode == 0, bare.stdout[-4000:] + bare.stderr[-4000:]
        assert f"run --config {submit_config}" in bare.stdout + bare.stderr
        (bare_run,) = [folder for folder in runs.iterdir() if (folder / ".mnist-pipeline-run").is_file()]
        assert f"run {bare_run.name} finished" in bare.stdout

        # ... and the README's form, with a config of the project relative to the head's home
        explicit = launcher.ray(
            "submit", "--no-config-cache", "pipeline", "--",
            "run", "--config", "mnist-pipeline/configs/cluster.yaml", "--run-id", "explicit",
            "--set", f"run.root={runs}", "--set", "run.shared_filesystem=true",
            "--set", f"'data.mirrors=[{mnist_mirror}]'",  # the head's shell reads these arguments: quoted
            *[arg for key, value in SLICE.items() for arg in ("--set", f"data.{key}={value}")],
            *[arg for key, value in TRAIN.items() for arg in ("--set", f"'train.{key}={json.dumps(value)}'")],
            "--set", "train.cpus_per_trial=1", "--set", "train.gpus_per_trial=0",  # CPU hosts, one CPU each
            "--set", "train.mixed_precision=false",
            timeout=900,
        )
        assert explicit.returncode == 0, explicit.stdout[-4000:] + explicit.stderr[-4000:]
        assert "run explicit finished" in explicit.stdout
    finally:
        try:
            down = launcher.ray("down", "-y", timeout=300) if config_file.exists() else None
        finally:
            hosts.teardown()
            controls = Path(f"/tmp/ray_ssh_{sha256(getpass.getuser().encode()).hexdigest()[:10]}")
            shutil.rmtree(controls / sha256(name.encode()).hexdigest()[:10], ignore_errors=True)  # the launcher's
            with contextlib.suppress(OSError):  # SSH control sockets, and their folder unless others use it
                controls.rmdir()
    assert down.returncode == 0, down.stdout[-2000:] + down.stderr[-2000:]
    print(f"launcher test: up + 2 submits + down in {time.monotonic() - started:.1f}s")

    finished_run(bare_run)
    finished_run(runs / "explicit")

    # What the hosts wrote outside the run root stayed on their own disks
    assert sorted(p.name for p in shared.iterdir()) == ["runs", "submit-config.yaml"]
    assert sorted(p.name for p in runs.iterdir()) == sorted([bare_run.name, "explicit", ".datasets"])
    # the splits: once each on the shared root, where both runs' manifests point (no copy in the run folders)
    copies = {dataset_file(run).parent for run in (bare_run, runs / "explicit")}
    assert copies == set((runs / ".datasets").iterdir()) and all((copy / "dataset.npz").is_file() for copy in copies)
    leaked = [p for p in shared.rglob("*") if "ubyte" in p.name or p.name in (".cache", "mnist-pipeline", ".ray")]
    assert not leaked, f"the download cache or Ray's files in the shared folder: {leaked}"
    (downloaded, preprocessed), (downloaded_too, preprocessed_too) = data_nodes(bare_run), data_nodes(runs / "explicit")
    assert [host_of[node] for node in downloaded] == [1] and [host_of[node] for node in preprocessed] == [2]
    downloaded, preprocessed = downloaded | downloaded_too, preprocessed | preprocessed_too
    for index in range(3):
        home = hosts.host_dir(index) / "root"
        cache = home / ".cache" / "mnist-pipeline"
        node = next(node for node, host in host_of.items() if host == index)
        assert (cache / "train-images-idx3-ubyte").is_file() == (node in downloaded), (index, sorted(cache.rglob("*")))
        assert cache.is_dir() == (node in downloaded | preprocessed), index
        assert (home / "mnist-pipeline" / "pyproject.toml").is_file()  # `ray up` copied the project to every host
        assert list((hosts.host_dir(index) / "tmp" / "ray").glob("session_2*"))  # Ray's sessions: in its own /tmp

    # The token: the head's, on every host, readable by its user only; nowhere else
    token = token_copy.read_text().strip()
    for index in range(3):
        on_host = hosts.host_dir(index) / "root" / ".ray" / "auth_token"
        assert on_host.read_text().strip() == token and stat.S_IMODE(on_host.stat().st_mode) == 0o600, index
    assert stat.S_IMODE(token_copy.stat().st_mode) == 0o600
    assert not [text for text in launcher.console if token in text], "the token was printed"
    hosts_ray = [hosts.host_dir(index) / "tmp" / "ray" for index in range(3)]
    assert not files_holding(token, [shared, *hosts_ray]), "the token is in a run folder or a Ray log"
