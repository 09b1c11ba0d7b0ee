"""structlog set-up: journal entries whose fields are the event's fields when stderr is
journald's stream, JSON lines elsewhere that is not a terminal (log files, pipes), readable
console lines on a terminal. Every line logged while a FUSE request is handled carries its op,
inode and request id, from one context variable the FUSE edge sets per request (one set and one
reset per request; structlog's bound_contextvars costs several of each, and the daemon handles
requests far more often than it logs)."""

from __future__ import annotations

import json
import logging
import os
import re
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
    processors = [
        structlog.contextvars.merge_contextvars,
        add_request_context,
        structlog.processors.add_log_level,
    ]
    if is_journal_stream(stream):
        processors += [structlog.processors.format_exc_info, journal_fields]
        logger_factory = JournalLoggerFactory(fallback=stream)
    else:
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
        if stream.isatty():
            processors.append(structlog.dev.ConsoleRenderer())
        else:
            processors += [structlog.processors.dict_tracebacks,
                           structlog.processors.JSONRenderer()]
        logger_factory = structlog.WriteLoggerFactory(file=stream)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=logger_factory,
        cache_logger_on_first_use=False,
    )


# ---- the journal ----------------------------------------------------------------------------

def is_journal_stream(stream) -> bool:
    """systemd's rule: $JOURNAL_STREAM holds the device and inode numbers of the stream journald
    connected the service to; a process whose stream is still that one (not redirected to a
    file, as `razorfs mount` does in the background) may log with the native protocol."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
_NOT_A_FIELD_CHARACTER = re.compile(r"[^A-Z0-9_]")


def journal_field_name(key: str) -> str:
    """A journal field name for an event key: upper case letters, digits and underscores, not
    starting with an underscore (those are journald's trusted fields) or a digit."""
    name = _NOT_A_FIELD_CHARACTER.sub("_", key.upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = f"F_{name}"
    return name[:64]


def journal_value(value) -> str:
    """Strings as they are; numbers, booleans, None and containers as JSON writes them, so
    that a field reads the same as in the JSON lines."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def journal_fields(logger, method_name: str, event_dict: dict) -> dict:
    """The event as journal fields: EVENT (its name), PRIORITY (from its level), each other
    key upper-cased, and a MESSAGE that reads as one line of `journalctl`."""
    event = str(event_dict.pop("event", ""))
    level = event_dict.get("level", method_name)
    exception = event_dict.pop("exception", None)
    fields = {journal_field_name(key): journal_value(value)
              for key, value in event_dict.items()}
    summary = " ".join(f"{key}={journal_value(value)}" for key, value in event_dict.items()
                       if key != "level")
    message = f"{event} {summary}" if summary else event
    if exception:
        fields["EXCEPTION"] = exception
        message = f"{message}\n{exception}"
    fields.update(MESSAGE=message, EVENT=event, PRIORITY=str(PRIORITIES.get(level, 6)),
                  SYSLOG_IDENTIFIER="razorfs")
    return {"fields": fields}


class JournalLogger:
    """Sends each event to journald's socket (libsystemd's sd_journal_sendv: a datagram, or a
    memfd for a large entry). If journald cannot take it, the event is written to ``fallback``
    as a JSON line (that stream goes to the journal too): no event is lost."""

    def __init__(self, fallback) -> None:
        from cysystemd import journal

        self._send = journal.send
        self._fallback = fallback

    def msg(self, *, fields: dict) -> None:
        if self._send(**fields) < 0:
            self._fallback.write(json.dumps(fields) + "\n")
            self._fallback.flush()

    debug = info = warning = warn = error = critical = exception = fatal = failure = msg


class JournalLoggerFactory:
    def __init__(self, fallback) -> None:
        self._logger = JournalLogger(fallback)

    def __call__(self, *args) -> JournalLogger:
        return self._logger
