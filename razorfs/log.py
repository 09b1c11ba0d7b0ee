"""structlog set-up: JSON lines when stderr is not a terminal (journald, log files), readable
console lines on a terminal. Every line logged while a FUSE request is handled carries its op,
inode and request id, from one context variable the FUSE edge sets per request (one set and one
reset per request; structlog's bound_contextvars costs several of each, and the daemon handles
requests far more often than it logs)."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

import structlog

current_request: ContextVar[tuple | None] = ContextVar("razorfs_request", default=None)


def add_request_context(logger, method_name: str, event_dict: dict) -> dict:
    request = current_request.get()
    if request is not None:
        event_dict.setdefault("op", request[0])
        event_dict.setdefault("inode", request[1])
        event_dict.setdefault("request", request[2])
    return event_dict


_debug = False


def debug_enabled() -> bool:
    """Whether debug lines are written. Hot paths ask before logging: even a filtered call
    through structlog's uncached lazy logger costs (loggers are not cached so that a
    reconfiguration, e.g. SIGHUP's reopen or a test's capture, reaches every module)."""
    return _debug


def configure(level: str = "info", stream=None) -> None:
    global _debug
    _debug = logging.getLevelNamesMapping()[level.upper()] <= logging.DEBUG
    stream = stream or sys.stderr
    renderer = (structlog.dev.ConsoleRenderer() if stream.isatty()
                else structlog.processors.JSONRenderer())
    processors = [
        structlog.contextvars.merge_contextvars,
        add_request_context,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if not stream.isatty():
        processors.append(structlog.processors.dict_tracebacks)
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
