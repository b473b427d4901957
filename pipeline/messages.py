"""One-line error messages that quote values nobody bounded (a mirror, a YAML parser's problem, a key).

Every long word is clipped, and the whole message is capped at MAX_MESSAGE characters, so a 1 MB value still
makes a message that fits one line of a terminal or a log.
"""

from __future__ import annotations

import re

from stages.training.train_settings import CLIP

MAX_MESSAGE = 400  # characters of one error message, whatever went into it


def shorten(message: str) -> str:
    """A message from elsewhere with every long word (a quoted value, say) clipped."""
    return cap(re.sub(rf"\S{{{CLIP + 1},}}", lambda word: word.group()[: CLIP - 1] + "…", message))


def cap(message: str) -> str:
    """At most MAX_MESSAGE characters: a safety net under the clipping of each value."""
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"
