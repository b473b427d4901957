"""mnist-pipeline's command line: parse arguments, load the config, start or join Ray, run the pipeline.

Exit codes: 0 success, 1 runtime failure, 2 bad input (arguments, config, data), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
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
    return parser


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
    return _run(config)


def _resume(args: argparse.Namespace, overrides: list[str]) -> int:
    from pipeline.config import load_config, load_run_config
    from stages import storage

    if args.config is not None:
        raise BadInputError(
            "--resume continues a run with its own config.yaml: change settings with --set, not --config"
        )
    if args.run_id:
        raise BadInputError("--resume RUN names the run already: leave out --run-id")
    if args.address:
        overrides.append(f"ray.address={json.dumps(args.address)}")
    if storage.is_uri(args.resume) or "/" in args.resume:
        location = args.resume if storage.is_uri(args.resume) else str(Path(args.resume).expanduser().resolve())
    else:  # a run id: look in run.root (the default, or as --set gives it)
        root = load_config(None, overrides).run.root
        location = storage.join(root if storage.is_uri(root) else str(Path(root).expanduser().resolve()), args.resume)
    # the folder may have moved since the run started: it is where it is now
    overrides += [
        f"run.root={json.dumps(storage.parent_of(location))}",
        f"run.id={json.dumps(storage.name_of(location))}",
    ]
    config_file = storage.join(location, "config.yaml")
    if not storage.exists(config_file):
        raise BadInputError(f"no run to resume at {redact(location)} (no config.yaml there)")
    return _run(load_run_config(config_file, overrides), resume=True)


def _run(config, *, resume: bool = False) -> int:
    from pipeline.run_folder import create_run_folder, open_run_folder, remove_empty_run_folder, run_lock
    from pipeline.runner import check_cluster, check_quality_gate, format_summary, ray_session, run_pipeline
    from stages import storage

    if config.ray.address is None and config.ray.num_cpus is not None:
        if config.train.cpus_per_trial > config.ray.num_cpus:
            raise BadInputError(
                f"train.cpus_per_trial={config.train.cpus_per_trial:g} exceeds ray.num_cpus={config.ray.num_cpus}"
            )
    open_or_create = open_run_folder if resume else create_run_folder
    run = open_or_create(config.run.root, config.run.id)
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
    """Keeps the driver's log in the run folder (written locally, uploaded at the end for a remote run)."""
    from stages import storage

    with storage.local_folder_for(run.location) as folder:
        handler = logging.FileHandler(folder / "pipeline.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        try:
            yield
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
