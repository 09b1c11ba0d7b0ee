"""razorfs.log: journal-native events under journald (systemd's JOURNAL_STREAM rule), JSON
lines elsewhere. The journal itself is exercised under a real systemd in tests/service."""

from __future__ import annotations

import io
import json
import os

import structlog

from razorfs import log


def test_journal_stream_is_recognised_by_device_and_inode(tmp_path, monkeypatch) -> None:
    with open(tmp_path / "stream", "w") as stream, open(tmp_path / "other", "w") as other:
        status = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
        assert log.is_journal_stream(stream)
        assert not log.is_journal_stream(other)  # stderr redirected: not the journal's stream
        assert not log.is_journal_stream(io.StringIO())
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not log.is_journal_stream(stream)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not log.is_journal_stream(stream)


def test_event_becomes_journal_fields() -> None:
    fields = log.journal_fields(None, "warning", {
        "event": "recovered", "level": "warning", "replayed": 3, "torn_tail": None,
        "seconds": {"scan": 0.5}, "data_dir": "/var/lib/razorfs/a", "op": "write",
        "_private": 1, "9lives": True, "with-dash": "x"})["fields"]
    assert fields["EVENT"] == "recovered" and fields["PRIORITY"] == "4"
    assert fields["REPLAYED"] == "3" and fields["TORN_TAIL"] == "null"
    assert json.loads(fields["SECONDS"]) == {"scan": 0.5}
    assert fields["DATA_DIR"] == "/var/lib/razorfs/a" and fields["OP"] == "write"
    assert fields["PRIVATE"] == "1" and fields["F_9LIVES"] == "true"
    assert fields["WITH_DASH"] == "x"
    assert fields["SYSLOG_IDENTIFIER"] == "razorfs"
    assert fields["MESSAGE"].startswith("recovered replayed=3 torn_tail=null")
    assert all(name == log.journal_field_name(name) for name in fields)


def test_priorities_follow_levels() -> None:
    for level, priority in (("debug", "7"), ("info", "6"), ("warning", "4"), ("error", "3"),
                            ("critical", "2")):
        fields = log.journal_fields(None, level, {"event": "e", "level": level})["fields"]
        assert fields["PRIORITY"] == priority


def test_exception_goes_into_its_field_and_the_message() -> None:
    fields = log.journal_fields(None, "error", {"event": "failed", "level": "error",
                                                "exception": "Traceback ...\nValueError"})
    assert fields["fields"]["EXCEPTION"].endswith("ValueError")
    assert fields["fields"]["MESSAGE"] == "failed\nTraceback ...\nValueError"


def test_json_lines_when_not_the_journal(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")
    with open(tmp_path / "log", "w") as stream:
        try:
            log.configure("info", stream)
            structlog.get_logger("test").info("hello", answer=42)
        finally:
            structlog.reset_defaults()
    event = json.loads((tmp_path / "log").read_text())
    assert event["event"] == "hello" and event["answer"] == 42 and "timestamp" in event
