"""The pipeline on a real multi-node Ray cluster on this machine whose nodes share nothing but the run root.

Each node has its own home (so its own default `data.cache_dir`) and /tmp; the run root is one folder mounted on
every node like an NFS export (tests/ray_nodes.py, tests/private_disks.py). Drivers run on the head.
"""

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from private_disks import missing_prerequisites
from ray_nodes import RAY, Node, RayNodes
from run_data import dataset_file

REPO = Path(__file__).resolve().parent.parent
why_not = missing_prerequisites()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(why_not is not None, reason=f"multi-node tests: {why_not}")]

SMALL_RUN = [
    "--set", "data.max_train_images=2000",
    "--set", "data.validation_size=400",
    "--set", "data.max_test_images=500",
    "--set", "train.scheduler=fifo",
    "--set", "train.search_space={}",
    "--set", "train.cpus_per_trial=1",
]
CACHED_FILE = Path("root/.cache/mnist-pipeline/train-images-idx3-ubyte")  # in a node's folder: its default cache


def pipeline_args(address, root, mirror, *settings, run_id="multinode"):
    """A run with the default data.cache_dir: every node downloads into its own home."""
    return [
        "python", "-m", "pipeline", "run", "--address", address, "--run-id", run_id,
        "--set", f"run.root={root}", "--set", f"data.mirrors=[{mirror}]", *SMALL_RUN, *settings,
    ]


