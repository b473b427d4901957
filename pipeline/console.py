"""The console and the run's log while a run goes on.

Ray prints on the driver's console what the tasks and trials write; the console shows the run, the run's
`pipeline.log` keeps everything (the driver's records with timestamps, every worker line, tracebacks included).
"""

from __future__ import annotations

import io
import logging
import re
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from pipeline.live_view import LiveLine
from pipeline.stopping import STOP
from stages.common.errors import PipelineError
from stages.common.redact import redact
from stages.training.progress import EPOCH_LINE, PREFIX, parse_seconds


@contextmanager
def console(*, verbose: bool = False, gpus_wanted: bool = False):
    """While Ray runs, what it shows from the tasks and trials on this console goes through a filter (Tee) that
    keeps worker tracebacks, TensorFlow's and Tune's chatter off the console (the run's log, once open, gets
    everything); `verbose` shows everything. On a terminal the search's progress is one live line (LiveLine); off
    one, lines come without colour codes. The driver's own log records go to the console the same way."""
    stdout, stderr = sys.stdout, sys.stderr
    live = LiveLine(stdout) if stdout.isatty() and not verbose else None
    # Ray prints what tasks and trials write through sys.stdout/sys.stderr as it finds them
    tees = (Tee(stdout, live=live, verbose=verbose, gpus_wanted=gpus_wanted),
            Tee(stderr, live=live, verbose=verbose, gpus_wanted=gpus_wanted))
    sys.stdout, sys.stderr = tees
    rerouted = _reroute_log_handlers({stdout: tees[0], stderr: tees[1]})
    quieted = _quiet_ray_notes(verbose)
    try:
        yield tees
    finally:
        for tee in tees:
            tee.end_blocks()
        if live is not None:
            live.close()
        for handler, stream in rerouted:
            handler.setStream(stream)
        for logger, level in quieted:
            logger.setLevel(level)
        sys.stdout, sys.stderr = stdout, stderr


def _reroute_log_handlers(tees: dict) -> list:
    """The root logger's console handlers write through the tees' console side (the live line stays last, colour
    codes go off a terminal); the run's log has a handler of its own. Returns (handler, its stream) to put back."""
    rerouted = []
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        if isinstance(handler, logging.StreamHandler) and stream in tees:
            handler.setStream(_ConsoleSide(tees[stream]))
            rerouted.append((handler, stream))
    return rerouted


def _quiet_ray_notes(verbose: bool) -> list:
    """Ray's notes that are no news on a local Ray the pipeline starts (token authentication is on, as it is by
    default) stay off the console; -v shows them."""
    if verbose:
        return []
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    quieted = [(logger, logger.level)]
    logger.setLevel(logging.ERROR)
    return quieted


class _ConsoleSide(io.TextIOBase):
    """A Tee's console, for writers whose lines the run's log gets otherwise (the driver's log records)."""

    def __init__(self, tee: Tee) -> None:
        self._tee = tee

    def write(self, text: str) -> int:
        self._tee.show(text)
        return len(text)

    def flush(self) -> None:
        self._tee.console.flush()


@contextmanager
def run_log(run, tees):
    """Keeps the run's full log in its folder: the driver's log records (with timestamps) and everything Ray shows
    from the tasks and trials (their logs, Tune's trial table, worker tracebacks). A remote run's log is uploaded at
    the end, after the log an earlier attempt of the run left there."""
    from stages.common import storage

    with storage.local_folder_for(run.location) as folder:
        log_file = folder / storage.name_of(run.log_file)
        if storage.is_uri(run.location) and storage.exists(run.log_file):
            log_file.write_bytes(storage.read_bytes(run.log_file))
        sink = LogSink(log_file, tees[1].console)
        handler = logging.StreamHandler(sink)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        for tee in tees:
            tee.sink = sink
        try:
            yield
        except BaseException as error:  # the console gets its one line from main(); the log keeps it too
            if isinstance(error, KeyboardInterrupt) or STOP.signum is not None:
                reason = STOP.reason()
            elif isinstance(error, PipelineError):
                reason = redact(str(error))
            else:
                reason = type(error).__name__
            sink.write(f"run stopped: {reason or type(error).__name__}\n")
            if isinstance(error.__cause__, ray_error_types()):  # a task's failure: its worker's traceback
                sink.write(Tee._ANSI.sub("", str(error.__cause__)).rstrip("\n") + "\n")
            raise
        finally:
            for tee in tees:
                tee.end_blocks()
                tee.sink = None
            logging.getLogger().removeHandler(handler)
            sink.close()


