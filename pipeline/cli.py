"""mnist-pipeline's command line: parse arguments, load the config, start or join Ray, run the pipeline.

Exit codes: 0 success, 1 runtime failure, 2 bad input (arguments, config, data), 130 interrupted (SIGINT, Ctrl-C),
143 stopped (SIGTERM: `kill`, `docker stop`, Kubernetes, Slurm, systemd). Both signals stop a run the same way:
Tune saves its experiment, Ray shuts down, nothing partial is left, and `run --resume` continues it.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from pipeline.stopping import STOP
from stages.common.errors import BadInputError, PipelineError
from stages.common.redact import redact

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

    export = commands.add_parser(
        "export-config", help="print a config that retrains a run's winning trial as a single trial, exactly",
        description="Print the config (YAML) that retrains the winning trial of a finished run as one trial: its "
        "hyperparameters, seed and learning-rate cycles, the run's data, CPUs per trial and precision. On the same "
        "machine its validation accuracy is the run's to the last digit.",
    )
    export.add_argument("run", metavar="RUN", help="run id (under run.root), run folder or URI")
    add_config_arguments(export)

    runs = commands.add_parser(
        "runs", help="list the runs under run.root with their accuracies, or compare runs side by side",
        description="Without RUN: list the runs under run.root: status (finished, or the stage it stopped in), "
        "validation and test accuracy, trials, time. With two or more RUNs (ids under run.root, folders or URIs): "
        "those runs side by side, and every setting they differ in.",
    )
    runs.add_argument("runs", metavar="RUN", nargs="*", help="runs to compare (two or more)")
    add_config_arguments(runs)

    predict = commands.add_parser(
        "predict", help="classify images of digits with a run's model",
        description="Classify images of single digits (PNG, JPEG, GIF, TIFF, BMP, WebP or PNM; any size up to 64 "
        "megapixels, colour or grey, 8 or 16 bits, transparent or not, dark ink on paper or light "
        "on dark) with a run's exported model; prints each image's digit and probability.",
    )
    predict.add_argument("model", metavar="RUN_OR_MODEL", help="run id (under run.root), run folder, or model.keras")
    predict.add_argument(
        "images", metavar="IMAGE", nargs="+", type=str,
        help="image files; a bad one is reported on its own line (exit 2), the others are still classified",
    )
    which = predict.add_mutually_exclusive_group()
    which.add_argument(
        "--ensemble", action="store_true", default=None,
        help="use the run's top-k ensemble (model/ensemble.keras, made with evaluate.ensemble_top_k); default: "
        "whichever of the ensemble and the single best model did better on the validation split",
    )
    which.add_argument(
        "--single", dest="ensemble", action="store_false", help="use the run's single best model (model/model.keras)"
    )
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
    STOP.__init__()  # what stopped an earlier run in this process (tests) is not this one's
    try:
        return _dispatch(args)
    except (Exception, KeyboardInterrupt) as error:
        if isinstance(error, KeyboardInterrupt) or STOP.signum is not None:
            # however the stop surfaced (Ray turns a signal handler's exception into KeyboardInterrupt; a task that
            # ended because of the stop may fail otherwise), it is the stop that ended the run
            if args.debug:
                log.exception("stopped")
            print(f"mnist-pipeline: {STOP.outcome()}", file=sys.stderr)
            return STOP.exit_code()
        if isinstance(error, PipelineError):
            if args.debug:
                log.exception("failed")
            print(f"mnist-pipeline: error: {redact(str(error))}", file=sys.stderr)
            return error.exit_code
        # a bug or an environment problem: one line, the traceback with --debug
        if args.debug:
            raise
        print(f"mnist-pipeline: error: {type(error).__name__}: {redact(_first_line(error))} (rerun with --debug)",
              file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    from pipeline.config_loading import load_config

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
    if args.command == "export-config":
        from pipeline.export_config import export_config

        print(export_config(args.run, config.run.root), end="")
        return 0
    if args.command == "runs":
        from pipeline.runs import compare_runs, format_runs, list_runs

        if args.runs:
            print(compare_runs(args.runs, config.run.root))
        else:
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
    if hasattr(sys.stdout, "reconfigure"):  # a name the terminal's encoding cannot show is escaped, not a crash
        sys.stdout.reconfigure(errors="backslashreplace")
    model = find_model(args.model, root, ensemble=args.ensemble)
    digits, failed = [], 0
    for image in args.images:  # every image is read before the model loads: a typo is reported at once
        try:
            digits.append((image, load_digit(image)))
        except BadInputError as error:  # one bad image is one line; the others are still classified
            print(f"mnist-pipeline: error: {error}", file=sys.stderr, flush=True)
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
    from pipeline.config_loading import load_config, load_run_config
    from pipeline.resumable import check_resumable
    from pipeline.run_folder import locate_run, names_a_folder
    from stages.common import storage

    if args.config is not None:
        raise BadInputError(
            "--resume continues a run with its own config.yaml: change settings with --set, not --config"
        )
    if args.run_id:
        raise BadInputError("--resume RUN names the run already: leave out --run-id")
    if args.address:
        overrides.append(f"ray.address={json.dumps(args.address)}")
    # A run id is looked up in run.root (the default, or as --set gives it): only that override is applied to the
    # defaults here. Every override is checked against the run's own config.yaml below, never against the defaults,
    # which may differ from it in what makes a value valid (data.validation_size against data.max_train_images).
    root = None
    if not names_a_folder(args.resume):
        root_overrides = [o for o in overrides if o.partition("=")[0].strip() in ("run", "run.root")]
        root = load_config(None, root_overrides).run.root
    run = locate_run(args.resume, root)
    check_resumable(run)  # a run of ours, intact records, nobody else's code in its Tune state; nothing written yet
    # the folder may have moved since the run started: it is where it is now
    overrides += [
        f"run.root={json.dumps(storage.parent_of(run.location))}",
        f"run.id={json.dumps(run.run_id)}",
    ]
    return _run(load_run_config(run.config_file, overrides), resume=True)


def _run(config, *, resume: bool = False) -> int:
    from pipeline.cluster_checks import check_cluster, check_search
    from pipeline.console import console, run_log
    from pipeline.ray_session import ray_session
    from pipeline.ray_startup import check_reachable, ray_target
    from pipeline.run_folder import create_run_folder, open_run_folder, remove_empty_run_folder, run_lock
    from pipeline.runner import check_resume, run_pipeline
    from pipeline.stopping import remove_partial_files, stop_tune
    from pipeline.summary import check_quality_gate, format_summary, summary_record
    from pipeline.tracking import open_tracking
    from stages.common import storage

    handlers = STOP.start()  # SIGTERM ends the run like Ctrl-C, from the start
    run = None
    try:
        # before the run folder exists: a cluster nobody can reach leaves nothing behind, within seconds
        check_reachable(ray_target(config.ray.address))
        open_or_create = open_run_folder if resume else create_run_folder
        run = open_or_create(config.run.root, config.run.id)
        STOP.run = run.location
        if resume:
            check_resume(config, run)
        tracking = open_tracking(config, run, resume=resume)  # before Ray: a server out of reach refuses at once
        quiet_console = console(
            verbose=logging.getLogger().isEnabledFor(logging.DEBUG),  # -v: the console shows what the log gets
            gpus_wanted=config.train.gpus_per_trial > 0 or bool(config.ray.num_gpus),
        )
        with run_lock(run), quiet_console as tees, ray_session(config) as dashboard:
            STOP.install()  # again: ray.init put Ray's own in place (for SIGTERM a native stack dump and exit 1)
            check_cluster(config)
            storage.write_bytes(run.config_file, config.to_yaml().encode())
            with run_log(run, tees):
                started = "resumed" if resume else "started"
                log.info("run %s: %s; artifacts in %s", run.run_id, started, redact(run.location))
                if dashboard:
                    log.info("Ray dashboard: %s", dashboard)
                check_search(config)
                try:
                    summary = run_pipeline(config, run, resume=resume, tracking=tracking,
                                           training_over=tees[0].end_live_line)
                except BaseException:
                    if STOP.signum is not None:
                        stop_tune(run)
                    if tracking is not None:
                        tracking.finish(run, None, None, stopped=STOP.signum is not None)
                    raise
                if tracking is not None:
                    tracking.finish(run, summary_record(summary) | {"test_loss": summary.metrics.test_loss},
                                    config.tracking.register_model)
                print(format_summary(summary))
                check_quality_gate(config.evaluate.min_test_accuracy, summary)
    except SystemExit as error:
        if error.code != signal.SIGTERM or STOP.signum is not None:
            raise
        STOP.signum = signal.SIGTERM  # from ray.init's own handler, in place while Ray starts (its atexit stops it)
        raise KeyboardInterrupt from None
    finally:
        if STOP.signum is not None and run is not None:  # Ray is down: what a killed writer left is nobody's
            remove_partial_files(run, config)
        if run is not None and not resume and not storage.exists(run.config_file):
            # refused or stopped before it began (no Ray, a cluster that refuses it): nothing to keep or resume
            STOP.run = None
            try:
                remove_empty_run_folder(run)
            except OSError:
                pass
        STOP.restore(handlers)
    return 0


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