def run_on_head(cluster, args, timeout):
    return subprocess.run(cluster.command(*args, cwd=REPO), capture_output=True, text=True, env=cluster.env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head and two workers of one CPU each, with token authentication and the Jobs API. The workers carry a
    resource that pins a stage to them, and the second one a GPU (one Ray is told of: there is none), so that a
    trial asking for 2 CPUs and a GPU fits no single node although the cluster has both."""
    nodes = RayNodes(workers=[Node(resources={"downloader": 1}), Node(gpus=1, resources={"parser": 1})],
                     dashboard=True, auth=True, work=tmp_path_factory.mktemp("cluster"))
    yield nodes
    nodes.shutdown()


def test_a_local_run_root_is_refused_on_several_nodes(cluster, mnist_mirror):
    result = run_on_head(cluster, pipeline_args(cluster.address, "/tmp/runs", mnist_mirror), timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert "is a local folder but the cluster has (or may grow to) 3 nodes" in error
    assert "run.shared_filesystem=true" in error
    assert not (cluster.node_dir(0) / "tmp" / "runs" / "multinode").exists()


def test_trials_spread_over_nodes_that_share_only_the_run_root(cluster, mnist_mirror):
    """Download and preprocess on different nodes (each with its own cache), trials on every node, artifacts in
    the shared run root only."""
    started = time.monotonic()
    root = cluster.shared / "runs"
    result = run_on_head(cluster, pipeline_args(
        cluster.address, root, mnist_mirror,
        "--set", "run.shared_filesystem=true", "--set", "train.num_samples=3", "--set", "train.epochs=2",
        "--set", "ray.stage_resources={download: {downloader: 1}, preprocess: {parser: 1}}",
    ), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"multi-node run: {time.monotonic() - started:.1f}s")
    folder = root / "multinode"

    stages = json.loads((folder / "stages.json").read_text())
    download_node = stages["download"]["outputs"]["node"]
    preprocess_node = stages["preprocess"]["outputs"]["node"]
    assert download_node != preprocess_node, "the test means the hand-over between two nodes"
    downloaded_on, parsed_on = cluster.index_of(download_node), cluster.index_of(preprocess_node)
    assert (downloaded_on, parsed_on) == (1, 2)
    # the downloads are in the downloading node's own cache and nowhere else: preprocess got them through Ray
    assert [index for index in range(3) if (cluster.node_dir(index) / CACHED_FILE).is_file()] == [1]
    assert list((cluster.node_dir(2) / "root/.cache/mnist-pipeline/datasets").iterdir()), "split cached on node 2"
    assert sorted(p.name for p in cluster.shared.iterdir()) == ["runs"]

    metrics = json.loads((folder / "metrics.json").read_text())
    nodes = {node for trial in metrics["trials"] for node in trial["nodes"]}
    assert len(metrics["trials"]) == 3 and all(t["status"] == "TERMINATED" for t in metrics["trials"])
    assert len(nodes) >= 2, f"all trials ran on {nodes}"
    assert nodes <= {node["node_id"] for node in cluster.nodes()}
    assert f"on {len(nodes)} nodes" in result.stdout
    for trial in metrics["trials"]:  # what trials on other nodes wrote reached the run root
        trial_folder = next((folder / "tune").glob(f"*{trial['trial_id']}*"))
        assert list(trial_folder.glob("events.out.tfevents.*")), f"no TensorBoard file from {trial['trial_id']}"
        assert list(trial_folder.glob("checkpoint_*/model.keras"))
    for artifact in ("pipeline.log", "report.html", "summary.json", "data/manifest.json", "model/model.keras"):
        assert (folder / artifact).is_file(), artifact
    # the split: one copy on the shared run root, which the run references (node 2's cache is not shared)
    dataset = dataset_file(folder)
    assert dataset.parent.parent == folder.parent / ".datasets" and not (folder / "data" / "dataset.npz").exists()
    import keras

    with np.load(dataset) as dataset:
        images, labels = dataset["test_images"], dataset["test_labels"]
    model = keras.models.load_model(folder / "model" / "model.keras", safe_mode=True)
    accuracy = float(np.mean(model.predict(images, verbose=0).argmax(axis=1) == labels))
    assert metrics["test_accuracy"] == pytest.approx(accuracy, abs=1e-9)

    # resumed with its dataset damaged and its metrics lost: preprocess runs again, downloading on node 1 and
    # handing over through Ray once more (nothing is read from the driver's disk); training is kept
    dataset_file(folder).write_bytes(b"damaged")
    (folder / "metrics.json").unlink()
    resumed = run_on_head(cluster, ["python", "-m", "pipeline", "run", "--resume", str(folder),
                                    "--address", cluster.address], timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "stage preprocess: started" in resumed.stderr and "stage train: finished earlier" in resumed.stderr
    assert "is gone or changed" in resumed.stderr
    with np.load(dataset_file(folder)) as dataset:
        assert np.array_equal(dataset["test_labels"], labels)


def test_a_trial_needs_its_resources_on_one_node(cluster, mnist_mirror):
    """2 CPUs + 1 GPU fits no node (the GPU node has 1 CPU), though the cluster has 3 CPUs and a GPU; a stage's
    custom resource that no node offers is refused as well. Both before anything is written."""
    root = cluster.shared / "refused"
    refused = run_on_head(cluster, pipeline_args(
        cluster.address, root, mnist_mirror, "--set", "run.shared_filesystem=true",
        "--set", "train.cpus_per_trial=2", "--set", "train.gpus_per_trial=1",
    ), timeout=300)
    stage = run_on_head(cluster, pipeline_args(
        cluster.address, root, mnist_mirror, "--set", "run.shared_filesystem=true",
        "--set", "ray.stage_resources={download: {internet: 1}}",
    ), timeout=300)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    error = refused.stderr.strip().splitlines()[-1]
    assert "train.cpus_per_trial=2 with train.gpus_per_trial=1: no node has 2 CPU and 1 GPU together" in error
    assert "1 CPU and 0 GPU" in error and "1 CPU and 1 GPU" in error
    assert stage.returncode == 2 and "ray.stage_resources.download" in stage.stderr.strip().splitlines()[-1]
    assert not (root / "multinode").exists()


def test_a_trial_survives_the_loss_of_its_node(tmp_path, mnist_mirror):
    """Kill every process of a worker node while a trial trains there, as a machine crash would."""
    started = time.monotonic()
    nodes, process = RayNodes(workers=2, work=tmp_path), None
    try:
        workers = {nodes.node_id_of(port): index for index, port in enumerate(nodes.node_manager_ports) if index}
        root = nodes.shared / "runs"
        process = subprocess.Popen(
            nodes.command(*pipeline_args(
                nodes.address, root, mnist_mirror,
                "--set", "run.shared_filesystem=true", "--set", "train.num_samples=2", "--set", "train.epochs=6",
                "--set", "train.max_failures=3",
            ), cwd=REPO),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=nodes.env,
        )
        tune_dir = root / "multinode" / "tune"
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
    metrics = json.loads((root / "multinode" / "metrics.json").read_text())
    assert all(t["status"] == "TERMINATED" for t in metrics["trials"])


def test_ray_job_submit_with_token_auth(cluster, mnist_mirror):
    """Ray's Jobs path on a cluster with token authentication: a client without the token is refused; with it,
    `ray job submit --working-dir . -- python -m pipeline run ...` runs the pipeline, which joins the cluster by
    itself; the token appears nowhere in what the run shows or keeps."""
    nodes, root = cluster, cluster.shared / "jobs"
    address = f"http://127.0.0.1:{nodes.dashboard_port}"
    command = pipeline_args("auto", root, mnist_mirror, "--set", "run.shared_filesystem=true",
                            "--set", "train.num_samples=2", "--set", "train.epochs=1")
    command.remove("--address")
    command.remove("auto")
    with_token = {**nodes.env, "RAY_AUTH_TOKEN": nodes.token}
    refused = subprocess.run([RAY, "job", "list", "--address", address], capture_output=True, text=True,
                             cwd=REPO, env=nodes.env, timeout=120)
    for _ in range(30):  # the head's job agent takes a few seconds after `ray start` to accept jobs
        result = subprocess.run(
            [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--", *command],
            capture_output=True, text=True, cwd=REPO, env=with_token, timeout=600,
        )
        if "No available agent to submit job" not in result.stdout + result.stderr:
            break
        time.sleep(2)
    # `--address HOST:PORT` from the head with nothing but the token file in its home: joins (and then refuses
    # an impossible trial, which is quick); from a home without the token: refused in one clear line
    impossible = [*pipeline_args(nodes.address, root, mnist_mirror, "--set", "run.shared_filesystem=true",
                                 run_id="join"), "--set", "train.cpus_per_trial=64"]
    no_mode = {key: value for key, value in nodes.env.items() if key != "RAY_AUTH_MODE"}
    joined = subprocess.run(nodes.command(*impossible, cwd=REPO), capture_output=True, text=True,
                            env={**no_mode, "HOME": "/root"}, timeout=300)
    tokenless = subprocess.run(nodes.command(*impossible, cwd=REPO), capture_output=True, text=True,
                               env={**no_mode, "HOME": "/tmp"}, timeout=300)
    assert joined.returncode == 2 and "train.cpus_per_trial=64" in joined.stderr.strip().splitlines()[-1]
    assert tokenless.returncode == 2, tokenless.stderr[-2000:]
    assert "refused this client's authentication token" in tokenless.stderr.strip().splitlines()[-1]
    assert refused.returncode != 0, refused.stdout[-2000:]
    assert "token" in (refused.stdout + refused.stderr).lower()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "run multinode finished" in result.stdout
    metrics = json.loads((root / "multinode" / "metrics.json").read_text())
    assert len(metrics["trials"]) == 2
    assert nodes.token not in result.stdout + result.stderr
    for path in (root / "multinode").rglob("*"):
        if path.is_file():
            assert nodes.token.encode() not in path.read_bytes(), f"the token is in {path}"
