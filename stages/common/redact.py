"""Keeping credentials out of logs, errors and the run folder.

Mirrors and storage URIs may carry them (https://user:password@host/..., ?token=..., ?secret_key=...). Everything
the pipeline prints or writes about a location goes through `redact` first.
"""

from __future__ import annotations

import re
import urllib.parse

_SECRET_NAME = re.compile(r"secret|token|passw|pwd|key|credential|signature|sig$|auth", re.IGNORECASE)
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>\]\[,;]+")
HIDDEN = "***"


def redact_uri(uri: str) -> str:
    """The URI with its password and the values of credential-like query parameters replaced by ***."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return uri
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{HIDDEN}@{host}" if ":" in userinfo else f"{HIDDEN}@{host}"
    query = "&".join(
        f"{name}={HIDDEN}" if _SECRET_NAME.search(name) and value else (f"{name}={value}" if value else name)
        for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    ) if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact(text: str) -> str:
    """`text` with every URI in it redacted."""
    def replace(match: re.Match) -> str:
        uri = match.group(0)
        trailing = len(uri) - len(uri.rstrip(":.)"))  # punctuation of the sentence, not of the URI
        return redact_uri(uri[: len(uri) - trailing]) + uri[len(uri) - trailing:]

    return _URI.sub(replace, text)


def redact_data(data):
    """A copy of plain data (dicts, lists, strings) with every URI in its strings redacted."""
    if isinstance(data, dict):
        return {key: redact_data(value) for key, value in data.items()}
    if isinstance(data, list):
        return [redact_data(value) for value in data]
    return redact(data) if isinstance(data, str) else data
