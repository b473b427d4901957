"""mnist-pipeline's command line: parse arguments, load the config, start or join Ray, run the pipeline.

Exit codes: 0 success, 1 runtime failure, 2 bad input (arguments, config, data), 130 interrupted.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from stages.errors import BadInputError, PipelineError
from stages.redact import redact

log = logging.getLogger("pipeline")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-pipeline",
        description="Download, preprocess, tune (Ray Tune) and evaluate the classic MNIST CNN.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_config_arguments(command: argparse.ArgumentParser) -> None:
        command.add_argument("--config", type=Path, metavar="FILE", help="YAML config (default: built-in defaults)")
        command.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override one setting, value parsed as YAML (e.g. --set train.epochs=2); repeatable",
        )
        command.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
        command.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
        command.add_argument("--debug", action="store_true", help="show tracebacks of errors")

    run = commands.add_parser("run", help="run the whole pipeline")
    add_config_arguments(run)
    run.add_argument(
        "--address", metavar="ADDRESS",
        help="join a running Ray cluster ('auto' or HOST:PORT) instead of starting a local Ray",
    )
    run.add_argument("--run-id", metavar="ID", help="name of the run folder (default: a new timestamped id)")
    run.add_argument(
        "--resume", metavar="RUN",
        help="continue an interrupted run (a run id under run.root, or the run's folder or URI) with its own "
        "config.yaml; finished stages are skipped, Tune restores its experiment",
    )

    show = commands.add_parser("config", help="print the resolved config (file + overrides) and exit")
    add_config_arguments(show)

    runs = commands.add_parser(
        "runs", help="list the runs under run.root with their accuracies",
        description="List the runs under run.root: status (finished, or the stage it stopped in), validation and "
        "test accuracy, trials, time.",
    )
    add_config_arguments(runs)

    predict = commands.add_parser(
        "predict", help="classify images of digits with a run's model",
        description="Classify PNG/JPEG images of single digits (any size, colour or grey, dark ink on paper or light "
        "on dark) with a run's exported model; prints each image's digit and probability.",
    )
    predict.add_argument("model", metavar="RUN_OR_MODEL", help="run id (under run.root), run folder, or model.keras")
    predict.add_argument("images", metavar="IMAGE", nargs="+", type=str, help="PNG or JPEG files")
    predict.add_argument("--top", type=int, default=1, metavar="K", help="also show the next K-1 likeliest digits")
    add_config_arguments(predict)

    dashboard = commands.add_parser(
        "dashboard", help="TensorBoard over a run's trials (or all runs), and the Ray dashboard's URL"
    )
    dashboard.add_argument("run", metavar="RUN", nargs="?", help="run id or folder (default: every run in run.root)")
    dashboard.add_argument("--host", default="127.0.0.1", help="address TensorBoard binds to (default: 127.0.0.1)")
    dashboard.add_argument("--port", type=int, default=6006, help="TensorBoard's port (default: 6006)")
    add_config_arguments(dashboard)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mnist-pipeline")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args)
    try:
        return _dispatch(args)
    except PipelineError as error:
        if args.debug:
            log.exception("failed")
        print(f"mnist-pipeline: error: {redact(str(error))}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("mnist-pipeline: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug or an environment problem: one line, the traceback with --debug
        if args.debug:
            raise
        print(f"mnist-pipeline: error: {type(error).__name__}: {redact(_first_line(error))} (rerun with --debug)",
              file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    from pipeline.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "resume", None):
        return _resume(args, overrides)
    if getattr(args, "run_id", None):
        overrides.append(f"run.id={json.dumps(args.run_id)}")  # JSON quoting: the id stays a string
    if getattr(args, "address", None):
        overrides.append(f"ray.address={json.dumps(args.address)}")
    config = load_config(args.config, overrides)
    if args.command == "config":
        print(config.to_yaml(), end="")
        return 0
    if args.command == "runs":
        from pipeline.runs import format_runs, list_runs

        print(format_runs(list_runs(config.run.root), config.run.root))
        return 0
    if args.command == "predict":
        return _predict(args, config.run.root)
    if args.command == "dashboard":
        return _dashboard(args, config.run.root)
    return _run(config)


def _predict(args: argparse.Namespace, root: str) -> int:
    from pipeline.predict import find_model, format_prediction, load_digit, predict

    if args.top < 1 or args.top > 10:
        raise BadInputError(f"--top {args.top}: give a number from 1 to 10")
    model = find_model(args.model, root)
    digits, failed = {}, 0
    for image in args.images:  # every image is read before the model loads: a typo is reported at once
        try:
            digits[image] = load_digit(image)
        except BadInputError as error:
            print(f"mnist-pipeline: error: {error}", file=sys.stderr)
            failed += 1
    if digits:
        for prediction in predict(model, digits):
            print(format_prediction(prediction, top=args.top))
    return 2 if failed else 0


def _dashboard(args: argparse.Namespace, root: str) -> int:
    import signal

    from pipeline.dashboard import logdir_for, ray_dashboard_url, start_tensorboard, stop

    if not 0 < args.port < 65536:
        raise BadInputError(f"--port {args.port}: not a port number")
    logdir = logdir_for(args.run, root)
    board, url = start_tensorboard(logdir, args.host, args.port)
    # Ctrl-C and `kill` stop TensorBoard with us, even where SIGINT came ignored (started from a background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        ray_url = ray_dashboard_url(logdir.parent if args.run else None)
        print(f"TensorBoard:    {url} (trials in {logdir}; SCALARS: curves per trial, HPARAMS: the search)")
        print(f"Ray dashboard:  {ray_url}" if ray_url else
              "Ray dashboard:  none running here (a local run serves one while it runs; for a cluster: "
              "ray dashboard cluster.yaml, then http://127.0.0.1:8265)")
        print("Ctrl-C stops TensorBoard.", flush=True)
        board.wait()
        raise PipelineError(f"TensorBoard stopped (exit code {board.returncode})")
    except KeyboardInterrupt:
        return 0
    finally:
        stop(board)


def _resume(args: argparse.Namespace, overrides: list[str]) -> int:
    from pipeline.config import load_config, load_run_config
    from pipeline.run_folder import locate_run
    from stages import storage

    if args.config is not None:
        raise BadInputError(
            "--resume continues a run with its own config.yaml: change settings with --set, not --config"
        )
    if args.run_id:
        raise BadInputError("--resume RUN names the run already: leave out --run-id")
    if args.address:
        overrides.append(f"ray.address={json.dumps(args.address)}")
    # a run id is looked up in run.root: the default, or as --set gives it
    run = locate_run(args.resume, load_config(None, overrides).run.root)
    # the folder may have moved since the run started: it is where it is now
    overrides += [
        f"run.root={json.dumps(storage.parent_of(run.location))}",
        f"run.id={json.dumps(run.run_id)}",
    ]
    if not storage.exists(run.config_file):
        raise BadInputError(f"no run to resume at {redact(run.location)} (no config.yaml there)")
    return _run(load_run_config(run.config_file, overrides), resume=True)


def _run(config, *, resume: bool = False) -> int:
    from pipeline.run_folder import create_run_folder, open_run_folder, remove_empty_run_folder, run_lock
    from pipeline.runner import (
        check_cluster,
        check_quality_gate,
        check_resume,
        format_summary,
        ray_session,
        run_pipeline,
    )
    from stages import storage

    if config.ray.address is None and config.ray.num_cpus is not None:
        if config.train.cpus_per_trial > config.ray.num_cpus:
            raise BadInputError(
                f"train.cpus_per_trial={config.train.cpus_per_trial:g} exceeds ray.num_cpus={config.ray.num_cpus}"
            )
    open_or_create = open_run_folder if resume else create_run_folder
    run = open_or_create(config.run.root, config.run.id)
    if resume:
        check_resume(config, run)
    with run_lock(run), ray_session(config) as dashboard:
        try:
            check_cluster(config)
        except BadInputError:
            if not resume:
                remove_empty_run_folder(run)  # a refused run leaves nothing behind
            raise
        storage.write_bytes(run.config_file, config.to_yaml().encode())
        with _run_log(run):
            started = "resumed" if resume else "started"
            log.info("run %s: %s; artifacts in %s", run.run_id, started, redact(run.location))
            if dashboard:
                log.info("Ray dashboard: %s", dashboard)
            summary = run_pipeline(config, run, resume=resume)
            print(format_summary(summary))
            check_quality_gate(config, summary)
    return 0


@contextmanager
def _run_log(run):
    """Keeps the run's full log in its folder: the driver's log records (with timestamps) and everything Ray shows
    from the tasks and trials (their logs, Tune's trial table). A remote run's log is uploaded at the end, after
    the log an earlier attempt of the run left there."""
    from stages import storage

    with storage.local_folder_for(run.location) as folder:
        log_file = folder / storage.name_of(run.log_file)
        if storage.is_uri(run.location) and storage.exists(run.log_file):
            log_file.write_bytes(storage.read_bytes(run.log_file))
        sink = _LogSink(log_file, sys.stderr)
        handler = logging.StreamHandler(sink)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        stdout, stderr = sys.stdout, sys.stderr
        # Ray prints what tasks and trials write through sys.stdout/sys.stderr as it finds them
        sys.stdout, sys.stderr = _Tee(stdout, sink), _Tee(stderr, sink)
        try:
            yield
        except BaseException as error:  # the console gets its one line from main(); the log keeps it too
            reason = redact(str(error)) if isinstance(error, PipelineError) else type(error).__name__
            sink.write(f"run stopped: {reason or type(error).__name__}\n")
            raise
        finally:
            sys.stdout, sys.stderr = stdout, stderr
            logging.getLogger().removeHandler(handler)
            sink.close()


class _LogSink:
    """The run's log file. A full or failing disk ends the log, said once on the console, never the run."""

    def __init__(self, path, console):
        self._console = console
        try:
            self._file = open(path, "a", encoding="utf-8")
        except OSError as error:
            self._fail(error)

    def write(self, text: str) -> None:
        self._guard(lambda: self._file.write(text))

    def flush(self) -> None:
        self._guard(lambda: self._file.flush())

    def close(self) -> None:
        self._guard(lambda: self._file.close())
        self._file = None

    def _guard(self, action) -> None:
        if self._file is None:
            return
        try:
            action()
        except OSError as error:
            self._fail(error)

    def _fail(self, error: OSError) -> None:
        self._file = None
        self._console.write(f"mnist-pipeline: warning: pipeline.log is not written any more: {error.strerror}\n")


class _Tee(io.TextIOBase):
    """A console stream that also appends what it shows, without colour codes, to the run's log.

    TensorFlow's start-up chatter from each task and trial process (info lines its C++ logging prints before any
    setting can stop it) goes to the log only, so that the console shows the run rather than a wall of logs.
    """

    _ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
    _TF_CHATTER = re.compile(
        r"\) (I\d{4} \d\d:\d\d:[\d.]+ +\d+ \w+\.cc:\d+\]"  # absl info lines of a worker
        r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
        r"|To enable the following instructions: .* rebuild TensorFlow)"
    )

    def __init__(self, console, sink):
        self._console, self._sink = console, sink
        self._dropped_line = False

    def write(self, text: str) -> int:
        plain = self._ANSI.sub("", text)
        if "\r" not in text:  # progress bars redraw themselves with \r: the console's business, not the log's
            self._sink.write(plain)
        if self._TF_CHATTER.search(plain):
            self._dropped_line = True  # print() writes the line's newline separately
            return len(text)
        if not (self._dropped_line and text == "\n"):
            self._console.write(text)
        self._dropped_line = False
        return len(text)

    def flush(self) -> None:
        self._console.flush()
        self._sink.flush()

    def isatty(self) -> bool:
        return self._console.isatty()

    def fileno(self) -> int:
        return self._console.fileno()

    @property
    def encoding(self):
        return getattr(self._console, "encoding", "utf-8")


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
