"""The launcher configs pass Ray's own schema, offline, and keep the security and layout promises; the entry point
of `ray submit CONFIG pipeline` runs the cluster's own config when given no arguments."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from pipeline.config_loading import load_config

REPO = Path(__file__).resolve().parent.parent
LAUNCHER_CONFIGS = ["cluster.yaml", "clusters/onprem.yaml"]


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_rays_schema(name):
    config = yaml.safe_load((REPO / name).read_text())
    validate_config(prepare_config(config))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_dashboard_stays_on_localhost_and_submit_has_its_entry_point(name):
    config = yaml.safe_load((REPO / name).read_text())
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert any("clusters/ray_submit_main.py ~/pipeline/__main__.py" in c for c in config["head_setup_commands"])
    assert any("requirements.lock" in c for c in config["setup_commands"])


def test_aws_cluster_opens_only_ssh_and_its_head_runs_no_trials():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    rules = config["provider"]["security_group"]["IpPermissions"]
    assert [(rule["FromPort"], rule["ToPort"]) for rule in rules] == [(22, 22)]
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    assert any(t.get("max_workers", 0) > 0 for t in config["available_node_types"].values())


def test_every_launcher_setting_carries_a_comment():
    for name in LAUNCHER_CONFIGS:
        for number, line in enumerate((REPO / name).read_text().splitlines(), 1):
            stripped = line.strip()
            is_section = stripped.endswith(":")  # a mapping header; its settings carry the comments
            if stripped and not stripped.startswith(("#", "- ")) and not is_section:
                assert "#" in line, f"{name}:{number} has no comment: {line!r}"


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_every_ray_runs_with_token_auth_and_the_heads_token_reaches_every_node(name):
    config = yaml.safe_load((REPO / name).read_text())
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert any("echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc" in c for c in config["setup_commands"])  # drivers
    made = [c for c in config["head_setup_commands"] if "get-auth-token --generate" in c]
    assert len(made) == 1 and "umask 077" in made[0] and "> /dev/null" in made[0]  # mode 600, never printed
    assert config["cluster_synced_files"] == ["~/.ray/auth_token"]
    assert "RAY_AUTH_MODE=disabled" not in (REPO / name).read_text()


@pytest.mark.parametrize("name, pipeline_config", [("cluster.yaml", "cluster"), ("clusters/onprem.yaml", "onprem")])
def test_a_bare_ray_submit_runs_the_clusters_own_config(name, pipeline_config):
    config = yaml.safe_load((REPO / name).read_text())
    named = f"echo ~/mnist-pipeline/configs/{pipeline_config}.yaml > ~/pipeline/config-path"
    assert named in config["head_setup_commands"]
    run = load_config(REPO / "configs" / f"{pipeline_config}.yaml").run
    assert run.root.startswith("s3://") or (run.root.startswith("/") and run.shared_filesystem)  # shared storage
    for number, line in enumerate((REPO / "configs" / f"{pipeline_config}.yaml").read_text().splitlines(), 1):
        if re.match(r"^\s*[A-Za-z_]+: *[^\s#]", line) or re.match(r"^\s*- ", line):  # a value, not a section
            assert "#" in line, f"configs/{pipeline_config}.yaml:{number} has no comment: {line!r}"


def _submitted_entry_point(tmp_path: Path, config_path: str | None) -> Path:
    """~/pipeline as `ray submit CONFIG pipeline` leaves it on the head: the entry point, the named config (or
    none), and a stand-in `pipeline` package that prints the arguments it got."""
    home = tmp_path / "pipeline"
    (home / "pipeline").mkdir(parents=True)
    shutil.copy(REPO / "clusters" / "ray_submit_main.py", home / "__main__.py")
    (home / "pipeline" / "__init__.py").write_text("")
    (home / "pipeline" / "__main__.py").write_text("import os, sys\nprint(sys.argv[1:], os.environ['RAY_ADDRESS'])\n")
    if config_path is not None:
        (home / "config-path").write_text(config_path + "\n")
    return home


def test_the_entry_point_without_arguments_runs_the_named_config_and_passes_arguments_through(tmp_path):
    home = _submitted_entry_point(tmp_path, "~/mnist-pipeline/configs/onprem.yaml")
    env = {**os.environ, "RAY_ADDRESS": ""}
    bare = subprocess.run([sys.executable, str(home)], capture_output=True, text=True, env=env, timeout=60)
    config = str(Path("~/mnist-pipeline/configs/onprem.yaml").expanduser())
    assert bare.returncode == 0 and bare.stdout.strip() == f"['run', '--config', '{config}'] auto", bare.stderr
    given = subprocess.run([sys.executable, str(home), "runs", "--config", "x.yaml"], capture_output=True,
                           text=True, env=env, timeout=60)
    assert given.stdout.strip() == "['runs', '--config', 'x.yaml'] auto", given.stderr


def test_the_entry_point_without_arguments_or_a_named_config_says_what_to_give(tmp_path):
    home = _submitted_entry_point(tmp_path, None)
    bare = subprocess.run([sys.executable, str(home)], capture_output=True, text=True, timeout=60)
    assert bare.returncode == 1 and "-- run --config FILE" in bare.stderr and not bare.stdout
