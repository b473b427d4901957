"""The cluster launcher for real: `ray up` of clusters/onprem.yaml onto three SSH hosts on this machine (network and
PID namespaces, see netns_hosts.py), `ray submit ... pipeline -- run ...` to completion, `ray down`.

The launcher config is clusters/onprem.yaml itself, with only what differs on test hosts replaced: their
addresses, the SSH login and key, where the project is, and no package install (the hosts share this test's
environment instead of building their own).
"""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from netns_hosts import VENV_BIN, NetnsHosts, missing_prerequisites

REPO = Path(__file__).resolve().parent.parent
RAY = f"{VENV_BIN}/ray"
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}

why_not = missing_prerequisites()
pytestmark = pytest.mark.skipif(why_not is not None, reason=f"launcher test: {why_not}")


def launcher_config(hosts: NetnsHosts, name: str) -> dict:
    config = yaml.safe_load((REPO / "clusters" / "onprem.yaml").read_text())
    config["cluster_name"] = name
    config["provider"].update(head_ip=hosts.ips[0], worker_ips=hosts.ips[1:])
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(hosts.key)}
    config["min_workers"] = config["max_workers"] = len(hosts.ips) - 1
    config["file_mounts"] = {"~/mnist-pipeline": str(REPO)}
    config["setup_commands"] = [c for c in config["setup_commands"] if "pip install" not in c]
    return config


def alive_nodes(hosts: NetnsHosts, config_file: Path) -> int:
    script = (
        "import ray; ray.init(address='auto', logging_level='ERROR', log_to_driver=False); "
        "print('ALIVE', sum(n['Alive'] for n in ray.nodes()))"
    )
    result = subprocess.run(
        hosts.in_launcher(RAY, "exec", str(config_file), f'python -c "{script}"'),
        capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("ALIVE")]
    return int(lines[-1].split()[1]) if lines else 0


def test_ray_up_submit_down_on_three_hosts(tmp_path, mnist_mirror):
    started = time.monotonic()
    hosts = NetnsHosts(3, tmp_path)
    name = f"mnist-test-{os.getpid()}"
    config_file = tmp_path / "onprem-test.yaml"
    config_file.write_text(yaml.safe_dump(launcher_config(hosts, name)))
    runs = tmp_path / "runs"
    try:
        up = subprocess.run(
            hosts.in_launcher(RAY, "up", str(config_file), "-y", "--no-config-cache"),
            capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600,
        )
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        deadline = time.monotonic() + 180
        while alive_nodes(hosts, config_file) < 3:
            assert time.monotonic() < deadline, "the autoscaler did not start Ray on both workers"
            time.sleep(3)
        submit = subprocess.run(
            hosts.in_launcher(
                RAY, "submit", str(config_file), "pipeline", "--",
                "run", "--run-id", "launcher",
                "--set", f"run.root={runs}", "--set", "run.shared_filesystem=true",
                "--set", f"data.mirrors=[{mnist_mirror}]", "--set", f"data.cache_dir={tmp_path / 'cache'}",
                "--set", "data.max_train_images=2000", "--set", "data.validation_size=400",
                "--set", "data.max_test_images=500", "--set", "train.epochs=2", "--set", "train.num_samples=3",
                "--set", "train.scheduler=fifo", "--set", "'train.search_space={}'",
            ),
            capture_output=True, text=True, env=ENV, cwd=REPO, timeout=900,
        )
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
        assert "run launcher finished" in submit.stdout
    finally:
        down = subprocess.run(
            hosts.in_launcher(RAY, "down", str(config_file), "-y"),
            capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300,
        )
        hosts.teardown()
        for state in Path("/tmp").glob(f"cluster-{name}.*"):
            state.unlink()
    assert down.returncode == 0, down.stdout[-2000:] + down.stderr[-2000:]
    print(f"launcher test: up + submit + down in {time.monotonic() - started:.1f}s")

    metrics = json.loads((runs / "launcher" / "metrics.json").read_text())
    nodes = {node for trial in metrics["trials"] for node in trial["nodes"]}
    assert len(metrics["trials"]) == 3 and all(t["status"] == "TERMINATED" for t in metrics["trials"])
    assert len(nodes) >= 2, f"all trials ran on {nodes}"
    assert (runs / "launcher" / "model" / "model.keras").is_file()
