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
        self.files: dict[str, list[str]] = collections.defaultdict(list)
        self._process: subprocess.Popen | None = None
        if self.py_spy is None:
            log("py-spy not found: `.venv/bin/pip install py-spy` to use --profile")

    def wants(self, step: str, target) -> bool:
        return (self.py_spy is not None and target.kind == "razorfs"
                and any(step.startswith(prefix) for prefix in self.steps))

    def start(self, pid: int, step: str) -> None:
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"{step}-{len(self.files[step]) + 1}.txt")
        self._process = subprocess.Popen(
            [self.py_spy, "record", "-p", str(pid), "-o", path, "-f", "raw", "--threads",
             "--rate", "200"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.files[step].append(path)
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


def layer(frames: list[str]) -> str:
    """The razorfs module whose code the sample is under (its outermost razorfs frame: the
    trio task it belongs to), or what runs when no razorfs task does."""
    for frame in frames:
        match = re.search(r"razorfs/([\w/]+)\.py", frame)
        if match:
            return match.group(1)
    return "no razorfs task: " + category(frames)


def summarise(paths: list[str], top: int = 10) -> dict:
    """Samples per thread group (the trio main thread, workers) by bucket, and the main
    thread's razorfs frames anywhere on the stack (inclusive: which razorfs code the time is
    under)."""
    groups: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    inclusive: collections.Counter = collections.Counter()
    layers: collections.Counter = collections.Counter()
    main_samples = 0
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
                    main_samples += count
                    layers[layer(frames)] += count
                    for frame in {re.sub(r":\d+\)", ")", f) for f in frames
                                  if "razorfs/" in f}:
                        inclusive[frame] += count
    return {"main_samples": main_samples, "main_layers": layers.most_common(),
            "groups": {group: counter.most_common(top) for group, counter in groups.items()},
            "main_inclusive": inclusive.most_common(top)}


def format_profile(step: str, profile: dict) -> str:
    lines = [f"py-spy of the razorfs daemon during {step} "
             f"({profile['main_samples']} active samples of the main thread):"]
    for group in ("main", "workers"):
        rows = profile["groups"].get(group, [])
        total = sum(count for _, count in rows) or 1
        lines.append(f"  {'main trio thread' if group == 'main' else 'worker threads'}:")
        lines += [f"    {100 * count / total:5.1f}%  {name}" for name, count in rows[:8]]
    lines.append("  main thread by razorfs module (the task's outermost razorfs frame):")
    lines += [f"    {100 * count / (profile['main_samples'] or 1):5.1f}%  {name}"
              for name, count in profile["main_layers"][:8]]
    lines.append("  main thread, razorfs functions on the stack (inclusive):")
    total = profile["main_samples"] or 1
    lines += [f"    {100 * count / total:5.1f}%  {frame}"
              for frame, count in profile["main_inclusive"][:10]]
    return "\n".join(lines)
