"""Logging for the host process: text or JSON lines, each carrying its connection.

Whatever runs on behalf of a connection (its thread, the pool worker serving it, its forked
process) sets :data:`CONTEXT`; a filter copies the connection id and peer onto every record
logged meanwhile, so service code gets them in its own log lines without passing them around.
A line written while a call is served (or made) with a call context also carries the request
id and the trace id (:mod:`rpyc_host.wire.context`): ``[demo-7 10.0.0.3:51234 req=9f2c...
trace=0af7...]`` in text, ``"request_id"``/``"trace_id"`` in JSON, so one request can be followed
through the logs of every service it crossed.

Usage::

    configure("INFO", "json")                 # one JSON object per line on stderr
    with connection_context("demo-7", "10.0.0.3:51234"):
        log.info("hello")                      # {"msg": "hello", "conn": "demo-7", "peer": ...}
"""

from __future__ import annotations

import json
import logging
import logging.config
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from .wire.context import current as current_context

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(conn_prefix)s%(message)s"


class _Context(threading.local):
    connid: str | None = None
    peer: str | None = None


CONTEXT = _Context()


@contextmanager
def connection_context(connid: str | None, peer: str | None) -> Iterator[None]:
    """Tag log records from this thread with a connection until the block ends."""
    previous = CONTEXT.connid, CONTEXT.peer
    CONTEXT.connid, CONTEXT.peer = connid, peer
    try:
        yield
    finally:
        CONTEXT.connid, CONTEXT.peer = previous


def set_connection(connid: str | None, peer: str | None) -> None:
    """Tag this thread's records from now on (for a thread or process that serves one connection)."""
    CONTEXT.connid, CONTEXT.peer = connid, peer


class ConnectionFilter(logging.Filter):
    """Adds ``connid``, ``peer``, ``request_id``, ``trace_id`` and ``conn_prefix`` (``[connid peer
    req=... trace=...] `` or empty) to records."""

    def filter(self, record: logging.LogRecord) -> bool:
        connid = getattr(record, "connid", None) or CONTEXT.connid
        peer = getattr(record, "peer", None) or CONTEXT.peer
        record.connid, record.peer = connid, peer
        ctx = current_context()
        request_id = ctx.request_id if ctx else None
        traceparent = ctx.traceparent if ctx else None
        trace_id = traceparent[3:35] if traceparent and len(traceparent) == 55 else None
        record.request_id, record.trace_id = request_id, trace_id
        tags = [t for t in (connid, peer if connid else None) if t]
        if request_id:
            tags.append(f"req={request_id}")
        if trace_id:
            tags.append(f"trace={trace_id}")
        record.conn_prefix = f"[{' '.join(tags)}] " if tags else ""
        return True


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, msg, conn, peer, plus any ``extra`` fields."""

    _STANDARD = set(vars(logging.makeLogRecord({}))) | {
        "message",
        "asctime",
        "connid",
        "peer",
        "conn_prefix",
        "request_id",
        "trace_id",
    }

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if getattr(record, "connid", None):
            data["conn"] = getattr(record, "connid", None)
            data["peer"] = getattr(record, "peer", None)
        for key in ("request_id", "trace_id"):
            if getattr(record, key, None):
                data[key] = getattr(record, key)
        for key, value in vars(record).items():
            if key not in self._STANDARD and not key.startswith("_"):
                data[key] = value if isinstance(value, str | int | float | bool | None) else repr(value)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


FORMATTERS = {"json": JSONFormatter, "text": lambda: logging.Formatter(TEXT_FORMAT)}


def configure(level: str, fmt: str = "text", dict_config: Mapping[str, Any] | None = None) -> None:
    """Send the host's log to stderr at ``level`` in ``fmt``; then apply ``dict_config`` if any.

    rpyc's own per-connection chatter stays at WARNING unless the level is DEBUG.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(FORMATTERS[fmt]())
    handler.addFilter(ConnectionFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)
    if dict_config:
        logging.config.dictConfig(
            {"version": 1, "incremental": False, "disable_existing_loggers": False, **dict_config}
        )


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level)
    quiet = max(logging.WARNING, logging.getLevelName(level))
    for name in ("rpyc", "SLAVE"):
        logging.getLogger(name).setLevel(quiet)