def ray_error_types() -> tuple[type, ...]:
    import ray

    return (ray.exceptions.RayError,)


class LogSink:
    """The run's log file. A full or failing disk ends the log, said once on the console, never the run."""

    def __init__(self, path, console):
        self._console = console
        try:
            self._file = open(path, "a", encoding="utf-8")
        except OSError as error:
            self._fail(error)

    @property
    def writing(self) -> bool:
        return self._file is not None

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


@dataclass
class _Traceback:
    """A traceback a worker is writing: the run's log it went to (if any), and its latest exception line."""

    log: LogSink | None
    exception: str | None = None


class Tee(io.TextIOBase):
    """A console stream that also appends what it shows, without colour codes, to the run's log (`sink`, while the
    log is open), and keeps some of it for the log only:

    - worker tracebacks: Ray shows each line a task or trial writes as `(name pid=N) line`; a traceback there
      (Tune's report of a failed trial, say) goes to the log only, and the console gets its exception line once
      the traceback is over: `(name pid=N) OSError: ... [traceback in pipeline.log]`. The run's own outcome is
      main()'s last line. Lines Ray held back as repeated (`[repeated 2x across cluster]`) that belong to a
      traceback are dropped from the console too.
    - TensorFlow's start-up chatter from each task and trial process (info lines its C++ logging prints before any
      setting can stop it), so that the console shows the run rather than a wall of logs;
    - Tune's own lines when the run stops it (they suggest `Tuner.restore`; a run is continued with --resume);
    - credentials in URIs, whoever printed them (MLflow prints links to its runs): redacted on the console and in
      the log;
    - Tune's trial tables, per-trial boxes and notes, and CUDA's complaints where no GPU was asked for: the search's
      own lines (`[search] ...`, stages.training.progress) say how it goes, without Ray's `(train_task pid=N)` in
      front; on a terminal its epoch lines become the live line.

    `verbose`: the console shows everything the log gets. Off a terminal the console gets no colour codes and no
    progress bars (they redraw themselves with \r).
    """

    _ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
    _LOG_ONLY = re.compile(
        r"\) (I\d{4} \d\d:\d\d:[\d.]+ +\d+ \w+\.cc:\d+\]"  # absl info lines of a worker
        r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
        r"|To enable the following instructions: .* rebuild TensorFlow"
        r"|Stop signal received \(e\.g\. via SIGINT/Ctrl\+C\), ending Ray Tune run"
        r"|Experiment has been interrupted, but the most recent state was saved"
        r"|Resume experiment with: Tuner\.restore\()"
    )
    # Tune's chatter (verbose=1 keeps its trial table in the run's log), by the message of a worker line
    _TUNE_CHATTER = re.compile(
        r"$|[\u2500-\u257f]"  # blank lines and the tables' box drawing
        r"|Trial status:|Current time:|Logical resource usage:|Current best trial:"
        r"|Trial \S+ (started with configuration:|completed after|finished iteration|errored after)"
        r"|View detailed results here:|To visualize your results with TensorBoard"
        r"|Wrote the latest version of all result files|Checkpoint successfully created at:"
        r"|Experiment state snapshotting has been triggered|You may want to consider increasing the `CheckpointConfig"
        r"|You can suppress this warning by setting the environment variable TUNE_WARN"
        r"|Training (started|finished) (iteration|with)"
        r"|Restored on \S+ from checkpoint: Checkpoint\("  # a paused trial (halving, pbt) going on
        r"|.*Pre-set value `.*` is not (within valid values|equal to the value) of parameter"  # the base trial
    )
    _NO_GPU_CHATTER = re.compile(r"failed call to cuInit|Could not find cuda drivers|cuda_(platform|executor)\.cc")
    _WORKER_LINE = re.compile(r"\((?P<source>[^()]*\bpid=[^()]*)\) (?P<message>.*)", re.DOTALL)
    _REPEATED = re.compile(r" *\[repeated \d+x across cluster\].*")  # and, the first time, Ray's note on it
    _TRACEBACK = "Traceback (most recent call last):"
    _CHAINED = (
        "During handling of the above exception, another exception occurred:",
        "The above exception was the direct cause of the following exception:",
    )
    # `OSError: ...`, `pickle.UnpicklingError: ...`, `ray.exceptions.RayTaskError(OSError): ...`, `KeyboardInterrupt`
    _EXCEPTION = re.compile(r"(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:\([\w.]*\))?(?::.*)?")

    def __init__(self, console, sink=None, *, live: LiveLine | None = None, verbose: bool = False,
                 gpus_wanted: bool = False):
        self.console, self.sink = console, sink
        self._live, self._verbose, self._gpus_wanted = live, verbose, gpus_wanted
        self._terminal = _isatty(console)
        self._partial = ""
        self._tracebacks: dict[str, _Traceback] = {}  # by source (`name pid=N`): the traceback it is writing
        self._lock = threading.RLock()

    def write(self, text: str) -> int:
        with self._lock:
            if "\r" in text:  # progress bars redraw themselves with \r: the console's business, not the log's
                if self._terminal:
                    self._write_console(text)
                return len(text)
            self._partial += text
            while "\n" in self._partial:
                line, self._partial = self._partial.split("\n", 1)
                self._line(line + "\n")
        return len(text)

    def end_live_line(self) -> None:
        """Removes the live line for good (the training is over): what follows is written as plain lines."""
        if self._live is not None:
            self._live.close()

    def show(self, text: str) -> None:
        """Writes to the console only (above the live line; colour codes off a terminal)."""
        with self._lock:
            self._write_console(text if self._terminal else self._ANSI.sub("", text))

    def _line(self, line: str) -> None:
        if "://" in line:  # credentials in a URI a library printed (MLflow's links to its runs) are never shown
            line = redact(line)
        plain = self._ANSI.sub("", line)
        if self.sink is not None:
            self.sink.write(plain)
        if self._verbose:
            self._write_console(line if self._terminal else plain)
            return
        match = self._WORKER_LINE.fullmatch(plain.rstrip("\n"))
        message = match["message"] if match else ""
        if message.startswith(PREFIX):  # the search's own line: shown as it is, or as the live line
            epoch = EPOCH_LINE.fullmatch(message)
            if epoch is not None and self._live is not None:
                self._live.update(epoch["status"], parse_seconds(epoch["eta"]))
            else:
                self._write_console(message + "\n")
            return
        if self._shows(plain.rstrip("\n"), line.rstrip("\n")):
            self._write_console(line if self._terminal else plain)

    def _write_console(self, text: str) -> None:
        if self._live is not None:
            self._live.write(self.console, text)
        else:
            self.console.write(text)

    def _shows(self, plain: str, line: str) -> bool:
        """Whether the console shows this line; follows the tracebacks of the line's source."""
        match = self._WORKER_LINE.fullmatch(plain)
        source = match["source"] if match else None
        for other, traceback in self._tracebacks.items():  # another source speaks: what the others said of their
            if other != source:                            # tracebacks so far is over
                self._show_exception(traceback)
        if match is None:
            return not self._LOG_ONLY.search(plain)
        if self._TUNE_CHATTER.match(match["message"].strip()) or (
            not self._gpus_wanted and self._NO_GPU_CHATTER.search(match["message"])
        ):
            return False
        message = self._REPEATED.sub("", match["message"]).rstrip()
        repeated = message != match["message"].rstrip()
        traceback = self._tracebacks.get(source)
        if message.startswith(self._TRACEBACK):
            if traceback is None and not repeated:
                self._tracebacks[source] = _Traceback(log=self.sink)
            return False
        if traceback is not None or repeated:
            if not message or message[0].isspace() or message in self._CHAINED:
                return False  # frames, code, carets, the lines between chained tracebacks
            if self._EXCEPTION.fullmatch(message):
                if traceback is not None:
                    traceback.exception = line
                return False
            if traceback is not None:  # the traceback is over
                self._show_exception(self._tracebacks.pop(source))
        return not self._LOG_ONLY.search(plain)

    def _show_exception(self, traceback: _Traceback) -> None:
        if traceback.exception:
            where = " [traceback in pipeline.log]" if traceback.log is not None and traceback.log.writing else ""
            exception = traceback.exception if self._terminal else self._ANSI.sub("", traceback.exception)
            self._write_console(f"{exception}{where}\n")
            traceback.exception = None

    def end_blocks(self) -> None:
        """The tracebacks under way are over: their exception lines go to the console now."""
        with self._lock:
            if self._partial:
                partial, self._partial = self._partial, ""
                self._line(partial)
            for traceback in self._tracebacks.values():
                self._show_exception(traceback)
            self._tracebacks.clear()

    def flush(self) -> None:
        with self._lock:
            self.console.flush()
            if self.sink is not None:
                self.sink.flush()

    def isatty(self) -> bool:
        return self.console.isatty()

    def fileno(self) -> int:
        return self.console.fileno()

    @property
    def encoding(self):
        return getattr(self.console, "encoding", "utf-8")


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream
        return False
