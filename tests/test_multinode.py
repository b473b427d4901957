"""The pipeline on a real multi-node Ray cluster on this machine (`ray start` head + workers, one CPU each).

Nodes here share one disk, which stands in for the NFS mount a real cluster would give `run.root`.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ray_nodes import ENV, RayNodes

REPO = Path(__file__).resolve().parent.parent

SMALL_RUN = [
    "--set", "data.max_train_images=2000",
    "--set", "data.validation_size=400",
    "--set", "data.max_test_images=500",
    "--set", "train.scheduler=fifo",
    "--set", "train.search_space={}",
    "--set", "train.cpus_per_trial=1",
]


def pipeline_command(address, root, cache, mirror, *settings):
    return [
        sys.executable, "-m", "pipeline", "run", "--address", address, "--run-id", "multinode",
        "--set", f"run.root={root}", "--set", f"data.cache_dir={cache}", "--set", f"data.mirrors=[{mirror}]",
        *SMALL_RUN, *settings,
    ]


@pytest.fixture(scope="module")
def cluster():
    nodes = RayNodes(workers=2)
    yield nodes
    nodes.shutdown()


def test_a_local_run_root_is_refused_on_several_nodes(cluster, tmp_path, mnist_mirror):
    result = subprocess.run(
        pipeline_command(cluster.address, tmp_path / "runs", tmp_path / "cache", mnist_mirror),
        capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert "is a local folder but the cluster has (or may grow to) 3 nodes" in error
    assert "run.shared_filesystem=true" in error
    assert not (tmp_path / "runs" / "multinode").exists()


def test_trials_spread_over_the_nodes(cluster, tmp_path, mnist_mirror):
    started = time.monotonic()
    result = subprocess.run(
        pipeline_command(
            cluster.address, tmp_path / "runs", tmp_path / "cache", mnist_mirror,
            "--set", "run.shared_filesystem=true", "--set", "train.num_samples=3", "--set", "train.epochs=2",
        ),
        capture_output=True, text=True, cwd=REPO, env=ENV, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"multi-node run: {time.monotonic() - started:.1f}s")
    folder = tmp_path / "runs" / "multinode"
    metrics = json.loads((folder / "metrics.json").read_text())
    nodes = {node for trial in metrics["trials"] for node in trial["nodes"]}
    assert len(metrics["trials"]) == 3 and all(t["status"] == "TERMINATED" for t in metrics["trials"])
    assert len(nodes) >= 2, f"all trials ran on {nodes}"
    assert nodes <= {node["node_id"] for node in cluster.nodes()}
    assert f"on {len(nodes)} nodes" in result.stdout
    import keras

    with np.load(folder / "data" / "dataset.npz") as dataset:
        images, labels = dataset["test_images"], dataset["test_labels"]
    model = keras.models.load_model(folder / "model" / "model.keras", safe_mode=True)
    accuracy = float(np.mean(model.predict(images, verbose=0).argmax(axis=1) == labels))
    assert metrics["test_accuracy"] == pytest.approx(accuracy, abs=1e-9)


def test_a_trial_survives_the_loss_of_its_node(tmp_path, mnist_mirror):
    """Kill a worker node (raylet and every process it started) while a trial trains there."""
    started = time.monotonic()
    nodes, process = RayNodes(workers=2), None
    try:
        workers = {nodes.node_id_of(port): port for port in nodes.node_manager_ports[1:]}
        process = subprocess.Popen(
            pipeline_command(
                nodes.address, tmp_path / "runs", tmp_path / "cache", mnist_mirror,
                "--set", "run.shared_filesystem=true", "--set", "train.num_samples=2", "--set", "train.epochs=6",
                "--set", "train.max_failures=3",
            ),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=ENV,
        )
        tune_dir = tmp_path / "runs" / "multinode" / "tune"
        victim, deadline = None, time.monotonic() + 300
        while victim is None and process.poll() is None and time.monotonic() < deadline:
            for result_file in tune_dir.glob("*/result.json"):
                rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
                on_worker = [row for row in rows if row.get("node_id") in workers and row["epoch"] < 5]
                if on_worker:
                    victim = (result_file.parent, on_worker[-1]["node_id"])
                    break
            time.sleep(0.5)
        assert victim is not None, "no trial reported an epoch from a worker node"
        trial_folder, node_id = victim
        assert nodes.kill_node(workers[node_id]) >= 1
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-4000:]
        print(f"node-failure run: {time.monotonic() - started:.1f}s")
    finally:
        if process is not None and process.poll() is None:
            process.kill()
        nodes.shutdown()

    rows = [json.loads(line) for line in (trial_folder / "result.json").read_text().splitlines()]
    epochs = [row["epoch"] for row in rows]
    print(f"node loss: epochs {epochs} on nodes {[row['node_id'][:8] for row in rows]}; killed {node_id[:8]}")
    assert epochs[-1] == 6 and epochs.count(1) == 1, f"not resumed from its checkpoint: epochs {epochs}"
    assert node_id in {row["node_id"] for row in rows} and len({row["node_id"] for row in rows}) >= 2
    metrics = json.loads((tmp_path / "runs" / "multinode" / "metrics.json").read_text())
    assert all(t["status"] == "TERMINATED" for t in metrics["trials"])


def test_ray_job_submit_runs_the_pipeline(tmp_path, mnist_mirror):
    """Ray's Jobs path: `ray job submit --working-dir . -- python -m pipeline run ...` joins the cluster by itself."""
    nodes = RayNodes(workers=1, dashboard=True)
    try:
        command = pipeline_command("auto", tmp_path / "runs", tmp_path / "cache", mnist_mirror,
                                   "--set", "run.shared_filesystem=true", "--set", "train.num_samples=2",
                                   "--set", "train.epochs=1")
        command = ["python", *command[1:]]
        command.remove("--address")
        command.remove("auto")
        for _ in range(30):  # the head's job agent takes a few seconds after `ray start` to accept jobs
            result = subprocess.run(
                [str(Path(sys.executable).parent / "ray"), "job", "submit",
                 "--address", f"http://127.0.0.1:{nodes.dashboard_port}", "--working-dir", ".", "--", *command],
                capture_output=True, text=True, cwd=REPO, env=ENV, timeout=600,
            )
            if "No available agent to submit job" not in result.stdout + result.stderr:
                break
            time.sleep(2)
    finally:
        nodes.shutdown()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "run multinode finished" in result.stdout
    metrics = json.loads((tmp_path / "runs" / "multinode" / "metrics.json").read_text())
    assert len(metrics["trials"]) == 2
