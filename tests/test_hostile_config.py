"""Hostile or absurd configs: refused quickly, in bounded memory, as one short line naming the file or key.

No Ray, no training: each case is a config load (one case runs the command line in a child process).
"""

import math
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from peak_memory import MEASURED_CLI, read_peak

from pipeline.config_loading import load_config
from stages.common.errors import BadInputError

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def refusal(path=None, overrides=()) -> str:
    """The message of the BadInputError that loading raises; it is always one line."""
    with pytest.raises(BadInputError) as caught:
        load_config(path, list(overrides))
    message = str(caught.value)
    assert "\n" not in message
    return message


def nested_aliases(levels: int, width: int) -> str:
    """A flow list of anchors, each holding `width` aliases of the one before: width**levels values expanded."""
    anchors = [f"&a0 [{','.join(['lol'] * width)}]"]
    for level in range(1, levels):
        anchors.append(f"&a{level} [{','.join([f'*a{level - 1}'] * width)}]")
    return f"[{', '.join(anchors)}]"


def run_cli_measured(*args: str, cwd: Path) -> tuple[int, str, int, float]:
    """Runs the CLI; returns its exit code, stderr, peak RSS in bytes and wall time in seconds.

    The peak RSS is the child's own (tests/peak_memory.py says why rusage would not do). The child's address space
    is capped at 1 GiB, so that a regression fails at once rather than taking the machine's memory.
    """
    def cap_memory() -> None:
        try:
            resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        except (ValueError, OSError):
            pass  # not enforceable here (macOS): the peak is still measured

    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])  # this tree's code, wherever it is
    peak_file = cwd / "peak-rss"
    started = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, "-c", MEASURED_CLI, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, preexec_fn=cap_memory,
        env={**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": path, "PEAK_RSS_FILE": str(peak_file)},
    )
    watchdog = threading.Timer(300, child.kill)
    watchdog.start()
    try:
        stderr = child.stderr.read()
        _, status, _ = os.wait4(child.pid, 0)
    finally:
        watchdog.cancel()
        child.stderr.close()
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return child.returncode, stderr, read_peak(peak_file), time.monotonic() - started


def test_a_billion_laughs_is_refused_at_once_in_bounded_memory(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"# 9**9 strings once expanded\nmodel:\n  conv1_filters: {nested_aliases(9, 9)}\n")
    assert bomb.stat().st_size < 500
    code, stderr, peak, seconds = run_cli_measured("config", "--config", str(bomb), cwd=tmp_path)
    print(f"alias bomb: exit {code}, peak RSS {peak / MIB:.0f} MiB, {seconds:.1f} s")
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert re.fullmatch(rf"mnist-pipeline: error: {re.escape(str(bomb))}: line 3: more than 10,000 keys and values .*",
                        lines[0])
    assert peak < 500 * MIB


@pytest.mark.parametrize("where", ["file", "override"])
def test_aliases_expanding_past_the_budget_are_refused(tmp_path, where):
    bomb = nested_aliases(5, 10)  # 100,000 values: few enough to build, were the budget gone
    if where == "file":
        path = tmp_path / "bomb.yaml"
        path.write_text(f"train:\n  epochs: 2\nmodel:\n  dense_units: {bomb}\n")
        assert refusal(path).startswith(f"{path}: line 4: more than 10,000 keys and values")
    else:
        assert refusal(None, [f"model.dense_units={bomb}"]).startswith("--set model.dense_units: line 1: more than")


def test_the_budget_spans_the_file_and_every_override():
    part = f"model.dense_units={nested_aliases(3, 14)}"  # 3,182 values: within the budget three times over
    assert "model.dense_units: Input should be a valid integer" in refusal(None, [part] * 3)
    message = refusal(None, [part] * 4)
    assert message.startswith("--set model.dense_units: line 1: more than 10,000 keys and values in all")


def test_modest_aliases_still_work(tmp_path):
    path = tmp_path / "aliases.yaml"
    path.write_text("train:\n  search_space:\n    dropout: {choice: &rates [0.1, 0.2]}\n"
                    "    weight_decay: {choice: *rates}\n")
    assert load_config(path).train.search_space["weight_decay"].args == (0.1, 0.2)


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path):
    path = tmp_path / "cycle.yaml"
    path.write_text("train:\n  search_space: &loop {dropout: *loop}\n")
    assert refusal(path) == f"{path}: line 2: alias *loop is inside its own anchor"


