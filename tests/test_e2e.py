"""The whole pipeline through real Ray and real Tune, on a slice of real MNIST served over loopback HTTP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from run_data import dataset_file

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, mirror_server):
    """Runs `python -m pipeline run` once (2 trials, 2 epochs, 3,000 training images); returns (folder, result)."""
    work = tmp_path_factory.mktemp("e2e")
    url = mirror_server.base_url
    result = subprocess.run(
        [
            sys.executable, "-m", "pipeline", "run", "--run-id", "e2e",
            "--set", f"run.root={work / 'runs'}",
            "--set", f"data.cache_dir={work / 'cache'}",
            # the first mirror is down: the run must fall through to the working one
            "--set", f"data.mirrors=[{url}/missing/, {url}/ok/]",
            "--set", "data.max_train_images=3000",
            "--set", "data.validation_size=500",
            "--set", "data.max_test_images=1000",
            "--set", "train.epochs=2",
            "--set", "train.num_samples=2",
            "--set", "train.scheduler=asha",
            "--set", "train.grace_period=1",
            "--set", "train.search_space.batch_size={choice: [64]}",
            "--set", "ray.num_cpus=2",
            "--set", "ray.include_dashboard=false",
            # out of reach for 2 epochs: the run must finish, keep its artifacts, then fail the gate with exit 1
            "--set", "evaluate.min_test_accuracy=0.999",
        ],
        capture_output=True, text=True, cwd=REPO, timeout=900, env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    return work / "runs" / "e2e", result


def test_the_run_folder_holds_every_artifact(finished_run):
    folder, _ = finished_run
    for artifact in [
        "config.yaml", "pipeline.log", "summary.json", "metrics.json",
        "data/manifest.json", "model/model.keras", "model/hyperparameters.json", "tune",
    ]:
        assert (folder / artifact).exists(), artifact
    assert not list(folder.rglob("*.part*")), "temporary files left behind"
    # the split: referenced in the node's cache, not copied into the run folder
    assert os.listdir(folder / "data") == ["manifest.json"]
    assert dataset_file(folder).parent.parent == (folder.parent.parent / "cache" / "datasets").resolve()


def test_summary_is_printed_then_the_quality_gate_fails_the_run(finished_run):
    folder, result = finished_run
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("mnist-pipeline: error: test accuracy 0.")
    assert "is below evaluate.min_test_accuracy=0.999" in error and str(folder) in error
    assert "run e2e finished in" in result.stdout
    assert "test accuracy:" in result.stdout and str(folder) in result.stdout
    assert "of 2 trials on 1 node" in result.stdout
    for stage in ("download", "preprocess", "train", "evaluate"):
        assert stage in result.stdout.split("stage times:")[1]


def test_tune_ran_two_trials_with_checkpoints_and_picked_the_best(finished_run):
    folder, _ = finished_run
    metrics = json.loads((folder / "metrics.json").read_text())
    trials = metrics["trials"]
    assert len(trials) == 2 and all(t["status"] == "TERMINATED" for t in trials)
    assert all(len(t["nodes"]) == 1 for t in trials)
    trial_folders = [p for p in (folder / "tune").iterdir() if p.is_dir()]
    assert len(trial_folders) == 2
    best_per_trial = []
    for trial_folder in trial_folders:
        assert list(trial_folder.glob("checkpoint_*/model.keras")), f"no checkpoint in {trial_folder.name}"
        rows = [json.loads(line) for line in (trial_folder / "result.json").read_text().splitlines()]
        assert [row["epoch"] for row in rows] == list(range(1, len(rows) + 1))
        assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "images_per_second"} <= set(rows[0])
        # where each epoch's time went (benchmarks/ adds it up): the first epoch carries the process's start-up, the
        # second the first checkpoint's save; an epoch's training time agrees with its rate
        assert rows[0]["startup_seconds"] > 0 and all(row["startup_seconds"] == 0 for row in rows[1:])
        assert rows[0]["checkpoint_seconds"] == 0 and all(row["checkpoint_seconds"] > 0 for row in rows[1:])
        for row in rows:
            assert row["train_seconds"] > 0 and row["validation_seconds"] > 0 and row["checkpoint_bytes"] > 10**6
            assert row["images_per_second"] * row["train_seconds"] == pytest.approx(2500, rel=0.01)  # 3,000 - 500
        assert all(a["reported_at"] < b["reported_at"] for a, b in zip(rows, rows[1:]))
        best_per_trial.append(max(row["val_accuracy"] for row in rows))
    assert metrics["val_accuracy"] == pytest.approx(max(best_per_trial))
    assert Path(metrics["checkpoint"]).is_relative_to(folder / "tune")
    # the base trial runs the classic hyperparameters as they are
    assert any(t["hyperparameters"]["dropout"] == 0.0 and t["hyperparameters"]["batch_size"] == 128 for t in trials)


def test_metrics_agree_with_the_exported_model(finished_run):
    import keras

    folder, _ = finished_run
    metrics = json.loads((folder / "metrics.json").read_text())
    with np.load(dataset_file(folder)) as dataset:
        images, labels = dataset["test_images"], dataset["test_labels"]
    assert len(labels) == 1000 == metrics["test_images"]
    model = keras.models.load_model(folder / "model" / "model.keras", safe_mode=True)
    predicted = model.predict(images, batch_size=500, verbose=0).argmax(axis=1)
    assert metrics["test_accuracy"] == pytest.approx(float(np.mean(predicted == labels)), abs=1e-9)
    confusion = np.zeros((10, 10), int)
    np.add.at(confusion, (labels, predicted), 1)
    assert metrics["confusion_matrix"] == confusion.tolist()
    assert metrics["test_accuracy"] > 0.85, "two epochs on 2,500 images should already learn the digits"
    hyperparameters = json.loads((folder / "model" / "hyperparameters.json").read_text())
    assert hyperparameters == metrics["hyperparameters"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["test_accuracy"] == metrics["test_accuracy"]
    assert set(summary["stage_seconds"]) == {"download", "preprocess", "train", "evaluate"}


def test_manifest_describes_the_slice(finished_run):
    folder, _ = finished_run
    manifest = json.loads((folder / "data" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["shape"] == [2500, 28, 28]
    assert manifest["splits"]["validation"]["shape"] == [500, 28, 28]
    assert manifest["seed"] == 0 and len(manifest["fingerprint"]) == 64 and len(manifest["content_sha256"]) == 64
    assert Path(manifest["dataset_folder"]).name == manifest["fingerprint"]


def test_the_report_shows_the_run(finished_run):
    """report.html: self-contained (figures embedded, no external references), every section, figures that decode
    to images of sensible sizes and equal the PNG files beside it."""
    import base64
    import io
    import re

    from PIL import Image

    folder, result = finished_run
    page = (folder / "report.html").read_text()
    assert str(folder / "report.html") in result.stdout
    for section in ["Winning hyperparameters", "Timings", "How the trials learned", "What the search found",
                    "All trials", "Where the model fails", "Test accuracy", "95% interval", "Most confused"]:
        assert section in page, section
    assert not re.search(r"""(src|href)=["']?(https?:|//|/)""", page), "the report must not load anything"
    embedded = [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    files = {path.stem: path.read_bytes() for path in (folder / "report").glob("*.png")}
    assert set(files) == {"curves", "parallel", "hyperparameters", "confusion", "mistakes", "per_class"}
    assert sorted(embedded) == sorted(files.values())
    for name, png in files.items():
        image = Image.open(io.BytesIO(png))
        image.load()
        assert image.format == "PNG" and 300 <= image.width <= 2000 and 200 <= image.height <= 2000, (name, image.size)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert f"{metrics['test_accuracy']:.2%}" in page and metrics["best_trial_id"] in page
    for trial in metrics["trials"]:
        assert trial["trial_id"] in page
        assert len(trial["val_accuracy_by_epoch"]) == trial["epochs"]
    for stage in ("download", "preprocess", "train", "evaluate"):
        assert f"<th>{stage}</th>" in page

    # the parallel coordinates: drawn (many colours, not a blank canvas), one axis per searched hyperparameter + 1
    parallel = Image.open(io.BytesIO(files["parallel"])).convert("RGB")
    assert len(np.unique(np.asarray(parallel.resize((200, 100))).reshape(-1, 3), axis=0)) > 30
    # the top-trials table: metrics.json's top_trials, in rank order
    section = page.split("<h2>Top trials</h2>", 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr[^>]*><td>(\d+)</td><td>([^<]+)</td><td>([\d.]+)</td><td>(\d+)</td><td>(\d+)</td>",
                      section)
    assert rows == [(str(rank), t["trial_id"], f"{t['best_val_accuracy']:.4f}", str(t["best_epoch"]), str(t["epochs"]))
                    for rank, t in enumerate(metrics["top_trials"], start=1)]
    assert len(rows) == len(metrics["trials"]) == 2


def test_predict_reads_digits_as_people_have_them(finished_run, tmp_path):
    """Real MNIST test digits written out as PNG/JPEG: as they are, as black ink on white paper, enlarged and
    off-centre; `predict` must read them all as the model reads the original arrays."""
    import keras
    from PIL import Image

    folder, _ = finished_run
    with np.load(dataset_file(folder)) as dataset:
        images, labels = dataset["test_images"], dataset["test_labels"]
    model = keras.models.load_model(folder / "model" / "model.keras", safe_mode=True)
    probabilities = model.predict(images[:200], verbose=0)
    confident = [i for i in range(200) if probabilities[i].argmax() == labels[i] and probabilities[i].max() > 0.95]
    chosen = confident[:12]
    assert len(chosen) == 12
    files, expected = [], []
    for n, index in enumerate(chosen):
        digit = Image.fromarray(images[index])
        if n % 3 == 1:  # dark ink on light paper, enlarged to 140x140
            digit = Image.fromarray(255 - images[index]).resize((140, 140), Image.BICUBIC)
        if n % 3 == 2:  # light on dark, in a corner of a larger image, as RGB JPEG
            canvas = Image.new("L", (120, 90), 0)
            canvas.paste(digit.resize((56, 56), Image.BICUBIC), (5, 8))
            digit = canvas.convert("RGB")
        path = tmp_path / f"digit{n}.{'jpg' if n % 3 == 2 else 'png'}"
        digit.save(path, quality=95) if path.suffix == ".jpg" else digit.save(path)
        files.append(str(path))
        expected.append(int(labels[index]))
    result = subprocess.run([sys.executable, "-m", "pipeline", "predict", str(folder), *files, "--top", "2",
                             "--single"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(files)
    got = [int(line.split(": ", 1)[1].split(" ", 1)[0]) for line in lines]
    assert got == expected, list(zip(files, got, expected))
    assert all("%)" in line and "next: " in line for line in lines)

    blank = tmp_path / "blank.png"
    Image.new("L", (40, 40), 255).save(blank)
    for bad, message in [(str(blank), "no digit found"), (str(tmp_path / "none.png"), "image not found"),
                         (str(folder / "config.yaml"), "not a readable image")]:
        refused = subprocess.run([sys.executable, "-m", "pipeline", "predict", str(folder), bad],
                                 capture_output=True, text=True, cwd=REPO, timeout=300)
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr


def test_predict_uses_the_model_that_did_better_on_validation(finished_run):
    from pipeline.predict import find_model

    folder, _ = finished_run
    ensemble = json.loads((folder / "metrics.json").read_text())["ensemble"]
    assert ensemble["k"] == 2 and len(ensemble["val_accuracy_by_k"]) == 2
    preferred = ensemble["val_accuracy"] >= ensemble["single_val_accuracy"]
    chosen = find_model(str(folder), str(folder.parent))
    assert chosen == str(folder / "model" / ("ensemble.keras" if preferred else "model.keras"))
    assert find_model(str(folder), str(folder.parent), ensemble=False) == str(folder / "model" / "model.keras")
    assert find_model(str(folder), str(folder.parent), ensemble=True) == str(folder / "model" / "ensemble.keras")


def test_runs_lists_finished_and_stopped_runs(finished_run):
    folder, _ = finished_run
    stopped = folder.parent / "stopped"
    stopped.mkdir(exist_ok=True)
    (stopped / "config.yaml").write_text((folder / "config.yaml").read_text())
    records = json.loads((folder / "stages.json").read_text())
    (stopped / "stages.json").write_text(json.dumps({"download": records["download"],
                                                     "preprocess": {**records["preprocess"], "finished": None}}))
    result = subprocess.run([sys.executable, "-m", "pipeline", "runs", "--set", f"run.root={folder.parent}"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((folder / "metrics.json").read_text())
    (header, e2e, stopped_line, footer) = result.stdout.strip().splitlines()
    assert header.split() == ["RUN", "STATUS", "VAL", "ACC", "TEST", "ACC", "TRIALS", "TIME"]
    assert e2e.split()[:5] == ["e2e", "finished", f"{metrics['val_accuracy']:.2%}", f"{metrics['test_accuracy']:.2%}",
                               "2"]
    assert stopped_line.split()[:4] == ["stopped", "stopped", "in", "preprocess"]
    assert footer.startswith("2 runs in ")


def test_runs_compares_runs_side_by_side(finished_run, tmp_path):
    import shutil

    import yaml

    folder, _ = finished_run
    # the same run as if made with other settings: its records and results copied, two settings changed
    other = tmp_path / "other"
    other.mkdir()
    for name in ("stages.json", "summary.json", "metrics.json", "model"):
        (shutil.copytree if (folder / name).is_dir() else shutil.copy)(folder / name, other / name)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["train"]["epochs"], config["model"]["dropout"] = 7, 0.125
    (other / "config.yaml").write_text(yaml.safe_dump(config))

    result = subprocess.run([sys.executable, "-m", "pipeline", "runs", "--set", f"run.root={folder.parent}", "e2e",
                             str(other)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    metrics = json.loads((folder / "metrics.json").read_text())
    rows = {line.split("  ")[0]: line.split() for line in lines[1:]}
    assert lines[0].split() == ["e2e", "other"]
    assert rows["status"][1:] == ["finished", "finished"]
    assert rows["test accuracy"][2:] == [f"{metrics['test_accuracy']:.2%}"] * 2
    assert rows["best trial"][2:] == [metrics["best_trial_id"]] * 2
    assert lines[7] == "settings that differ:"
    assert [line.split() for line in lines[8:]] == [["model.dropout", "0.0", "0.125"], ["train.epochs", "2", "7"]]

    for names, message in [(["e2e"], "name two or more runs to compare"), (["e2e", "nothing"], "no run 'nothing'")]:
        refused = subprocess.run([sys.executable, "-m", "pipeline", "runs", "--set", f"run.root={folder.parent}",
                                  *names], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr


def test_dashboard_serves_tensorboard_over_the_trials(finished_run):
    import signal
    import socket
    import time
    import urllib.request

    folder, _ = finished_run
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "dashboard", str(folder), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = process.stdout.readline()
        assert line.startswith("TensorBoard:    http://"), line + process.stderr.read()[-2000:]
        url = line.split()[1]
        assert f":{port}" in url
        assert process.stdout.readline().startswith("Ray dashboard:  ")

        def fetch(path):
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(url.rstrip("/") + path, timeout=10) as response:
                        return response.read().decode()
                except OSError:
                    assert time.monotonic() < deadline
                    time.sleep(0.5)

        assert "<title>TensorBoard</title>" in fetch("/")
        deadline = time.monotonic() + 60
        while len(json.loads(fetch("/data/runs"))) < 2:  # TensorBoard finds the trials' event files
            assert time.monotonic() < deadline, fetch("/data/runs")
            time.sleep(1)
        plugins = json.loads(fetch("/data/plugins_listing"))
        assert plugins["scalars"]["enabled"] and plugins["hparams"]["enabled"]
        tags = json.loads(fetch("/data/plugin/scalars/tags"))
        assert all("ray/tune/val_accuracy" in run_tags for run_tags in tags.values())
    finally:
        process.send_signal(signal.SIGINT)
        try:
            assert process.wait(timeout=30) == 0
        finally:
            process.kill()


def test_the_run_folder_keeps_the_full_log(finished_run):
    """pipeline.log holds what the console showed: the driver's records, the tasks' and trials' lines, Tune's
    trial table and the summary, without colour codes."""
    folder, result = finished_run
    text = (folder / "pipeline.log").read_text()
    for expected in ["run e2e: started", "stage download: started", "(download_task pid=", "(preprocess_task pid=",
                     "Trial status:", "TERMINATED", "stage evaluate: done", "run e2e finished in", "report:",
                     "run stopped: test accuracy 0.",
                     "evaluate: TensorFlow on "]:  # 2 threads once the trials' CPUs are free (1 on a busy machine)
        assert expected in text, expected
    # ASHA with 2 trials at once on 2 CPUs: said before any stage starts
    warning = text.index("this search cannot be repeated exactly from run.seed: ASHA compares each trial")
    assert warning < text.index("stage download: started")
    assert "\x1b[" not in text


@pytest.mark.skipif(not any(map(__import__("shutil").which, ["chromium", "chromium-browser", "google-chrome"])),
                    reason="headless Chromium is not installed (apt-get install chromium)")
def test_browser_screenshots_of_the_report_and_tensorboard(finished_run, tmp_path):
    from PIL import Image

    folder, _ = finished_run
    result = subprocess.run(["bash", "scripts/screenshots.sh", str(folder), str(tmp_path / "shots")],
                            capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ["report", "tensorboard-scalars", "tensorboard-hparams"]:
        shot = Image.open(tmp_path / "shots" / f"{name}.png")
        assert shot.size == (1280, 2400)
        assert len(np.unique(np.asarray(shot.convert("L").resize((64, 120))))) > 20, f"{name} looks blank"


def test_the_console_off_a_terminal_reads_as_plain_lines(finished_run):
    """Captured output (no terminal): no colour codes, none of Tune's tables or CUDA's complaints, one progress line
    per trial epoch with an ETA, one line per finished trial; pipeline.log still has Tune's tables."""
    import re

    folder, result = finished_run
    console = result.stdout + result.stderr
    assert "\x1b" not in console and "\r" not in console
    for noise in ["cuInit", "Token authentication", "Trial status:", "╭", "started with configuration",
                  "tensorboard --logdir /tmp/ray", "dashboard port"]:
        assert noise not in console, noise
    epochs = re.findall(r"^\[search\] (\S+) epoch (\d)/2: val_accuracy 0\.\d{4} \| trials \d done, \d running, \d "
                        r"pending \| epochs (\d)/\d \| best 0\.\d{4} \(\S+\) \| ETA \S+$", console, re.MULTILINE)
    trials = json.loads((folder / "metrics.json").read_text())["trials"]
    assert sorted((trial, int(epoch)) for trial, epoch, _ in epochs) == sorted(
        (trial["trial_id"], epoch) for trial in trials for epoch in range(1, trial["epochs"] + 1)
    )
    assert [int(trained) for *_, trained in epochs] == list(range(1, len(epochs) + 1))  # counted as they come
    for trial in trials:
        assert re.search(rf"^\[search\] trial {trial['trial_id']} (finished|stopped early after epoch 1): best "
                         rf"val_accuracy {trial['best_val_accuracy']:.4f}", console, re.MULTILINE), trial["trial_id"]
    assert "Trial status:" in (folder / "pipeline.log").read_text()


def test_on_a_terminal_the_search_is_one_live_line_with_an_eta(tmp_path, mnist_mirror):
    """The CLI under a pseudo-terminal: the epochs show as one line redrawn in place, trials that end get a line of
    their own, and neither CUDA's nor Ray's notes reach the screen."""
    import pty
    import re
    import select

    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "--run-id", "tty", "--set", f"run.root={tmp_path}",
         "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", f"data.mirrors=[{mnist_mirror}]",
         "--set", "data.max_train_images=1500", "--set", "data.validation_size=500",
         "--set", "data.max_test_images=500", "--set", "model.conv1_filters=8", "--set", "model.conv2_filters=16",
         "--set", "model.dense_units=64", "--set", "train.epochs=2", "--set", "train.num_samples=2",
         "--set", "train.scheduler=fifo", "--set", "ray.num_cpus=2", "--set", "ray.include_dashboard=false"],
        stdin=secondary, stdout=secondary, stderr=secondary, cwd=REPO, env={**os.environ, "RAY_ADDRESS": ""},
    )
    os.close(secondary)
    output = b""
    while True:
        ready, _, _ = select.select([primary], [], [], 600)
        if not ready:
            process.kill()
            break
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the terminal's other side closed: the run ended
            break
        if not chunk:
            break
        output += chunk
    assert process.wait(timeout=60) == 0, output.decode(errors="replace")[-3000:]
    os.close(primary)
    text = output.decode()
    live = re.findall(r"\r\x1b\[K(training: [^\r\n]*)", text)
    assert live and all(re.fullmatch(r"training: trials \d done, \d running, \d pending \| epochs \d/4 \| best "
                                     r"(-|0\.\d{4} \(\S+\))( \| ETA \S+)?", line) for line in live), live[:5]
    assert any(" | ETA " in line for line in live)
    assert not re.search(r"^\[search\] \S+ epoch", text, re.MULTILINE), "epoch lines are the live line's"
    assert len(re.findall(r"\[search\] trial \S+ finished: best val_accuracy", text)) == 2
    for noise in ["cuInit", "Token authentication", "Trial status:"]:
        assert noise not in text, noise
    assert "run tty finished in" in text
    # once training is over the live line is gone: evaluate's lines and the summary come as plain lines
    assert "training:" not in text.split("stage evaluate: started", 1)[1]
