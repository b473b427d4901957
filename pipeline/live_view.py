"""The training's live line on a terminal: the search's status, redrawn in place, with an ETA that counts down.

Everything else the console shows goes through `write`, which lifts the live line, writes, and puts it back, so the
line always stays last on the screen. Off a terminal there is no live line: pipeline.console prints the search's
epoch lines as they come instead.
"""

from __future__ import annotations

import threading
import time

from stages.training.progress import format_seconds

REDRAW_SECONDS = 1.0
_CLEAR = "\r\x1b[K"  # to the line's start, erase it


class LiveLine:
    """One status line at the bottom of a terminal (`stream`), redrawn every second while it shows something."""

    def __init__(self, stream, width: int | None = None) -> None:
        self._stream = stream
        self._width = width
        self._status: str | None = None
        self._eta_at: float | None = None  # monotonic time the search should end
        self._shown = False
        self._lock = threading.RLock()
        self._stopped = threading.Event()
        self._ticker: threading.Thread | None = None

    def update(self, status: str, eta_seconds: float | None) -> None:
        """Shows `status` (and the ETA, counting down from now) in place of what the line showed."""
        with self._lock:
            self._status = status
            self._eta_at = None if eta_seconds is None else time.monotonic() + eta_seconds
            self._draw()
            if self._ticker is None:
                self._ticker = threading.Thread(target=self._tick, name="live-line", daemon=True)
                self._ticker.start()

    def write(self, stream, text: str) -> None:
        """Writes `text` to `stream` (this terminal's stdout or stderr) above the live line."""
        with self._lock:
            self._lift()
            stream.write(text)
            stream.flush()
            if text.endswith("\n"):
                self._draw()

    def close(self) -> None:
        """Removes the line (the training is over, or the run ends)."""
        self._stopped.set()
        with self._lock:
            self._lift()
            self._status = None

    def _tick(self) -> None:
        while not self._stopped.wait(REDRAW_SECONDS):
            with self._lock:
                if self._shown:
                    self._draw()

    def _text(self) -> str:
        text = f"training: {self._status}"
        if self._eta_at is not None:
            text += f" | ETA {format_seconds(max(0.0, self._eta_at - time.monotonic()))}"
        width = self._width or _terminal_width(self._stream)
        return text if len(text) < width else text[: width - 2] + "…"

    def _draw(self) -> None:
        if self._status is None:
            return
        self._stream.write(_CLEAR + self._text())
        self._stream.flush()
        self._shown = True

    def _lift(self) -> None:
        if self._shown:
            self._stream.write(_CLEAR)
            self._stream.flush()
            self._shown = False


def _terminal_width(stream) -> int:
    import os

    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 120
