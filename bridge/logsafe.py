"""The gateway's text log, safe from what people send it.

Log lines carry untrusted text: user names, file names, query parameters, an SSH client's
disconnect reason, exception messages built from any of these. Escaping at each call site would
be forgotten somewhere, so it happens once, in the formatter: in the rendered message every
control character (C0 but tab, DEL, C1), the Unicode line and paragraph separators and the bidi
controls become visible escapes such as `\\n`, `\\x1b`, `\\x85`, `\\u2028`. A traceback keeps its
lines, but each of them is prefixed with `| `: a line of the log that does not start with a
timestamp or `| ` cannot exist, so no one can forge one.
"""

from __future__ import annotations

import logging
import sys
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


def configure(level: int = logging.INFO, stream: TextIO = sys.stderr) -> None:
    """The gateway's logging: a handler with the SafeFormatter on the root logger (like
    logging.basicConfig, nothing is replaced when the root logger already has handlers)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SafeFormatter(FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
