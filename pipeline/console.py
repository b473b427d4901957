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

from pipeline.stopping import STOP
from stages.errors import PipelineError
from stages.redact import redact


@contextmanager
def console():
    """While Ray runs, what it shows from the tasks and trials on this console goes through a filter (Tee) that
    keeps worker tracebacks and TensorFlow's chatter off the console (the run's log, once open, gets everything)."""
    stdout, stderr = sys.stdout, sys.stderr
    # Ray prints what tasks and trials write through sys.stdout/sys.stderr as it finds them
    tees = Tee(stdout), Tee(stderr)
    sys.stdout, sys.stderr = tees
    try:
        yield tees
    finally:
        for tee in tees:
            tee.end_blocks()
        sys.stdout, sys.stderr = stdout, stderr


@contextmanager
def run_log(run, tees):
    """Keeps the run's full log in its folder: the driver's log records (with timestamps) and everything Ray shows
    from the tasks and trials (their logs, Tune's trial table, worker tracebacks). A remote run's log is uploaded at
    the end, after the log an earlier attempt of the run left there."""
    from stages import storage

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
    - Tune's own lines when the run stops it (they suggest `Tuner.restore`; a run is continued with --resume).
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
    _WORKER_LINE = re.compile(r"\((?P<source>[^()]*\bpid=[^()]*)\) (?P<message>.*)", re.DOTALL)
    _REPEATED = re.compile(r" *\[repeated \d+x across cluster\].*")  # and, the first time, Ray's note on it
    _TRACEBACK = "Traceback (most recent call last):"
    _CHAINED = (
        "During handling of the above exception, another exception occurred:",
        "The above exception was the direct cause of the following exception:",
    )
    # `OSError: ...`, `pickle.UnpicklingError: ...`, `ray.exceptions.RayTaskError(OSError): ...`, `KeyboardInterrupt`
    _EXCEPTION = re.compile(r"(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:\([\w.]*\))?(?::.*)?")

    def __init__(self, console, sink=None):
        self.console, self.sink = console, sink
        self._partial = ""
        self._tracebacks: dict[str, _Traceback] = {}  # by source (`name pid=N`): the traceback it is writing
        self._lock = threading.RLock()

    def write(self, text: str) -> int:
        with self._lock:
            if "\r" in text:  # progress bars redraw themselves with \r: the console's business, not the log's
                self.console.write(text)
                return len(text)
            self._partial += text
            while "\n" in self._partial:
                line, self._partial = self._partial.split("\n", 1)
                self._line(line + "\n")
        return len(text)

    def _line(self, line: str) -> None:
        plain = self._ANSI.sub("", line)
        if self.sink is not None:
            self.sink.write(plain)
        if self._shows(plain.rstrip("\n"), line.rstrip("\n")):
            self.console.write(line)

    def _shows(self, plain: str, line: str) -> bool:
        """Whether the console shows this line; follows the tracebacks of the line's source."""
        match = self._WORKER_LINE.fullmatch(plain)
        source = match["source"] if match else None
        for other, traceback in self._tracebacks.items():  # another source speaks: what the others said of their
            if other != source:                            # tracebacks so far is over
                self._show_exception(traceback)
        if match is None:
            return not self._LOG_ONLY.search(plain)
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
            self.console.write(f"{traceback.exception}{where}\n")
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
