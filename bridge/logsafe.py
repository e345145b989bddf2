"""The gateway's text log, safe from what people send it.

Log lines carry untrusted text: user names, file names, query parameters, an SSH client's
disconnect reason, exception messages built from any of these. Escaping at each call site would
be forgotten somewhere, so it happens once, in the formatter: in the rendered message every
control character (C0 but tab, DEL, C1), the Unicode line and paragraph separators and the bidi
controls become visible escapes such as `\\n`, `\\x1b`, `\\x85`, `\\u2028`. A traceback keeps its
lines, but each of them is prefixed with `| `: a line of the log that does not start with a
timestamp or `| ` cannot exist, so no one can forge one.

With `log.format = "json"` each record is one JSON object per line instead: json.dumps escapes
every control character (and, with ensure_ascii, every non-ASCII one), so the same holds.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONTINUATION = "| "

_NAMED = {"\n": "\\n", "\r": "\\r"}
_BIDI = [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]


def _escape_of(code: int) -> str:
    char = chr(code)
    if char in _NAMED:
        return _NAMED[char]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


_UNSAFE = [*(c for c in range(0x20) if c != 0x09), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029, *_BIDI]
_MESSAGE_TABLE = {code: _escape_of(code) for code in _UNSAFE}
# A traceback keeps its newlines (and tabs); everything else that could fake a line is escaped.
_TRACEBACK_TABLE = {code: text for code, text in _MESSAGE_TABLE.items() if code != 0x0A}


def escape(text: str) -> str:
    """`text` with nothing left that could start a new line or rewrite a terminal."""
    return text.translate(_MESSAGE_TABLE)


class SafeFormatter(logging.Formatter):
    """A Formatter whose output is one line per record, plus `| `-prefixed traceback lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        saved = record.message
        record.message = escape(saved)
        try:
            return super().formatMessage(record)
        finally:
            record.message = saved

    def formatException(self, ei) -> str:  # type: ignore[no-untyped-def]  # noqa: N802
        return _continuation(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return _continuation(super().formatStack(stack_info))


def _continuation(text: str) -> str:
    lines = text.translate(_TRACEBACK_TABLE).split("\n")
    return "\n".join(CONTINUATION + line for line in lines)


# Record attributes a JSON line carries when the record has them (SessionLog sets the first two).
JSON_CONTEXT = ("session", "user")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, the context fields the record
    carries, and a traceback as `exc`. For log shippers that want fields, not text."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in JSON_CONTEXT:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=True)


def formatter(kind: str = "text") -> logging.Formatter:
    """The formatter of `log.format`: "text" or "json"."""
    return JsonFormatter() if kind == "json" else SafeFormatter(FORMAT)


def configure(level: int = logging.INFO, stream: TextIO = sys.stderr, kind: str = "text") -> None:
    """The gateway's logging: a handler with the safe formatter of `kind` on the root logger.
    Called again (once the configuration is read), it replaces the handler it installed."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "termbridge", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream)
    handler.termbridge = True  # type: ignore[attr-defined]
    handler.setFormatter(formatter(kind))
    logging.basicConfig(level=level, handlers=[handler])
    root.setLevel(level)
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
