"""The command line as a user runs it: bad input gives one line, exit code 2, no traceback, no stage run, no run
folder left."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd=None):
    env = {**os.environ, "RAY_ADDRESS": ""}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd or REPO, env=env,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--config", "nope.yaml"], "config file not found: nope.yaml"),
        (["run", "--set", "train.epoch=2"], "train.epoch: unknown key (did you mean 'epochs'?)"),
        (["run", "--set", "train.num_samples=0"], "train.num_samples: Input should be greater than or equal to 1"),
        (["run", "--set", "data.mirrors=[/no/such/dir]"], "mirror '/no/such/dir': no such folder"),
        (["run", "--set", "train.search_space.dropout={uniform: [0, 2]}"], "dropout: 2.0 is not allowed"),
        (["run", "--set", "nonsense"], "--set expects KEY=VALUE"),
        (["run", "--run-id", "a/b"], "run.id: 'a/b' is not a valid run id"),
        (["run", "--address", "nowhere"], "ray.address: 'nowhere' is not a Ray address"),
        (["run", "--set", "ray.num_cpus=1", "--set", "train.cpus_per_trial=2"], "exceeds ray.num_cpus=1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    args = [*args, "--set", f"run.root={tmp_path / 'runs'}"] if "run.root" not in " ".join(args) else args
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mnist-pipeline: error: ") and message in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert "stage download" not in result.stderr + result.stdout  # refused before any stage ran
    assert "(download_task" not in result.stderr + result.stdout
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_bad_arguments_exit_2_with_usage():
    result = run_cli("run", "--no-such-flag")
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in result.stderr
    result = run_cli()
    assert result.returncode == 2 and "COMMAND" in result.stderr


def test_a_run_root_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    result = run_cli("run", "--set", f"run.root={tmp_path / 'file'}")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("is not a folder")


def test_a_run_id_in_use_is_refused(tmp_path):
    (tmp_path / "taken").mkdir()
    result = run_cli("run", "--run-id", "taken", "--set", f"run.root={tmp_path}")
    assert result.returncode == 2
    assert "run 'taken' exists already" in result.stderr


def test_config_command_prints_the_resolved_config():
    result = run_cli("config", "--config", "configs/quick.yaml", "--set", "train.epochs=2")
    assert result.returncode == 0, result.stderr
    assert "epochs: 2" in result.stdout and "num_samples: 4" in result.stdout


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "mnist-pipeline"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "run" in result.stdout


@pytest.mark.parametrize(
    "behaviour, reason",
    [
        ("missing", "HTTP 404"),
        ("error", "HTTP 500"),
        ("truncated", ""),
        ("corrupt", "sha256"),
        ("slow", "timed out"),
    ],
)
def test_a_run_whose_only_mirror_is_broken_fails_in_one_line(behaviour, reason, http_mirror, tmp_path):
    """Whole-CLI runs (real Ray) against each broken-mirror behaviour: exit 1 (a runtime failure, not bad input), one
    line naming the file and the mirror's problem, no run artifacts, nothing partial in the cache."""
    mirror = f"{http_mirror.base_url}/{behaviour}/"
    result = run_cli(
        "run", "--set", f"run.root={tmp_path / 'runs'}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
        "--set", f"data.mirrors=[{mirror}]", "--set", "data.retries=1", "--set", "data.timeout_s=1",
        "--set", "ray.num_cpus=1", "--set", "ray.include_dashboard=false",
    )
    assert result.returncode == 1, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("mnist-pipeline: error: could not download a verified train-images-idx3-ubyte ")
    assert mirror in error and reason in error, error
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "cache").glob(".*.part*"))
    (run_folder,) = (tmp_path / "runs").iterdir()
    assert not (run_folder / "data").exists() and not (run_folder / "metrics.json").exists()


