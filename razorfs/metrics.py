"""Request counters of the FUSE layer: per operation, count, errors and recent latencies.

Owned by the FUSE layer (one trio thread); ``snapshot`` is read by the control channel.
Latency percentiles come from the last ``WINDOW`` requests of each operation, so a long-running
daemon reports its current behaviour, not its average since start.
"""

from __future__ import annotations

from collections import deque

WINDOW = 2048


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


class OpStats:
    __slots__ = ("count", "errors", "latencies")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.latencies: deque[float] = deque(maxlen=WINDOW)


class RequestMetrics:
    def __init__(self) -> None:
        self.ops: dict[str, OpStats] = {}
        self.bytes_read = 0
        self.bytes_written = 0
        self.unexpected_errors = 0

    def record(self, op: str, seconds: float, failed: bool) -> None:
        stats = self.ops.get(op)
        if stats is None:
            stats = self.ops[op] = OpStats()
        stats.count += 1
        stats.errors += failed
        stats.latencies.append(seconds)

    def snapshot(self) -> dict:
        ops = {}
        for op, stats in sorted(self.ops.items()):
            ordered = sorted(stats.latencies)
            ops[op] = {
                "count": stats.count,
                "errors": stats.errors,
                "p50_ms": round(percentile(ordered, 0.50) * 1000, 3),
                "p99_ms": round(percentile(ordered, 0.99) * 1000, 3),
                "max_ms": round((ordered[-1] if ordered else 0.0) * 1000, 3),
            }
        return {"ops": ops, "bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
                "unexpected_errors": self.unexpected_errors}