@pytest.mark.parametrize(
    "content",
    [
        "model:\n  dense_units: " + "[" * 40 + "]" * 40 + "\n",
        "model:\n  dense_units: " + "[" * 100_000 + "]" * 100_000 + "\n",  # deeper than Python's recursion limit
        "".join(" " * depth + f"k{depth}:\n" for depth in range(40)),
    ],
    ids=["flow-40", "flow-100000", "block-40"],
)
def test_deep_nesting_is_refused(tmp_path, content):
    path = tmp_path / "deep.yaml"
    path.write_text(content)
    assert re.fullmatch(rf"{re.escape(str(path))}: line \d+: nested more than 32 levels deep", refusal(path))


def test_a_huge_file_is_refused_without_reading_it_all(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("train:\n  epochs: 2\n" + "# padding\n" * (MIB // 10 + 1))
    assert refusal(path) == f"{path}: larger than 1 MiB: not a config file"


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_an_endless_file_is_refused():
    assert refusal(Path("/dev/zero")) == "/dev/zero: larger than 1 MiB: not a config file"


def test_a_huge_override_is_refused():
    assert refusal(None, ["run.id=" + "x" * (MIB + 1)]) == "--set run.id: larger than 1 MiB: not a config"


@pytest.mark.parametrize(
    "content, message",
    [
        ("train:\n  epochs: 2\nmodel:\n  dropout: 0.1\ntrain:\n  epochs: 3\n",
         "line 5: duplicate key 'train' (first at line 1)"),
        ("train:\n  epochs: 2\n  num_samples: 4\n  epochs: 3\n", "line 4: duplicate key 'epochs' (first at line 2)"),
        ("train:\n  search_space:\n    dropout: {choice: [0.1]}\n    dropout: {uniform: [0.1, 0.2]}\n",
         "line 4: duplicate key 'dropout' (first at line 3)"),
        ("ray:\n  stage_resources: {download: {internet: 1, internet: 2}}\n",
         "line 2: duplicate key 'internet' (first at column 32 of the same line)"),
        ("base: &base {epochs: 2}\ntrain:\n  <<: *base\n",
         "line 3: merge keys (<<) are not supported: write the keys out"),
    ],
    ids=["top-level", "section", "search-space", "flow", "merge"],
)
def test_duplicate_and_merge_keys_are_refused_naming_the_lines(tmp_path, content, message):
    path = tmp_path / "config.yaml"
    path.write_text(content)
    assert refusal(path) == f"{path}: {message}"


def test_duplicate_keys_in_an_override_are_refused():
    message = refusal(None, ["train.search_space={dropout: {choice: [0.1]}, dropout: {choice: [0.2]}}"])
    assert message == "--set train.search_space: line 1: duplicate key 'dropout' (first at column 2 of the same line)"


MEGABYTE = "x" * 1_000_000
LONG = "y" * 100_000
KEY = "y" * 1000  # YAML's longest key in a mapping is 1024 characters

CLIPPED = [
    ([f"run.id={MEGABYTE}"], "run.id: 'xxx"),
    ([f"model.optimizer={LONG}"], "model.optimizer: Input should be 'adam', 'adamw', 'sgd' or 'rmsprop' (got 'yyy"),
    ([f"run.root={LONG}"], "run.root: String should have at most 1024 characters (got 'yyy"),
    ([f"data.cache_dir=/tmp/{LONG[:1000]}"], "data.cache_dir: '/tmp/yyy"),
    ([f"data.mirrors=[/no/such/{LONG[:1500]}]"], "data.mirrors[0]: mirror '/no/such/yyy"),
    ([f"data.mirrors=[ftp://{LONG[:1500]}]"], "data.mirrors[0]: unsupported mirror scheme 'ftp://' in 'ftp://yyy"),
    ([f"ray.address={LONG}"], "ray.address: 'yyy"),
    ([f"ray.dashboard_host={LONG}"], "ray.dashboard_host: 'yyy"),
    ([f"ray.stage_resources={{{KEY}: {{a: 1}}}}"], "ray.stage_resources: 'yyy"),
    ([f"ray.stage_resources={{download: {{{KEY}: 1}}}}"], "ray.stage_resources.download: 'yyy"),
    ([f"train.{LONG}=1"], "train.'yyy"),
    ([f"train.search_space.{LONG}={{choice: [1]}}"], "train.search_space: 'yyy"),
    ([f"train.search_space.dropout={{{KEY}: [1]}}"], "train.search_space.dropout: unknown distribution 'yyy"),
    ([f"train={{{KEY}: 1}}"], "train.'yyy"),
    ([f"train.search_space.dropout={{choice: {LONG}}}"], "train.search_space.dropout: choice takes a list, got 'yyy"),
    ([f"train.search_space.optimizer={{choice: [{LONG}]}}"], "train.search_space.optimizer: 'yyy"),
    ([f"train.search_space.dropout={{uniform: [{', '.join(['0.1'] * 5000)}]}}"],
     "uniform takes [low, high], got [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, ...]"),
    ([f"model.dense_units=[{', '.join(['1'] * 5000)}]"],
     "model.dense_units: Input should be a valid integer (got [1, 1, 1, 1, 1, 1, ...])"),
    ([f"{LONG}.epochs=1"], "'yyy"),
    ([f"{LONG}"], "--set expects KEY=VALUE (e.g. train.epochs=2), got 'yyy"),
    ([f"train.epochs.{LONG}=1"], "--set 'train.epochs.yyy"),
    ([f"run.root=!{LONG} x"], "--set run.root: invalid YAML"),
]


@pytest.mark.parametrize("overrides, start", CLIPPED, ids=[f"{o[0][:24]}-{i}" for i, (o, _) in enumerate(CLIPPED)])
def test_huge_bad_values_are_clipped_in_the_message(overrides, start):
    message = refusal(None, overrides)
    assert start in message
    assert len(message) < 400, message
    assert "…" in message or "...]" in message  # clipped, not left out
    assert "y" * 61 not in message and "x" * 61 not in message


def test_a_long_uri_with_a_password_is_clipped_after_redaction():
    message = refusal(None, [f"run.root=s3://user:{'p' * 80}@bucket/{'r' * 1100}"])
    assert "ppp" not in message and "'s3://user:***@bucket/rrr" in message


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["run.seed=" + "9" * 5000], "--set run.seed: line 1: integer 99999999999999999999… is too large"),
        (["run.seed=0b" + "1" * 5000], "--set run.seed: line 1: integer 0b111111111111111111… is too large"),
        (["run.id=2024-13-45"], "--set run.id: line 1: '2024-13-45' is not a date (month must be in 1..12"),
        (['run.root="runs\\nelsewhere"'], "run.root: 'runs\\nelsewhere' contains the control character '\\n'"),
        (['data.cache_dir="/tmp/\\0"'], "data.cache_dir: '/tmp/\\x00' contains the control character '\\x00'"),
        (['data.mirrors=["/tmp\\n"]'], "data.mirrors[0]: '/tmp\\n' contains the control character '\\n'"),
        (["data.cache_dir=~no-such-user-here/cache"], "data.cache_dir: '~no-such-user-here/cache' is not a folder"),
        ([f"data.cache_dir=/tmp/{'n' * 300}/cache"], "data.cache_dir: '/tmp/nnn"),  # a name longer than NAME_MAX
    ],
    ids=["decimal-int", "binary-int", "date", "root-newline", "cache-nul", "mirror-newline", "no-user", "name-max"],
)
def test_values_python_cannot_hold_or_paths_cannot_be_are_refused(overrides, message):
    assert message in refusal(None, overrides)


