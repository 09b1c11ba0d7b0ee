"""Opt-in Prometheus endpoint (``razorfs mount --metrics ADDRESS:PORT``).

prometheus-client serves HTTP from its own thread and renders the exposition format; we only
supply a collector that fetches the same live counters as ``razorfs stats`` from the trio loop
(``trio.from_thread.run``), so the two can never disagree.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import trio
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class StatsCollector:
    def __init__(self, collect: Callable[[], Awaitable[dict]], token: trio.lowlevel.TrioToken):
        self._collect = collect
        self._token = token

    def collect(self):
        stats = trio.from_thread.run(self._collect, trio_token=self._token)
        yield from families(stats)


def families(stats: dict):
    wal, space, requests = stats["wal"], stats["space"], stats["requests"]
    counters = {
        "razorfs_wal_records": ("WAL records (transactions) written", wal["records"]),
        "razorfs_wal_commits": ("group commits", wal["commits"]),
        "razorfs_wal_fsyncs": ("fsyncs issued by the WAL writer", wal["fsyncs"]),
        "razorfs_checkpoints": ("checkpoints written", stats["checkpoints"]["count"]),
        "razorfs_read_bytes": ("bytes read by clients", requests["bytes_read"]),
        "razorfs_written_bytes": ("bytes written by clients", requests["bytes_written"]),
        "razorfs_unexpected_errors": ("requests answered EIO by an unexpected error",
                                      requests["unexpected_errors"]),
    }
    gauges = {
        "razorfs_durable_lag_records": ("transactions applied but not yet durable",
                                        wal["durable_lag"]),
        "razorfs_inodes": ("inodes in the filesystem", stats["inodes"]),
        "razorfs_blocks_used": ("data blocks in use", space["blocks_used"]),
        "razorfs_blocks_free_in_store": ("free blocks inside the block store",
                                         space["blocks_free_in_store"]),
        "razorfs_disk_available_bytes": ("free space of the disk under the data directory",
                                         space["disk_available_bytes"]),
        "razorfs_last_checkpoint_seconds": ("duration of the last checkpoint",
                                            stats["checkpoints"]["last_seconds"]),
        "razorfs_failsafe": ("1 when the filesystem turned read-only after a storage failure",
                             int(bool(stats["failsafe"]))),
    }
    replica = stats.get("replica")
    if replica is not None:
        gauges.update({
            "razorfs_replica_lag_lsns": ("committed transactions not yet in the replica",
                                         replica["lag_lsns"]),
            "razorfs_replica_lag_bytes": ("WAL bytes not yet in the replica",
                                          replica["lag_bytes"]),
            "razorfs_replica_lag_seconds": ("age of the oldest change not yet in the replica",
                                            replica["lag_seconds"]),
            "razorfs_replica_shipped_lsn": ("every transaction up to it is in the replica",
                                            replica["shipped_lsn"]),
            "razorfs_replica_needs_base": ("1 while the replica waits for a fresh base",
                                           int(replica["needs_base"])),
            "razorfs_replica_store_unreachable": ("1 while the object store does not answer",
                                                  int(replica["store_error"] is not None)),
        })
        counters["razorfs_replica_uploaded_bytes"] = ("bytes uploaded to the replica",
                                                      replica["bytes_uploaded"])
        counters["razorfs_replica_upload_errors"] = ("failed calls to the object store",
                                                     replica["upload_errors"])
    for name, (documentation, value) in counters.items():
        yield CounterMetricFamily(name, documentation, value=value)
    for name, (documentation, value) in gauges.items():
        yield GaugeMetricFamily(name, documentation, value=value)
    requests_total = CounterMetricFamily("razorfs_requests", "FUSE requests by operation",
                                         labels=["op"])
    errors_total = CounterMetricFamily("razorfs_request_errors",
                                       "FUSE requests answered with an error", labels=["op"])
    latency = GaugeMetricFamily("razorfs_request_latency_seconds",
                                "latency of recent requests", labels=["op", "quantile"])
    for op, row in requests["ops"].items():
        requests_total.add_metric([op], row["count"])
        errors_total.add_metric([op], row["errors"])
        latency.add_metric([op, "0.5"], row["p50_ms"] / 1000)
        latency.add_metric([op, "0.99"], row["p99_ms"] / 1000)
    yield from (requests_total, errors_total, latency)


def parse_address(text: str) -> tuple[str, int]:
    """``PORT`` (loopback) or ``ADDRESS:PORT``."""
    host, _, port = text.rpartition(":")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def serve(address: str, collect: Callable[[], Awaitable[dict]]):
    """Start the endpoint; return the server (call ``shutdown()`` on it to stop)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(collect, trio.lowlevel.current_trio_token()))
    host, port = parse_address(address)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
