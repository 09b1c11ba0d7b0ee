"""Request metrics (percentiles over a window, errors, snapshot) and the Prometheus families."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from razorfs import prometheus
from razorfs.metrics import WINDOW, RequestMetrics, percentile


def test_percentiles_of_a_known_distribution() -> None:
    metrics = RequestMetrics()
    for ms in range(100, 0, -1):  # order of arrival does not matter
        metrics.record("read", ms / 1000, failed=False)
    row = metrics.snapshot()["ops"]["read"]
    assert row["count"] == 100 and row["errors"] == 0
    assert 50 <= row["p50_ms"] <= 51 and 99 <= row["p99_ms"] <= 100 and row["max_ms"] == 100


def test_percentiles_cover_only_the_recent_window() -> None:
    metrics = RequestMetrics()
    for _ in range(WINDOW):
        metrics.record("write", 2.0, failed=False)  # an old slow spell...
    for _ in range(WINDOW):
        metrics.record("write", 0.001, failed=False)  # ...has left the window
    row = metrics.snapshot()["ops"]["write"]
    assert row["count"] == 2 * WINDOW
    assert row["p50_ms"] == row["p99_ms"] == row["max_ms"] == 1.0


def test_errors_are_counted_per_operation() -> None:
    metrics = RequestMetrics()
    metrics.record("lookup", 0.001, failed=True)
    metrics.record("lookup", 0.001, failed=False)
    metrics.record("lookup", 0.001, failed=True)
    metrics.record("create", 0.001, failed=False)
    ops = metrics.snapshot()["ops"]
    assert (ops["lookup"]["count"], ops["lookup"]["errors"]) == (3, 2)
    assert (ops["create"]["count"], ops["create"]["errors"]) == (1, 0)


def test_snapshot_shape() -> None:
    metrics = RequestMetrics()
    assert metrics.snapshot() == {"ops": {}, "bytes_read": 0, "bytes_written": 0,
                                  "unexpected_errors": 0}
    metrics.record("write", 0.002, failed=False)
    metrics.record("create", 0.001, failed=False)
    metrics.bytes_written += 4096
    snapshot = json.loads(json.dumps(metrics.snapshot()))  # plain JSON for the control socket
    assert list(snapshot["ops"]) == ["create", "write"]  # sorted by operation
    assert set(snapshot["ops"]["write"]) == {"count", "errors", "p50_ms", "p99_ms", "max_ms"}
    assert snapshot["bytes_written"] == 4096


def test_percentile_of_nothing_is_zero() -> None:
    assert percentile([], 0.99) == 0.0
    assert percentile([5.0], 0.5) == percentile([5.0], 0.99) == 5.0


def sample_stats() -> dict:
    """Shaped like razorfs.daemon.collect's answer."""
    metrics = RequestMetrics()
    for _ in range(3):
        metrics.record("create", 0.002, failed=False)
    metrics.record("write", 0.004, failed=True)
    metrics.bytes_read, metrics.bytes_written, metrics.unexpected_errors = 100, 8192, 1
    return {
        "requests": metrics.snapshot(),
        "wal": {"last_lsn": 12, "durable_lsn": 10, "durable_lag": 2, "records": 12,
                "commits": 4, "fsyncs": 7, "average_group_size": 3.0,
                "bytes_since_checkpoint": 5000},
        "checkpoints": {"count": 2, "last_seconds": 0.015},
        "space": {"block_size": 4096, "blocks_used": 9, "blocks_free_in_store": 3,
                  "blocks_pending_free": 1, "disk_available_bytes": 10**9},
        "inodes": 5,
        "durability": "fsync",
        "failsafe": None,
    }


def exposition(stats: dict) -> dict[tuple[str, tuple], float]:
    """Render ``families(stats)`` as a scrape would, parse it back into samples."""
    class Collector:
        def collect(self):
            return prometheus.families(stats)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    text = generate_latest(registry).decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_prometheus_families() -> None:
    samples = exposition(sample_stats())
    assert {name: value for (name, labels), value in samples.items() if not labels} == {
        "razorfs_wal_records_total": 12, "razorfs_wal_commits_total": 4,
        "razorfs_wal_fsyncs_total": 7, "razorfs_checkpoints_total": 2,
        "razorfs_read_bytes_total": 100, "razorfs_written_bytes_total": 8192,
        "razorfs_unexpected_errors_total": 1,
        "razorfs_durable_lag_records": 2, "razorfs_inodes": 5, "razorfs_blocks_used": 9,
        "razorfs_blocks_free_in_store": 3, "razorfs_disk_available_bytes": 10**9,
        "razorfs_last_checkpoint_seconds": 0.015, "razorfs_failsafe": 0,
    }
    assert samples[("razorfs_requests_total", (("op", "create"),))] == 3
    assert samples[("razorfs_requests_total", (("op", "write"),))] == 1
    assert samples[("razorfs_request_errors_total", (("op", "create"),))] == 0
    assert samples[("razorfs_request_errors_total", (("op", "write"),))] == 1
    latency = {labels: value for (name, labels), value in samples.items()
               if name == "razorfs_request_latency_seconds"}
    assert latency == {(("op", "create"), ("quantile", "0.5")): 0.002,
                       (("op", "create"), ("quantile", "0.99")): 0.002,
                       (("op", "write"), ("quantile", "0.5")): 0.004,
                       (("op", "write"), ("quantile", "0.99")): 0.004}


def test_prometheus_failsafe_is_one_with_a_reason() -> None:
    stats = sample_stats() | {"failsafe": "WAL write failed: [Errno 5] Input/output error"}
    assert exposition(stats)[("razorfs_failsafe", ())] == 1