def test_the_largest_real_values_pass():
    config = load_config(None, [
        "ray.num_gpus=64", "ray.num_cpus=1024", "train.num_samples=10000", "train.max_concurrent_trials=10000",
        "train.gpus_per_trial=64", "train.epochs=1000", "train.grace_period=1000", "evaluate.batch_size=10000",
        "train.search_space.dense_units={grid: [256, 512]}", "train.num_samples=5000",
        f"train.search_space.dropout={{choice: [{', '.join(str(i / 1000) for i in range(1000))}]}}",
        "ray.stage_resources={download: {'node:10.0.0.1': 0.01}}", "ray.address=ray://head.example.org:10001",
        "ray.dashboard_host='::'", "train.reduction_factor=1.1", "data.timeout_s=0.1",
    ])
    assert config.train.num_samples == 5000 and config.ray.num_gpus == 64


def test_a_negative_zero_reads_as_zero():
    config = load_config(None, ["train.gpus_per_trial=-0.0", "model.dropout=-0.0", "evaluate.min_test_accuracy=-0.0"])
    for value in (config.train.gpus_per_trial, config.model.dropout, config.evaluate.min_test_accuracy):
        assert value == 0 and math.copysign(1, value) == 1
    assert "-0.0" not in config.to_yaml()


BOUNDED = [
    (["evaluate.batch_size=1000000000"], "evaluate.batch_size: Input should be less than or equal to 10000"),
    (["ray.num_cpus=100000"], "ray.num_cpus: Input should be less than or equal to 4096"),
    (["ray.num_gpus=100000"], "ray.num_gpus: Input should be less than or equal to 256"),
    (["ray.address=head:99999"], "ray.address: 'head:99999': the port should be 1-65535"),
    (["ray.dashboard_host='0.0.0.0; rm -rf /'"], "ray.dashboard_host: '0.0.0.0; rm -rf /' is not a host name or IP"),
    ([f"ray.stage_resources={{download: {{{', '.join(f'r{i}: 1' for i in range(17))}}}}}"],
     "ray.stage_resources.download: at most 16 resources, got 17"),
    (["ray.stage_resources={download: {'two words': 1}}"], "ray.stage_resources.download: 'two words' is not a "
                                                           "resource name"),
    (["ray.stage_resources={download: {internet: 2000000}}"],
     "download.internet=2e+06: give an amount above 0, at most 1e6"),
    (["ray.stage_resources={download: {internet: .nan}}"], "ray.stage_resources.download.internet: Input should be a "
                                                           "finite number"),
    (["train.max_concurrent_trials=1000000"],
     "train.max_concurrent_trials: Input should be less than or equal to 10000"),
    (["train.grace_period=100000"], "train.grace_period: Input should be less than or equal to 1000"),
    (["train.reduction_factor=1.0000001"], "train.reduction_factor: Input should be greater than or equal to 1.1"),
    (["train.reduction_factor=1000"], "train.reduction_factor: Input should be less than or equal to 100"),
    (["train.reduction_factor=.inf"], "train.reduction_factor: Input should be a finite number"),
    (["train.cpus_per_trial=.nan"], "train.cpus_per_trial: Input should be a finite number"),
    (["train.gpus_per_trial=.nan"], "train.gpus_per_trial: Input should be a finite number"),
    (["train.checkpoints_to_keep=100000"], "train.checkpoints_to_keep: Input should be less than or equal to 100"),
    (["train.max_failures=100000"], "train.max_failures: Input should be less than or equal to 100"),
    ([f"train.search_space.dropout={{choice: [{', '.join(['0.1'] * 1001)}]}}"],
     "train.search_space.dropout: choice takes at most 1000 values, got 1001"),
    (["train.search_space.dropout={uniform: [.nan, 0.5]}"],
     "train.search_space.dropout: uniform bounds must be finite numbers, got [nan, 0.5]"),
    (["train.search_space.learning_rate={loguniform: [1e-4, .inf]}"], "loguniform bounds must be finite numbers"),
    (["train.search_space.dropout={choice: [.nan]}"], "train.search_space.dropout: nan is not allowed: Input should be "
                                                      "a finite number"),
    ([f"train.search_space.dense_units={{grid: [{', '.join(map(str, range(1, 201)))}]}}", "train.num_samples=51"],
     "train.num_samples: 51 x 200 (grid sizes) makes 10200 trials; at most 10000"),
    (["model.learning_rate=.inf"], "model.learning_rate: Input should be a finite number"),
    (["model.weight_decay=.nan"], "model.weight_decay: Input should be a finite number"),
    (["evaluate.min_test_accuracy=.nan"], "evaluate.min_test_accuracy: Input should be a finite number"),
    (["data.timeout_s=0.001"], "data.timeout_s: Input should be greater than or equal to 0.1"),
    (["data.timeout_s=.nan"], "data.timeout_s: Input should be a finite number"),
    (["data.mirrors=[" + ", ".join(["/tmp"] * 17) + "]"], "data.mirrors: List should have at most 16 items"),
    ([f"data.mirrors=[https://example.org/{'m' * 2100}/]"], "data.mirrors[0]: String should have at most 2048 "
                                                            "characters"),
    ([f"data.cache_dir=/tmp/{'c' * 1100}"], "data.cache_dir: String should have at most 1024 characters"),
    ([f"run.root=/tmp/{'r' * 1100}"], "run.root: String should have at most 1024 characters"),
    (["run.root=s3://"], "run.root: 's3://': name a bucket"),
    (["run.root=ftp://host/runs"], "run.root: 'ftp://host/runs': 'ftp' is not a storage this program writes to"),
    (["run.root=file:///srv/runs"], "give a local run root as a path ('/srv/runs'), not a file:// URL"),
    (["a.b.c.d.e.f.g.h.i=1"], "--set a.b.c.d.e.f.g.h.i: no setting is 9 levels deep"),
    # each within its own bounds, too big together: found now, not when the first trial builds its model
    (["model.dense_units=16384", "model.conv2_filters=1024"], "model: the largest model this config trains "
                                                               "(48/1024 filters of 5x5, 16384 dense units"),
    (["train.search_space.dense_units={randint: [512, 16384]}", "model.conv2_filters=512"],
     "has 412 M weights, more than 100 M"),
    (["model.batch_size=65536", "model.conv1_filters=256"], "a training step of the largest model this config "
                                                            "trains (256/96 filters"),
]


@pytest.mark.parametrize("overrides, message", BOUNDED, ids=[o[0][:40] for o, _ in BOUNDED])
def test_absurd_values_are_refused_naming_the_key(overrides, message):
    assert message in refusal(None, overrides)
