"""The launcher configs pass Ray's own schema, offline, and keep the security and layout promises."""

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

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