# What Ray showed on the driver's console when a run's disk filled up while Tune checkpointed (captured from a real
# run, frames trimmed): Tune's report of the failed trial and of its failed snapshot, each with a worker traceback,
# a trial's line in between, and a traceback line Ray held back as a repeat.
TRAIN, TRIAL = "\x1b[36m(train_task pid=14298)\x1b[0m ", "\x1b[36m(run_trial pid=14657)\x1b[0m "
SITE = "/venv/lib/python3.11/site-packages"
NO_SPACE = "OSError: [Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device"
WORKER_OUTPUT = [
    TRAIN + "Trial task failed for trial run_trial_873f8_00000",
    TRAIN + "Traceback (most recent call last):",
    TRAIN + f'  File "{SITE}/ray/air/execution/_internal/event_manager.py", line 110, in resolve_future',
    TRAIN + "    result = ray.get(future)",
    TRAIN + "             ^^^^^^^^^^^^^^^",
    TRAIN + f'  File "{SITE}/ray/_private/worker.py", line 1053, in get_objects',
    TRAIN + "    raise value.as_instanceof_cause()",
    TRAIN + "ray.exceptions.RayTaskError(OSError): \x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=14657, "
    "ip=192.0.2.2, actor_id=d9cb0fa4874ae898a9083bd201000000, repr=run_trial)",
    TRAIN + "           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^",
    TRAIN + f'  File "{SITE}/ray/tune/trainable/trainable.py", line 329, in train',
    TRAIN + "    raise skipped from exception_cause(skipped)",
    TRAIN + '  File "/repo/stages/training/trial.py", line 133, in run_trial',
    TRAIN + "    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))",
    TRAIN + '  File "pyarrow/error.pxi", line 92, in pyarrow.lib.check_status',
    TRAIN + NO_SPACE,
    TRIAL + "Checkpoint successfully created at: Checkpoint(filesystem=local, "
    "path=/runs/full/tune/run_trial_873f8_00000/checkpoint_000000)",
    TRAIN + "Saving experiment state to storage at '/runs/full/tune' failed with exception: ",
    TRAIN + "Traceback (most recent call last):",
    TRAIN + f'  File "{SITE}/ray/tune/execution/experiment_state.py", line 174, in wait_for_sync',
    TRAIN + "    self._storage.syncer.wait()",
    TRAIN + "_pickle.UnpicklingError: pickle data was truncated",
    TRAIN,
    TRAIN + "During handling of the above exception, another exception occurred:",
    TRAIN,
    TRAIN + "Traceback (most recent call last):",
    TRAIN + '  File "pyarrow/error.pxi", line 92, in pyarrow.lib.check_status',
    TRAIN + NO_SPACE,
    TRAIN + "Wrote the latest version of all result files and experiment state to '/runs/full/tune' in 0.0165s.",
    TRAIN + "    raise value.as_instanceof_cause()\x1b[32m [repeated 2x across cluster] (Ray deduplicates logs by "
    "default. Set RAY_DEDUP_LOGS=0 to disable log deduplication, or see https://docs.ray.io/en/master/"
    "ray-observability/user-guides/configure-logging.html#log-deduplication for more options.)\x1b[0m",
    TRIAL + "I0000 00:00:1795958399.371823   14821 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to "
    "use available CPU instructions in performance-critical operations.",
    TRAIN + "Trials did not complete: [run_trial_873f8_00000]",
]


def test_worker_tracebacks_go_to_the_log_and_their_exception_line_to_the_console():
    """The console filter, fed with real worker output the way Ray prints it (print(): the line, then its newline):
    the console shows every line but the tracebacks, each traceback as its last exception line; the log gets all."""
    import io

    from pipeline.console import LogSink, Tee

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    console = Terminal()
    sink = LogSink.__new__(LogSink)  # a log that writes to memory
    sink._console, sink._file = console, io.StringIO()
    tee = Tee(console, sink)
    for line in WORKER_OUTPUT:
        print(line, file=tee)
    tee.write("\x1b[A\rtrain-images-idx3-ubyte:  50%|█████     | 4.86M/9.72M\r")  # a progress bar, redrawn
    tee.end_blocks()

    shown = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", console.getvalue()).replace("\r", "").splitlines()
    logged = sink._file.getvalue()
    where = " [traceback in pipeline.log]"
    assert shown == [
        "(train_task pid=14298) Trial task failed for trial run_trial_873f8_00000",
        "(train_task pid=14298) " + NO_SPACE + where,
        # Tune's note of each checkpoint and snapshot: the log's
        "(train_task pid=14298) Saving experiment state to storage at '/runs/full/tune' failed with exception: ",
        "(train_task pid=14298) " + NO_SPACE + where,
        "(train_task pid=14298) Trials did not complete: [run_trial_873f8_00000]",
        "train-images-idx3-ubyte:  50%|█████     | 4.86M/9.72M",
    ]
    # everything, without colours (and without the bar)
    assert logged == re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", "".join(line + "\n" for line in WORKER_OUTPUT))
    assert logged.count("Traceback (most recent call last):") == 3


