"""Log lines as JSON: the formatter every handler gets, the redaction safety net under every
line, and `emit`, the direct path for lines that are JSON already (access and audit lines).

`emit` writes such a line straight to the stream of each plain StreamHandler with our formatter
(what `gateway serve` installs): no LogRecord, no Formatter, one lock, the same redaction, the
same bytes. Any other handler (a test's log capture, a handler an embedding program added) gets
an ordinary LogRecord, exactly as `logger.info(line)` would have made.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

#: Token-shaped values (JWTs, 103-character refresh tokens, credentials after Bearer/Basic) are
#: masked in every line, whatever code path (a library's exception message, a debug line) tried
#: to log one. The replacement keeps JSON valid: it only replaces runs of token characters.
_SECRET = re.compile(
    r"eyJ[A-Za-z0-9_-]{8,}(?:\.[A-Za-z0-9_-]*){0,2}"
    r"|(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{103}(?![A-Za-z0-9_-])"
    r"|(?i:\b(?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]{12,}"
)
_RAW = ("gateway.access", "gateway.audit")
_TOKEN_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
#: Maps every token character's byte to "a": a run of 103 of them shows as 103 "a"s (a byte
#: table is a C array lookup per byte; a str table would be a dict lookup per character).
_TOKENISH = bytes(ord("a") if byte in _TOKEN_CHARS else byte for byte in range(256))
_RUN = b"a" * 103


def redact(text: str) -> str:
    # The regex costs tens of microseconds per line; substring checks rule out almost every
    # line (an access line with no token) in about one. Non-ASCII characters are never token
    # characters, and none of their UTF-8 bytes is one either.
    if ("eyJ" not in text
            and _RUN not in text.encode("utf-8", "surrogatepass").translate(_TOKENISH)):
        lower = text.lower()
        if "bearer" not in lower and "basic" not in lower:
            return text
    return _SECRET.sub("[redacted]", text)


class JsonFormatter(logging.Formatter):
    """Every log line is one JSON object; access and audit lines are already JSON."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(self._format(record))

    def _format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name in _RAW and message.startswith("{"):
            return message
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
            "level": record.levelname.lower(), "logger": record.name, "message": message,
            "pid": record.process,
        }
        if record.exc_info and record.exc_info[0] is not None:
            line["error"] = record.exc_info[0].__name__
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"))


def emit(logger: logging.Logger, line: str) -> None:
    """`logger.info(line)` for a line that is one JSON object already (the caller has checked
    `logger.isEnabledFor(logging.INFO)`)."""
    if logger.disabled or logger.filters:
        logger.info(line)
        return
    record: logging.LogRecord | None = None
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if handler.level > logging.INFO:
                continue
            if (type(handler) is logging.StreamHandler and not handler.filters
                    and type(handler.formatter) is JsonFormatter):
                text = redact(line) + handler.terminator
                handler.acquire()
                try:
                    handler.stream.write(text)
                    handler.stream.flush()
                except RecursionError:
                    raise
                except Exception:  # noqa: BLE001 - as StreamHandler.emit: report, never raise
                    record = record or _record(logger, line)
                    handler.handleError(record)
                finally:
                    handler.release()
            else:
                record = record or _record(logger, line)
                handler.handle(record)
        current = current.parent if current.propagate else None


def _record(logger: logging.Logger, line: str) -> logging.LogRecord:
    return logger.makeRecord(logger.name, logging.INFO, "(unknown file)", 0, line, (), None)
