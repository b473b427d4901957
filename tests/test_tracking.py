"""MLflow tracking against a real MLflow tracking server on loopback (SQLite backend, local artifact store), read back
with MLflow's own client: the parent run, a child run per trial, the model registered; a server out of reach refuses
the run or, when tracking is not required, is a warning."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

mlflow = pytest.importorskip("mlflow", reason="MLflow is an optional extra: pip install -e '.[test]'")

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-pass"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on 127.0.0.1 with a SQLite store and a local artifact folder: (its process group, its URL)."""
    port = free_port()
    executable = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    process = subprocess.Popen(
        [executable, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "art")],
        stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "w"), start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail("the MLflow server did not start: " + (folder / "server.log").read_text()[-2000:])
        time.sleep(0.5)


def stop_server(process: subprocess.Popen, how: int = signal.SIGTERM) -> None:
    try:
        os.killpg(process.pid, how)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process, url = start_server(tmp_path_factory.mktemp("mlflow"))
    yield url
    stop_server(process)


def pipeline_command(tmp_path: Path, mnist_mirror: Path, *settings: str, run_id: str) -> list[str]:
    return [
        sys.executable, "-m", "pipeline", "run", "--run-id", run_id, "--set", f"run.root={tmp_path / 'runs'}",
        "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", f"data.mirrors=[{mnist_mirror}]",
        "--set", "data.max_train_images=1500", "--set", "data.validation_size=500",
        "--set", "data.max_test_images=500", "--set", "model.conv1_filters=8", "--set", "model.conv2_filters=16",
        "--set", "model.dense_units=64", "--set", "train.scheduler=fifo", "--set", "ray.num_cpus=2",
        "--set", "ray.include_dashboard=false", *[item for setting in settings for item in ("--set", setting)],
    ]


ENV = {**os.environ, "RAY_ADDRESS": "", "MLFLOW_TRACKING_URI": ""}


def run_pipeline(tmp_path: Path, mnist_mirror: Path, *settings: str, run_id: str = "tracked"):
    return subprocess.run(pipeline_command(tmp_path, mnist_mirror, *settings, run_id=run_id), capture_output=True,
                          text=True, cwd=REPO, timeout=900, env=ENV)


def test_a_run_and_its_trials_go_to_mlflow(server, tmp_path, mnist_mirror):
    from mlflow.tracking import MlflowClient

    # credentials in the URI (this server ignores them): they reach the server, never the console or the run folder
    with_credentials = server.replace("http://", f"http://user:{SECRET}@")
    result = run_pipeline(tmp_path, mnist_mirror, f"tracking.mlflow_uri={with_credentials}",
                          "tracking.experiment=digits", "tracking.register_model=mnist-cnn",
                          "train.epochs=2", "train.num_samples=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    folder = tmp_path / "runs" / "tracked"
    for text in [result.stdout, result.stderr, *(p.read_text(errors="replace") for p in folder.rglob("*")
                                                   if p.is_file() and p.suffix in (".yaml", ".json", ".log", ".csv"))]:
        assert SECRET not in text
    assert "user:***@127.0.0.1" in result.stdout + result.stderr

    client = MlflowClient(tracking_uri=server)
    experiment = client.get_experiment_by_name("digits")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [run for run in runs if run.data.tags.get("mnist_pipeline.run_id") == "tracked"]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    metrics = json.loads((folder / "metrics.json").read_text())
    summary = json.loads((folder / "summary.json").read_text())

    # the parent: the resolved config, the results, the stage times, the files
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tracked"
    assert parent.data.params["train.epochs"] == "2" and parent.data.params["tracking.experiment"] == "digits"
    assert SECRET not in parent.data.params["tracking.mlflow_uri"]
    assert parent.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert parent.data.metrics["val_accuracy"] == pytest.approx(metrics["val_accuracy"])
    assert {f"stage_seconds_{stage}" for stage in summary["stage_seconds"]} <= set(parent.data.metrics)
    assert parent.data.tags["best_trial_id"] == metrics["best_trial_id"]
    artifacts = {entry.path for entry in client.list_artifacts(parent.info.run_id)}
    assert {"report.html", "metrics.json", "config.yaml", "model"} <= artifacts
    downloaded = Path(client.download_artifacts(parent.info.run_id, "model/model.keras", str(tmp_path)))
    assert downloaded.read_bytes() == (folder / "model" / "model.keras").read_bytes()
    (version,) = client.search_model_versions("name='mnist-cnn'")
    assert version.run_id == parent.info.run_id

    # a child per trial: its hyperparameters and one value per epoch of each metric
    assert sorted(run.info.run_name for run in children) == sorted(t["trial_id"] for t in metrics["trials"])
    for child in children:
        trial = next(t for t in metrics["trials"] if t["trial_id"] == child.info.run_name)
        assert child.info.status == "FINISHED"
        assert float(child.data.params["learning_rate"]) == pytest.approx(trial["hyperparameters"]["learning_rate"])
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert [point.step for point in history] == list(range(1, trial["epochs"] + 1))
        assert [point.value for point in history] == pytest.approx(trial["val_accuracy_by_epoch"])


def test_a_server_out_of_reach_refuses_the_run_or_is_a_warning(tmp_path, mnist_mirror):
    nobody = f"http://127.0.0.1:{free_port()}"
    refused = run_pipeline(tmp_path, mnist_mirror, f"tracking.mlflow_uri={nobody}", run_id="refused")
    assert refused.returncode == 2, refused.stderr[-2000:]
    (line,) = [line for line in refused.stderr.splitlines() if line.startswith("mnist-pipeline: error:")]
    assert f"tracking.mlflow_uri={nobody}: cannot use MLflow there" in line and "tracking.required=false" in line
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "runs" / "refused").exists(), "a refused run leaves nothing behind"

    untracked = run_pipeline(tmp_path, mnist_mirror, f"tracking.mlflow_uri={nobody}", "tracking.required=false",
                             "train.epochs=1", "train.num_samples=1", run_id="untracked")
    assert untracked.returncode == 0, untracked.stderr[-2000:]
    assert "cannot use MLflow there" in untracked.stdout + untracked.stderr
    assert (tmp_path / "runs" / "untracked" / "metrics.json").is_file()


def test_a_server_lost_in_the_middle_of_the_search_does_not_fail_the_run(tmp_path, mnist_mirror):
    process, url = start_server(tmp_path)
    run = subprocess.Popen(
        pipeline_command(tmp_path, mnist_mirror, f"tracking.mlflow_uri={url}", "train.epochs=3", "train.num_samples=2",
                         run_id="outage"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=ENV,
    )
    output = []
    for line in run.stdout:  # the first epoch reached the server's trial runs: now it goes away
        output.append(line)
        if line.startswith("[search] ") and " epoch 1/3" in line:
            stop_server(process, signal.SIGKILL)
            break
    output += run.stdout.readlines()
    assert run.wait(timeout=900) == 0, "".join(output)[-3000:]
    text = "".join(output)
    assert "failed for the trials" in text and "the search goes on" in text
    assert "the run goes on" in text  # the parent run's results could not be logged either
    assert (tmp_path / "runs" / "outage" / "metrics.json").is_file()
