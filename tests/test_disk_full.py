"""A run folder on a disk that fills up: one clear line naming what, exit 1, no partial file left behind.

The disks are real: small tmpfs mounts made for the test (needs root, as in CI; skipped otherwise).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def small_disk(tmp_path):
    """Mounts a tmpfs of the size asked for; returns its folder."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = []

    def mount(size: str) -> Path:
        mount_point = tmp_path / f"disk-{size}"
        mount_point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(mount_point)
        return mount_point

    yield mount
    for mount_point in mounted:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def run_on(root, tmp_path, mnist_mirror, *sets):
    command = [
        sys.executable, "-m", "pipeline", "run", "--run-id", "full",
        "--set", f"run.root={root}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
        "--set", f"data.mirrors=[{mnist_mirror}]", "--set", "data.max_train_images=3000",
        "--set", "data.validation_size=500", "--set", "data.max_test_images=1000",
        "--set", "ray.num_cpus=2", "--set", "ray.include_dashboard=false",
    ]
    for setting in sets:
        command += ["--set", setting]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600,
                            env={**os.environ, "RAY_ADDRESS": ""})
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    # workers' tracebacks (a trial failing to checkpoint, Tune failing to snapshot) are kept off the console, however
    # the failures interleave: the console filter is tested on its own with such output in test_cli.py
    assert "Traceback" not in result.stderr and '  File "' not in result.stderr, result.stderr[-3000:]
    assert not list(root.rglob("*.part*")), "a partial file was left on the full disk"
    return result.stderr.strip().splitlines()[-1]


def test_disk_full_while_writing_the_dataset(tmp_path, small_disk, mnist_mirror):
    tiny_disk = small_disk("1m")
    # a run root every node shares holds the one copy of the split, in <run.root>/.datasets/
    error = run_on(tiny_disk, tmp_path, mnist_mirror, "run.shared_filesystem=true")
    # the split (3,000 images, 2.4 MB) does not fit on the 1 MiB disk
    (fingerprint,) = [path.name for path in (tmp_path / "cache" / "datasets").iterdir()]  # cached beside: same one
    copy = tiny_disk / ".datasets" / fingerprint / "dataset.npz"
    assert error == f"mnist-pipeline: error: cannot write {copy}: No space left on device"
    assert (tiny_disk / "full" / "config.yaml").exists() and not copy.exists()
    assert not (tiny_disk / "full" / "data" / "manifest.json").exists()


def test_disk_full_while_tune_checkpoints(tmp_path, small_disk, mnist_mirror):
    # the split fits on 8 MiB, a checkpoint of the classic CNN (39 MB) does not. Whichever fails first, the trial
    # writing its checkpoint or Tune reading back its own truncated state, the run says the disk is full.
    disk = small_disk("8m")
    error = run_on(disk, tmp_path, mnist_mirror, "train.epochs=1", "train.num_samples=1", "train.max_failures=0")
    assert error.startswith(f"mnist-pipeline: error: the disk of {disk / 'full'} is full (0 MiB free); Tune stopped")