def test_a_traceback_is_over_when_its_source_says_something_else_or_the_run_ends():
    import io

    from pipeline.console import Tee

    console = io.StringIO()
    tee = Tee(console)  # no run log (yet): the console does not point to one
    for line in ["(pid=7) Traceback (most recent call last):", '(pid=7)   File "x.py", line 1, in <module>',
                 "(pid=7) KeyboardInterrupt", "(pid=7) Done.", "(pid=8) Traceback (most recent call last):",
                 "(pid=8) ValueError: bad"]:
        tee.write(line)
        tee.write("\n")
    assert console.getvalue().splitlines() == ["(pid=7) KeyboardInterrupt", "(pid=7) Done."]
    tee.end_blocks()
    assert console.getvalue().splitlines()[-1] == "(pid=8) ValueError: bad"


# What a search's train task and trials print, as Ray shows it on the driver (from a real run, trimmed)
CHATTER = [
    TRAIN + "",
    TRAIN + "Trial status: 2 PENDING",
    TRAIN + "Current time: 2026-11-30 06:26:53. Total running time: 0s",
    TRAIN + "Logical resource usage: 2.0/2 CPUs, 0/0 GPUs",
    TRAIN + "╭──────────────────────────────────────────╮",
    TRAIN + "│ Trial name              status           │",
    TRAIN + "╰──────────────────────────────────────────╯",
    TRAIN + "Trial run_trial_08426_00000 started with configuration:",
    TRAIN + "View detailed results here: /tmp/tiny/20261130-062644-06f2bb/tune",
    TRAIN + "To visualize your results with TensorBoard, run: `tensorboard --logdir /tmp/ray/session_2026-11-30`",
    TRIAL + "E0000 00:00:1796020020.630767   21230 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
    "Failed call to cuInit: UNKNOWN ERROR (303)",
    TRAIN + "Experiment state snapshotting has been triggered multiple times in the last 5.0 seconds and may become a "
    "bottleneck.",
    TRAIN + "Trial run_trial_08426_00000 completed after 1 iterations at 2026-11-30 06:27:08. Total running time: 15s",
    # the classic baseline as the first trial, outside the searched range
    TRAIN + "2026-11-30 07:01:02,345\tWARNING variant_generator.py:342 -- Pre-set value `0.0` is not within valid "
    "values of parameter `dropout`: (0.2, 0.5)",
]
SEARCH = [
    TRAIN + "[search] 08426_00000 epoch 1/2: val_accuracy 0.9512 | trials 0 done, 2 running, 2 pending | epochs 1/8 "
    "| best 0.9512 (08426_00000) | ETA 3m30s",
    TRAIN + "[search] 08426_00001 epoch 1/2: val_accuracy 0.9620 | trials 0 done, 2 running, 2 pending | epochs 2/8 "
    "| best 0.9620 (08426_00001) | ETA 2m58s",
    TRAIN + "[search] trial 08426_00000 finished: best val_accuracy 0.9801 (dropout=0.3592, learning_rate=0.0015)",
]
REAL_ERROR = TRAIN + "Trials did not complete: [run_trial_08426_00003]"


