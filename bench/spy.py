"""py-spy on the razorfs daemon during chosen steps, and where its samples fall.

Only samples py-spy counts as active are kept, and shares are of those; how busy a thread was
comes from /proc (the meter's CPU columns), not from py-spy, which files part of a thread's
wait for the GIL under epoll.poll. py-spy pauses the daemon at each sample, so the figures of a
profiled step are not the run's figures. py-spy: `.venv/bin/pip install py-spy`.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from common import log

RATE = 200  # samples per second

# (bucket, substrings of the innermost frame), first match wins
BUCKETS = [
    ("trio loop in epoll.poll: its per-pass syscall, waiting, or retaking the GIL",
     ("get_events",)),
    ("idle: worker thread waiting for a job", ("WorkerThread._work",)),
    ("fsync (block store / WAL segment)", ("RealFile.fsync",)),
    ("pwrite", ("RealFile.pwrite",)),
    ("pread", ("RealFile.pread",)),
    ("pyfuse3 (Cython: /dev/fuse read, dispatch, reply)", ("_pyfuse3.py",)),
    ("actor messages: msgpack, message construction",
     ("msgpack", "actors/messages.py", "__create_fn__")),
    ("structlog contextvars (per-request binding)", ("structlog", "contextvars")),
    ("CRC-32C", ("crc",)),
    ("trio scheduling, channels, task switches", ("trio/", "outcome", "attrs generated")),
]


class Profiler:
    def __init__(self, steps: list[str], directory: str) -> None:
        self.steps = steps  # step names or prefixes ("req_" profiles every request loop)
        self.directory = directory
        self.py_spy = (shutil.which("py-spy")
                       or shutil.which("py-spy", path=os.path.dirname(sys.executable)))
        self.files: dict[str, list[str]] = collections.defaultdict(list)  # "kind step"
        self._process: subprocess.Popen | None = None
        if self.py_spy is None:
            log("py-spy not found: `.venv/bin/pip install py-spy` to use --profile")

    def wants(self, step: str, target) -> bool:
        """razorfs, and the floor to compare with (both are pyfuse3 + trio)."""
        return (self.py_spy is not None and target.kind in ("razorfs", "floor")
                and any(step.startswith(prefix) for prefix in self.steps))

    def start(self, pid: int, step: str, kind: str) -> None:
        os.makedirs(self.directory, exist_ok=True)
        key = f"{kind} {step}"
        path = os.path.join(self.directory,
                            f"{kind}-{step}-{len(self.files[key]) + 1}.txt")
        self._process = subprocess.Popen(
            [self.py_spy, "record", "-p", str(pid), "-o", path, "-f", "raw", "--threads",
             "--rate", str(RATE)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.files[key].append(path)
        time.sleep(0.5)  # py-spy attaches

    def stop(self) -> None:
        self._process.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        self._process.wait(timeout=60)
        self._process = None


def category(frames: list[str]) -> str:
    leaf = frames[-1]
    for name, needles in BUCKETS:
        if any(needle in leaf for needle in needles):
            return name
    where = "razorfs: " if "razorfs/" in leaf else "other: "
    return where + re.sub(r":\d+\)", ")", leaf)


def _plain(frame: str) -> str:
    return re.sub(r":\d+\)", ")", frame)


def task(frames: list[str]) -> str:
    """Which trio task a main-thread sample is in: its frames after trio's run loop. A FUSE
    request is named by its razorfs handler, an actor by its run method."""
    loop = [i for i, frame in enumerate(frames) if "trio/_core/_run.py" in frame]
    inside = frames[loop[-1] + 1:] if loop else []
    if "get_events" in frames[-1]:
        return "trio waiting in epoll.poll"
    if not inside:
        return "trio run loop, between tasks"
    if "_pyfuse3.py" in inside[0]:
        handlers = [f for f in inside if "razorfs/fuse/operations.py" in f
                    or "floorfs.py" in f]
        return ("FUSE " + _plain(handlers[0]).split(" ")[0] if handlers
                else "pyfuse3 (Cython: reading /dev/fuse, dispatch, reply)")
    return _plain(inside[0])


# task -> column of the compact table: where the trio thread's busy samples go
COLUMNS = [("pyfuse3", ("pyfuse3",)), ("FUSE handlers", ("FUSE ",)),
           ("tree manager", ("TreeManager",)), ("WAL writer", ("WalWriter",)),
           ("allocator", ("BlockAllocator",)),
           ("trio between tasks", ("trio run loop", "EpollIOManager.process_events",
                                   "EntryQueue", "outcome", "attrs generated"))]


def column(task_name: str) -> str:
    for name, needles in COLUMNS:
        if any(needle in task_name for needle in needles):
            return name
    return "other"


def compact_table(profiles: dict[str, dict], runs: dict[str, list[dict]]) -> str:
    """One row per profiled step: the trio thread's CPU per loop iteration (/proc, median of
    the runs) split by task in the proportions of its py-spy samples outside epoll.poll (py-spy
    pauses the daemon at each sample, so its own counts are not the CPU time)."""
    names = [name for name, _ in COLUMNS] + ["other"]
    lines = ["| step | trio thread CPU µs / loop | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for key, profile in profiles.items():
        kind, step = key.split(" ", 1)
        per_loop = [run["steps"][step]["main_cpu"] / run["steps"][step]["count"] * 1e6
                    for run in runs.get(kind, []) if "count" in run["steps"].get(step, {})
                    and "main_cpu" in run["steps"][step]]
        shares = collections.Counter()
        for name, samples, _ in profile["all_tasks"]:
            if "epoll.poll" not in name:
                shares[column(name)] += samples
        busy = sum(shares.values())
        if not per_loop or not busy:
            continue
        cpu = sorted(per_loop)[len(per_loop) // 2]
        lines.append(f"| {key} | {cpu:.0f} | "
                     + " | ".join(f"{cpu * shares[name] / busy:.0f}" for name in names) + " |")
    return "\n".join(lines)


def summarise(paths: list[str], top: int = 10) -> dict:
    """Samples by bucket of the innermost frame for the trio main thread and the worker
    threads; the main thread's samples by task, each with its own buckets."""
    groups: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    tasks: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path) as raw:
            for line in raw:
                stack, _, count_text = line.rstrip("\n").rpartition(" ")
                if not count_text.isdigit():
                    continue
                count, frames = int(count_text), stack.split(";")
                group = "main" if "MainThread" in frames[0] else "workers"
                groups[group][category(frames)] += count
                if group == "main":
                    tasks[task(frames)][category(frames)] += count
    ordered = sorted(tasks.items(), key=lambda item: -sum(item[1].values()))
    return {"main_samples": sum(groups["main"].values()),
            "groups": {group: counter.most_common(top) for group, counter in groups.items()},
            "tasks": [(name, sum(c.values()), c.most_common(3)) for name, c in ordered[:top]],
            "all_tasks": [(name, sum(c.values()), []) for name, c in ordered]}


def format_profile(step: str, profile: dict) -> str:
    lines = [f"py-spy of the razorfs daemon during {step} "
             f"({profile['main_samples']} active samples of the main thread):"]
    for group in ("main", "workers"):
        rows = profile["groups"].get(group, [])
        total = sum(count for _, count in rows) or 1
        lines.append(f"  {'main trio thread' if group == 'main' else 'worker threads'}:")
        lines += [f"    {100 * count / total:5.1f}%  {name}" for name, count in rows[:8]]
    lines.append("  main thread by trio task (its top innermost buckets):")
    total = profile["main_samples"] or 1
    for name, samples, buckets in profile["tasks"]:
        inner = "; ".join(f"{100 * n / samples:.0f}% {bucket[:40]}" for bucket, n in buckets)
        lines.append(f"    {100 * samples / total:5.1f}%  {name}  ({inner})")
    return "\n".join(lines)
