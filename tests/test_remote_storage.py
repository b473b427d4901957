"""A run whose root is object storage (s3://, through pyarrow as Tune uses it), against a local S3 server (moto).

Every artifact, Tune's checkpoints included, must land in the bucket; the evaluate stage reads the best
checkpoint back from it.
"""

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
MOTO = Path(sys.executable).parent / "moto_server"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_root():
    """s3://runs/experiments on a moto server on loopback, as a pyarrow URI; yields (uri, filesystem)."""
    import pyarrow.fs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.2)
        filesystem = pyarrow.fs.S3FileSystem(
            endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
            access_key="testing", secret_key="testing", allow_bucket_creation=True,
        )
        filesystem.create_dir("runs")
        yield f"s3://runs/experiments?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1", filesystem
    finally:
        server.kill()
        server.wait()


def test_a_run_on_object_storage(s3_root, tmp_path, mnist_mirror):
    import pyarrow.fs

    root, filesystem = s3_root
    result = subprocess.run(
        [
            sys.executable, "-m", "pipeline", "run", "--run-id", "remote",
            "--set", f"run.root={root}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", f"data.mirrors=[{mnist_mirror}]", "--set", "data.max_train_images=2000",
            "--set", "data.validation_size=400", "--set", "data.max_test_images=500", "--set", "train.epochs=2",
            "--set", "train.num_samples=2", "--set", "train.scheduler=fifo", "--set", "train.search_space={}",
            "--set", "ray.num_cpus=2", "--set", "ray.include_dashboard=false",
        ],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env={**os.environ, **CREDENTIALS, "RAY_ADDRESS": ""},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = {
        info.path.removeprefix("runs/experiments/remote/")
        for info in filesystem.get_file_info(pyarrow.fs.FileSelector("runs/experiments/remote", recursive=True))
        if info.type == pyarrow.fs.FileType.File
    }
    for artifact in ["config.yaml", "pipeline.log", "summary.json", "metrics.json",
                     "data/manifest.json", "model/model.keras", "model/hyperparameters.json"]:
        assert artifact in files, artifact
    assert "data/dataset.npz" not in files, "the run keeps a copy of its own beside the bucket's one"
    assert any(name.startswith("tune/") and name.endswith("checkpoint_000001/model.keras") for name in files)
    assert not (REPO / "s3:").exists(), "a URI root was mistaken for a local folder"

    def read(name):
        with filesystem.open_input_stream(f"runs/experiments/remote/{name}") as source:
            return source.read()

    metrics = json.loads(read("metrics.json"))
    assert metrics["checkpoint"].startswith("s3://runs/experiments/remote/tune/")
    import keras

    model_file = tmp_path / "model.keras"
    model_file.write_bytes(read("model/model.keras"))
    model = keras.models.load_model(model_file, safe_mode=True)
    # the split: once in the bucket, under the run root's .datasets/, named without the root's URI and query
    manifest = json.loads(read("data/manifest.json"))
    assert manifest["dataset_folder"] == f"../../.datasets/{manifest['fingerprint']}"
    with filesystem.open_input_stream(f"runs/experiments/.datasets/{manifest['fingerprint']}/dataset.npz") as source:
        npz = source.read()
    with np.load(io.BytesIO(npz)) as dataset:
        images, labels = dataset["test_images"], dataset["test_labels"]
    accuracy = float(np.mean(model.predict(images, verbose=0).argmax(axis=1) == labels))
    assert metrics["test_accuracy"] == pytest.approx(accuracy, abs=1e-9)

    # resumed from the bucket after losing the evaluation: training is read back from Tune's state there, evaluate
    # runs again and writes the same result
    filesystem.delete_file("runs/experiments/remote/metrics.json")
    filesystem.delete_file("runs/experiments/remote/model/model.keras")
    resumed = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--resume", "remote", "--set", f"run.root={root}"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env={**os.environ, **CREDENTIALS, "RAY_ADDRESS": ""},
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    for stage in ("download", "preprocess", "train"):
        assert f"stage {stage}: finished earlier" in resumed.stderr
    assert "stage evaluate: done" in resumed.stderr
    assert json.loads(read("metrics.json"))["test_accuracy"] == metrics["test_accuracy"]

    # resumed with a larger time budget: the search goes on in a second round, in the bucket too
    grown = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--resume", "remote", "--set", f"run.root={root}",
         "--set", "train.time_budget_s=3600"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env={**os.environ, **CREDENTIALS, "RAY_ADDRESS": ""},
    )
    assert grown.returncode == 0, grown.stdout[-3000:] + grown.stderr[-3000:]
    assert [r["finished"] for r in json.loads(read("tune/rounds.json"))["rounds"]] == [True, True]
    trials = json.loads(read("metrics.json"))["trials"]
    assert len(trials) == 4 and len({t["trial_id"].split("_")[0] for t in trials}) == 2  # two experiments' trials
    kept = {info.path for info in filesystem.get_file_info(
        pyarrow.fs.FileSelector("runs/experiments/remote/tune/continued-1", recursive=True))}
    assert sum(path.endswith("/model.keras") for path in kept) == 2, "each new trial's best checkpoint, in the bucket"