def tee_fed(lines: list[str], *, terminal: bool, **options):
    """A Tee over an in-memory console (a terminal or not) and log, fed `lines` the way Ray prints them."""
    import io

    from pipeline.console import LogSink, Tee
    from pipeline.live_view import LiveLine

    class Console(io.StringIO):
        def isatty(self) -> bool:
            return terminal

    console = Console()
    sink = LogSink.__new__(LogSink)
    sink._console, sink._file = console, io.StringIO()
    live = LiveLine(console, width=400) if terminal and not options.get("verbose") else None
    tee = Tee(console, sink, live=live, **options)
    for line in lines:
        print(line, file=tee)
    tee.write("\rtrain-images-idx3-ubyte:  50%|█████     | 4.86M/9.72M\r")  # a progress bar, redrawn
    tee.end_blocks()
    if live is not None:
        live.close()
    return console.getvalue(), sink._file.getvalue()


def test_off_a_terminal_the_console_shows_the_search_lines_and_real_errors_only_without_colour_codes():
    shown, logged = tee_fed(CHATTER + SEARCH + [REAL_ERROR], terminal=False)
    assert "\x1b" not in shown and "\r" not in shown
    assert shown.splitlines() == [
        SEARCH[0].removeprefix(TRAIN), SEARCH[1].removeprefix(TRAIN), SEARCH[2].removeprefix(TRAIN),
        re.sub(r"\x1b\[[0-9;]*m", "", REAL_ERROR),
    ]
    # the log keeps everything, without colour codes
    assert logged == re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", "".join(line + "\n" for line in CHATTER + SEARCH +
                                                                  [REAL_ERROR]))


def test_cuda_complaints_show_where_gpus_were_asked_for_and_verbose_shows_everything():
    shown, _ = tee_fed(CHATTER, terminal=False, gpus_wanted=True)
    assert [line for line in shown.splitlines()] == [re.sub(r"\x1b\[[0-9;]*m", "", CHATTER[10])]
    shown, logged = tee_fed(CHATTER + SEARCH, terminal=False, verbose=True)
    assert shown == logged


def test_the_live_line_ends_with_the_training():
    """After end_live_line (the train stage is over) what follows is written without the live line around it."""
    import io

    from pipeline.console import Tee
    from pipeline.live_view import LiveLine

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    console = Terminal()
    tee = Tee(console, live=LiveLine(console, width=400))
    for line in SEARCH:
        print(line, file=tee)
    assert "training: " in console.getvalue()
    tee.end_live_line()
    ended = len(console.getvalue())
    for line in ["stage evaluate: started", "run r finished in 1m", "  best trial: 08426_00001"]:
        print(line, file=tee)
    assert console.getvalue()[ended:] == "stage evaluate: started\nrun r finished in 1m\n  best trial: 08426_00001\n"


def test_on_a_terminal_the_epoch_lines_become_one_live_line_under_the_others():
    shown, _ = tee_fed(SEARCH + [REAL_ERROR], terminal=True)
    screen = _screen(shown)
    # the finished trial and the error stay; the live line (the last epoch's status, its ETA counting down from
    # 2m58s) was lifted for them, put back after them, and removed at the end
    assert screen[:2] == [SEARCH[2].removeprefix(TRAIN), re.sub(r"\x1b\[[0-9;]*m", "", REAL_ERROR)]
    live = re.findall(r"\r\x1b\[K(training: [^\r\n]*)", shown)
    assert live and all(text.startswith("training: trials 0 done, 2 running, 2 pending") for text in live)
    # counting down from 2m58s, however slowly this machine ran the test
    eta = r"ETA (2m[0-5]\ds|1m\d\ds|\d+s)"
    assert re.fullmatch(r"training: .* \| best 0\.9620 \(08426_00001\) \| " + eta, live[-1]), live[-1]
    assert "\rtrain-images-idx3-ubyte:  50%" in shown  # a progress bar is a terminal's


def _screen(output: str) -> list[str]:
    """What a terminal shows after `output`: \\r returns to the line's start, \\x1b[K erases the rest of it."""
    lines, current = [], ""
    for token in re.split(r"(\r|\n|\x1b\[K)", re.sub(r"\x1b\[[0-9;]*m", "", output)):
        if token == "\n":
            lines.append(current)
            current = ""
        elif token in ("\r", "\x1b[K"):
            current = "" if token == "\x1b[K" else current
        else:
            current += token
    return lines + ([current] if current else [])
