"""Scale probe (issue 5): razorfs with a million files, on a fresh mount of a local data directory.

    .venv/bin/python bench/scale.py                      # 1,000,000 files (15-20 min here)
    .venv/bin/python bench/scale.py --files 20000 --wal-records 30000   # quick run (~1.5 min)
    .venv/bin/python bench/scale.py --files N --workdir DIR --json PATH

Run as root (mounts, and drops the kernel's dentry/inode caches with
`echo 2 > /proc/sys/vm/drop_caches` before every "cold" measurement). The data directory and the
mountpoint go in a new directory under --workdir (default /var/tmp/razorfs-scale, which must be
on a local disk: `df -T` is printed) and are deleted at the end (--keep keeps them).

Phases, on one data directory:

  A  mkfs + mount (default tuning). RSS of the empty mount. Create N files with --workers
     processes (open O_CREAT|O_EXCL + close): (N - B) files in directories of --per-dir files
     (d0000/f000000...), then one directory big/ of B files (--big-dir, default min(100,000,
     N/2)). The ramp pauses at 1k, 10k, 100k, 1M files (those below N) and at N, and measures
     os.stat latency (p50/p99) of --samples random existing paths, cold: the dentry cache is
     dropped before each round (then the daemon is left to finish the FORGETs this causes)
     and no path is stat'ed twice in a round, so every stat is a lookup that reaches the
     daemon. Then `razorfs umount` (final checkpoint), timed.
  B  `razorfs mount` timed until the mount answers (recovery = load the checkpoint; no WAL).
     Mounted with huge checkpoint thresholds (bytes and records) so that phase B never
     checkpoints. Cold stat latency again (N files, a fresh daemon: not just after the
     creation). big/ listed cold (os.listdir, then os.scandir). A stat walk of every file (listdir + os.stat, worker
     processes). Daemon VmRSS (/proc/PID/status) minus the empty mount's, per inode. Then
     --wal-records cheap changes (os.utime on open files, worker processes: one setattr = one
     WAL record each), committed, then kill -9 of the daemon (no checkpoint ever written in B)
     and `fusermount3 -u` of the dead mount.
  C  `razorfs mount` timed again: recovery replays every WAL record of phase B. Mounted with
     --checkpoint-bytes 1 (a hidden benchmark option: every committed change makes the
     coordinator checkpoint at its next poll, within 2 s). A thread stats never-looked-up paths
     in a loop, timing each call, while the main thread makes --checkpoints single changes and
     waits for each checkpoint; the daemon log gives each checkpoint's window. Longest latency
     of an operation overlapping a checkpoint. `razorfs umount` timed.

Targets (issue 5): mount (checkpoint of 1M inodes) <= 10 s; RSS <= 500 bytes per inode; stat
latency flat from 1k to 1M files (here: p50 at the largest size <= 1.5x and p99 <= 2x the values
at 1k files); a 100k-entry directory listed cold in <= 2 s; the longest operation while a
checkpoint runs <= 100 ms; replay of 1M WAL records (mount after kill -9) <= 10 s. A verdict
measured below the target's scale (fewer files, entries or records) is marked "(at <scale>)".

Results: a table on stdout, progress lines on stderr, everything (per-milestone latencies,
checkpoint events, counters, timings of each phase, daemon log warnings) in --json (default
bench/results/scale.json). Exit status 0, 1 if a phase failed (the table shows what was done).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

import common

DEFAULT_JSON = os.path.join(common.BENCH_DIR, "results", "scale.json")
DEFAULT_WORKDIR = "/var/tmp/razorfs-scale"
MILESTONES = (1_000, 10_000, 100_000, 1_000_000)
# phase B never checkpoints
NEVER_CHECKPOINT = ("--checkpoint-bytes", str(1 << 50), "--checkpoint-records", str(1 << 50))
CREATE_TASK = 250  # files per creation task
WAL_TASK_FILES, WAL_TASK_REPEATS = 500, 20  # one utime task: 500 open files x 20 rounds

log = common.log


# ---------------------------------------------------------------- helpers

def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def latency_summary(seconds: list[float]) -> dict:
    if not seconds:
        return {"count": 0}
    return {"count": len(seconds), "p50_ms": round(percentile(seconds, 0.5) * 1e3, 3),
            "p99_ms": round(percentile(seconds, 0.99) * 1e3, 3),
            "max_ms": round(max(seconds) * 1e3, 3),
            "mean_ms": round(statistics.fmean(seconds) * 1e3, 3)}


def count(n: float) -> str:
    """1000 -> '1k', 1000000 -> '1M', 20000 -> '20k'."""
    for size, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= size and n % (size // 10) == 0:
            return f"{n / size:g}{suffix}"
    return f"{n:,}"


class Layout:
    """Where file number g lives: the first ``tree`` files in directories of ``per_dir``, the
    rest in big/."""

    def __init__(self, root: str, files: int, per_dir: int, big: int) -> None:
        self.root, self.files, self.per_dir, self.big = root, files, per_dir, big
        self.tree = files - big

    def directory(self, g: int) -> str:
        if g < self.tree:
            return os.path.join(self.root, f"d{g // self.per_dir:04d}")
        return os.path.join(self.root, "big")

    def path(self, g: int) -> str:
        name = f"f{(g if g < self.tree else g - self.tree):06d}"
        return os.path.join(self.directory(g), name)

    def directories(self) -> list[str]:
        dirs = [os.path.join(self.root, f"d{d:04d}")
                for d in range((self.tree + self.per_dir - 1) // self.per_dir)]
        return dirs + ([os.path.join(self.root, "big")] if self.big else [])

    def tasks(self, start: int, end: int) -> list[tuple[str, int, int]]:
        """(first g, last g + 1) pieces of [start, end), none crossing a directory."""
        pieces = []
        g = start
        while g < end:
            stop = min(end, g + CREATE_TASK)
            if g < self.tree:
                stop = min(stop, (g // self.per_dir + 1) * self.per_dir, self.tree)
            pieces.append((g, stop))
            g = stop
        return pieces


# Worker processes (forked): the layout is a module global set before the pool starts.
_layout: Layout | None = None


def _create(piece: tuple[int, int]) -> int:
    for g in range(*piece):
        os.close(os.open(_layout.path(g), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    return piece[1] - piece[0]


def _stat_directory(directory: str) -> int:
    done = 0
    for name in os.listdir(directory):
        os.stat(os.path.join(directory, name))
        done += 1
    return done


def _utimes(task: tuple[int, int, int]) -> int:
    """Open ``files`` files from number ``first`` on, set their times ``repeats`` times each
    (one setattr request, one WAL record per call), close them."""
    first, files, repeats = task
    fds = [os.open(_layout.path((first + i) % _layout.files), os.O_RDONLY)
           for i in range(files)]
    try:
        stamp = 1_000_000_000 * (first + 1)
        for _ in range(repeats):
            for fd in fds:
                stamp += 1
                os.utime(fd, ns=(stamp, stamp))
    finally:
        for fd in fds:
            os.close(fd)
    return files * repeats


def run_pool(workers: int, function, tasks: list, total: int, what: str,
             every: float = 10.0) -> float:
    """Run tasks in ``workers`` processes, printing progress every ``every`` seconds; the wall
    time."""
    started = last = time.perf_counter()
    done = 0
    with multiprocessing.Pool(workers) as pool:
        for finished in pool.imap_unordered(function, tasks):
            done += finished
            now = time.perf_counter()
            if now - last >= every:
                last = now
                rate = done / (now - started)
                log(f"    {what}: {done:,}/{total:,} ({rate:,.0f}/s, "
                    f"{(total - done) / rate:,.0f} s to go)")
    return time.perf_counter() - started


class ScaleMount(common.Razorfs):
    """common.Razorfs (stats, daemon pid and CPU, log problems) driven phase by phase:
    timed mount and umount, kill -9, RSS, daemon log events."""

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        self.pid: int | None = None
        self.log_path = os.path.join(self.data, "razorfs.log")
        self.log_offset = 0

    def _cli(self, *arguments: str, timeout: float = 3600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "razorfs", *arguments],
                              check=False, capture_output=True, text=True, timeout=timeout)

    def mkfs(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        result = self._cli("mkfs", self.data)
        if result.returncode != 0:
            raise RuntimeError(f"razorfs mkfs failed: {result.stderr.strip()}")

    def mount(self, *options: str) -> float:
        """`razorfs mount` (background), timed until a stat of the mountpoint answers from the
        mounted filesystem."""
        self.log_offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        parent = os.stat(os.path.dirname(self.path)).st_dev
        started = time.perf_counter()
        result = self._cli("mount", self.data, self.path, *options)
        if result.returncode != 0:
            raise RuntimeError(f"razorfs mount failed ({result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()}")
        while os.stat(self.path).st_dev == parent:
            time.sleep(0.001)
        elapsed = time.perf_counter() - started
        self.pid = int(re.search(r"daemon pid (\d+)", result.stdout).group(1))
        if self.daemon_pid() != self.pid:
            raise RuntimeError(f"lock file names pid {self.daemon_pid()}, mount said {self.pid}")
        return elapsed

    def daemon_started(self) -> float:
        """Wall clock when the daemon process started: its start in clock ticks since boot
        against /proc/uptime (btime in /proc/stat is rounded to the second)."""
        with open(f"/proc/{self.pid}/stat") as stat_file:
            ticks = int(stat_file.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as uptime:
            now, since_boot = time.time(), float(uptime.read().split()[0])
        return now - since_boot + ticks / os.sysconf("SC_CLK_TCK")

    def recovery(self, seconds: float) -> dict:
        """A timed mount's breakdown from the daemon's log: daemon process start -> "recovered"
        (imports + recovery), and what recovery replayed."""
        events = self.events()
        recovered = [e for e in events if e.get("event") == "recovered"]
        event = recovered[0] if recovered else {}
        start = self.daemon_started()
        timeline = []  # seconds from the daemon's start to each event until "mounted"
        for logged in events:
            if "timestamp" in logged:
                timeline.append((logged.get("event"), logged.get("replayed"),
                                 round(event_epoch(logged) - start, 3)))
            if logged.get("event") == "mounted":
                break
        return {"seconds": round(seconds, 3), "replayed": event.get("replayed", 0),
                "inodes": event.get("inodes"),
                "daemon_start_to_recovered": (round(event_epoch(event) - start, 3)
                                              if event else None),
                "recovered_event": event or None, "timeline": timeline}

    def umount(self) -> float:
        started = time.perf_counter()
        result = self._cli("umount", self.path)
        if result.returncode != 0:
            raise RuntimeError(f"razorfs umount failed: {result.stderr.strip()}")
        self.pid = None
        return time.perf_counter() - started

    def alive(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/stat") as status:
                return status.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, TypeError):
            return False

    def mounted(self) -> bool:
        """Anything mounted at our mountpoint, a dead FUSE connection included."""
        with open("/proc/self/mounts") as mounts:
            return any(bench_unescape(line.split()[1]) == self.path for line in mounts)

    def kill9(self) -> None:
        """SIGKILL the daemon (the pid this script's mount started), wait until it is gone,
        detach the dead mount."""
        os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while self.alive():
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon {self.pid} survived SIGKILL for 60 s")
            time.sleep(0.02)
        self.pid = None
        self.detach()

    def detach(self) -> None:
        if self.mounted() and subprocess.run(["fusermount3", "-u", self.path], check=False,
                                             capture_output=True).returncode:
            subprocess.run(["fusermount3", "-u", "-z", self.path], check=False,
                           capture_output=True)

    def cleanup(self) -> None:
        """Whatever state a failure left: unmount cleanly if the daemon lives, else kill it
        (only our pid) and detach the mountpoint."""
        if self.pid is not None and self.alive():
            try:
                self.umount()
                return
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                log(f"cleanup: umount failed ({exc}); killing daemon {self.pid}")
                self.kill9()
                return
        self.detach()

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def events(self, name: str | None = None) -> list[dict]:
        """JSON events the daemon logged since the latest mount began."""
        events = []
        with open(self.log_path, "rb") as stream:
            stream.seek(self.log_offset)
            for line in stream.read().decode(errors="replace").splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and (name is None or event.get("event") == name):
                    events.append(event)
        return events

    def stats_retry(self, attempts: int = 20) -> dict:
        for _ in range(attempts):
            stats = self.stats()
            if stats is not None:
                return stats
            time.sleep(0.5)
        raise RuntimeError("razorfs stats keeps failing")

    def wait_durable(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats_retry()
            if stats["wal"]["durable_lag"] == 0 or time.monotonic() > deadline:
                return stats
            time.sleep(0.3)


def bench_unescape(field: str) -> str:
    """Undo /proc/self/mounts' octal escapes (\\040 for a space...)."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def event_epoch(event: dict) -> float:
    return datetime.datetime.fromisoformat(event["timestamp"]).timestamp()


# ---------------------------------------------------------------- phases

def stat_sample(mount: ScaleMount, layout: Layout, existing: int, samples: int,
                rng: random.Random) -> dict:
    """Cold os.stat latency of ``samples`` random files among the first ``existing``."""
    settled = common.settle(mount.pid)  # e.g. the last creates' commit
    before = mount.stats_retry()
    latencies: list[float] = []
    while len(latencies) < samples:
        chosen = rng.sample(range(existing), min(existing, samples - len(latencies)))
        paths = [layout.path(g) for g in chosen]
        common.drop_caches(2)
        settled += common.settle(mount.pid)
        for path in paths:
            started = time.perf_counter()
            os.stat(path)
            latencies.append(time.perf_counter() - started)
    after = mount.stats_retry()
    lookups = (after["requests"]["ops"].get("lookup", {}).get("count", 0)
               - before["requests"]["ops"].get("lookup", {}).get("count", 0))
    summary = latency_summary(latencies)
    summary["files"] = existing
    summary["daemon_lookups_per_stat"] = round(lookups / len(latencies), 2)
    summary["checkpoints_during"] = (after["checkpoints"]["count"]
                                     - before["checkpoints"]["count"])
    summary["settle_seconds"] = round(settled, 2)  # waited for an idle daemon first
    summary["loadavg"] = round(os.getloadavg()[0], 1)  # other work on the machine
    return summary


def phase_create(mount: ScaleMount, layout: Layout, args, rng: random.Random,
                 results: dict) -> None:
    global _layout
    _layout = layout
    milestones = [m for m in MILESTONES if m < layout.files] + [layout.files]
    results["stat_latency"] = []
    created, create_seconds = 0, 0.0
    for milestone in milestones:
        pieces = layout.tasks(created, milestone)
        for directory in sorted({layout.directory(g) for g, _ in pieces}):
            os.makedirs(directory, exist_ok=True)
        log(f"  creating files {created:,}..{milestone:,} ({args.workers} processes)")
        seconds = run_pool(args.workers, _create, pieces, milestone - created, "created")
        create_seconds += seconds
        log(f"  {milestone:,} files: {(milestone - created) / seconds:,.0f} files/s; "
            f"measuring cold stat latency")
        created = milestone
        time.sleep(1.2)  # let the last commit happen: measure an idle filesystem
        sample = stat_sample(mount, layout, created, args.samples, rng)
        if sample["checkpoints_during"]:
            log("  a checkpoint ran during the sample: measuring again")
            sample = stat_sample(mount, layout, created, args.samples, rng)
        results["stat_latency"].append(sample)
        log(f"  stat at {count(created)} files: p50 {sample['p50_ms']:.3f} ms, "
            f"p99 {sample['p99_ms']:.3f} ms, max {sample['max_ms']:.1f} ms "
            f"({sample['daemon_lookups_per_stat']} daemon lookups per stat)")
    results["create"] = {"files": layout.files, "seconds": round(create_seconds, 2),
                         "files_per_second": round(layout.files / create_seconds, 1),
                         "workers": args.workers}


def phase_walk_and_rss(mount: ScaleMount, layout: Layout, args, results: dict) -> None:
    big = os.path.join(layout.root, "big")
    if layout.big:
        for function in ("listdir", "scandir"):
            common.drop_caches(2)
            common.settle(mount.pid)
            started = time.perf_counter()
            if function == "listdir":
                entries = len(os.listdir(big))
            else:
                with os.scandir(big) as scan:
                    entries = sum(1 for _ in scan)
            seconds = time.perf_counter() - started
            results[f"big_{function}"] = {"entries": entries, "seconds": round(seconds, 3)}
            log(f"  cold os.{function} of big/ ({entries:,} entries): {seconds:.2f} s")
    results["rss_after_mount"] = mount.rss_bytes()
    log(f"  stat walk of every file ({args.workers} processes)")
    common.drop_caches(2)
    common.settle(mount.pid)
    directories = layout.directories()
    directories.sort(key=lambda d: not d.endswith("/big"))  # the long one first
    seconds = run_pool(args.workers, _stat_directory, directories, layout.files, "stat'ed")
    results["stat_walk"] = {"files": layout.files, "seconds": round(seconds, 2),
                            "stats_per_second": round(layout.files / seconds, 1)}
    stats = mount.stats_retry()
    rss = mount.rss_bytes()
    empty = results["rss_empty"]
    inodes = stats["inodes"] - results["inodes_empty"]
    results["rss"] = {"bytes": rss, "empty_bytes": empty, "inodes": stats["inodes"],
                      "bytes_per_inode": round((rss - empty) / inodes, 1)}
    log(f"  daemon RSS {rss / 2**20:,.1f} MiB (empty mount {empty / 2**20:,.1f} MiB), "
        f"{stats['inodes']:,} inodes: {(rss - empty) / inodes:,.0f} bytes per inode")


def phase_wal(mount: ScaleMount, layout: Layout, args, results: dict) -> None:
    before = mount.stats_retry()
    tasks = []
    planned = 0
    while planned < args.wal_records:
        repeats = min(WAL_TASK_REPEATS, -(-(args.wal_records - planned) // WAL_TASK_FILES))
        tasks.append((len(tasks) * WAL_TASK_FILES % layout.files,
                      min(WAL_TASK_FILES, layout.files), repeats))
        planned += tasks[-1][1] * repeats
    log(f"  {planned:,} utime calls on open files ({args.workers} processes)")
    seconds = run_pool(args.workers, _utimes, tasks, planned, "utime")
    after = mount.wait_durable()
    records = after["wal"]["last_lsn"] - before["wal"]["last_lsn"]
    results["wal_generate"] = {
        "utime_calls": planned, "seconds": round(seconds, 2),
        "records": records, "records_per_second": round(records / seconds, 1),
        "bytes_since_checkpoint": after["wal"]["bytes_since_checkpoint"],
        "checkpoints_in_phase": after["checkpoints"]["count"],
        "durable_lag_at_kill": after["wal"]["durable_lag"]}
    log(f"  {records:,} WAL records in {seconds:.1f} s ({records / seconds:,.0f}/s), "
        f"{after['wal']['bytes_since_checkpoint'] / 2**20:,.1f} MiB of log, "
        f"{after['checkpoints']['count']} checkpoints since mount")
    if after["checkpoints"]["count"]:
        log("  WARNING: a checkpoint ran in this phase: the replay will be shorter")


def phase_stall(mount: ScaleMount, layout: Layout, args, rng: random.Random,
                results: dict) -> None:
    order = rng.sample(range(layout.files), layout.files)
    timeline: list[tuple[float, float]] = []  # (wall clock at start, latency)
    stop = threading.Event()

    def loop() -> None:
        position = 0
        while not stop.is_set():
            path = layout.path(order[position % len(order)])
            position += 1
            wall, started = time.time(), time.perf_counter()
            os.stat(path)
            timeline.append((wall, time.perf_counter() - started))

    common.drop_caches(2)
    common.settle(mount.pid)
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        time.sleep(2.0)  # baseline
        for index in range(args.checkpoints):
            # Wait for the checkpoint in the daemon's log, not with `razorfs stats`: the
            # coordinator checks whether a checkpoint is due only after checkpoint_poll (2 s)
            # without a message, and every stats request is a message to it, so polling stats
            # more often than that holds checkpoints off indefinitely.
            done_before = len(mount.events("checkpoint"))
            os.utime(layout.path(index % layout.files))  # one WAL record: a checkpoint is due
            deadline = time.monotonic() + 600
            while len(mount.events("checkpoint")) == done_before:
                if time.monotonic() > deadline:
                    raise RuntimeError("no checkpoint within 600 s of a change")
                time.sleep(0.2)
            log(f"  checkpoint {index + 1}/{args.checkpoints} done")
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(timeout=600)
    checkpoints = []
    for event in mount.events("checkpoint"):
        end = event_epoch(event)
        checkpoints.append({"lsn": event.get("lsn"), "bytes": event.get("bytes"),
                            "seconds": event.get("seconds"),
                            "start": end - event.get("seconds", 0), "end": end})
    during = [latency for wall, latency in timeline
              if any(wall <= c["end"] and wall + latency >= c["start"] for c in checkpoints)]
    outside = [latency for wall, latency in timeline
               if not any(wall <= c["end"] and wall + latency >= c["start"]
                          for c in checkpoints)]
    results["checkpoint_stall"] = {
        "checkpoints": [{k: v for k, v in c.items() if k not in ("start", "end")}
                        for c in checkpoints],
        "all": latency_summary([latency for _, latency in timeline]),
        "during_checkpoints": latency_summary(during),
        "outside_checkpoints": latency_summary(outside)}
    stall = results["checkpoint_stall"]
    log(f"  {len(timeline):,} stats; during {len(checkpoints)} checkpoints: "
        f"max {stall['during_checkpoints'].get('max_ms', 0):,.1f} ms; outside: "
        f"p99 {stall['outside_checkpoints'].get('p99_ms', 0):.2f} ms")


# ---------------------------------------------------------------- report

def replay_breakdown(mount: dict) -> dict | None:
    """Where a replaying mount's time went, from the daemon's "replaying WAL" progress lines
    (one per 100,000 records): seconds from the daemon's start until replay began (start-up,
    checkpoint load, log scan), replay, and from its end to "recovered" (recovery's own
    checkpoint). None with fewer than two progress lines."""
    timeline = mount.get("timeline") or []
    progress = [(replayed, at) for name, replayed, at in timeline if name == "replaying WAL"]
    recovered = [at for name, _, at in timeline if name == "recovered"]
    if len(progress) < 2 or not recovered:
        return None
    (first_count, first_at), (last_count, last_at) = progress[0], progress[-1]
    per_record = (last_at - first_at) / (last_count - first_count)
    start = first_at - first_count * per_record
    end = last_at + (mount["replayed"] - last_count) * per_record
    return {"before_replay": round(start, 3), "replay": round(end - start, 3),
            "after_replay": round(recovered[0] - end, 3),
            "us_per_record": round(per_record * 1e6, 2)}


def build_rows(results: dict, files: int) -> list[dict]:
    """(measure, value, target, verdict) rows; a verdict measured below the target's scale says
    at which."""
    rows = []

    def row(measure, value, target="", met=None, scale=None, target_scale=None):
        verdict = "" if met is None else ("met" if met else "NOT met")
        if verdict and scale is not None and scale < target_scale:
            verdict += f" (at {count(scale)})"
        rows.append({"measure": measure, "value": value, "target": target, "verdict": verdict,
                     "met": met, "scale": scale})

    create = results.get("create")
    if create:
        row(f"create {files:,} files ({create['workers']} processes)",
            f"{create['seconds']:,.1f} s, {create['files_per_second']:,.0f} files/s")
    for sample in results.get("stat_latency", []):
        row(f"cold stat at {count(sample['files'])} files",
            f"p50 {sample['p50_ms']:.3f} ms, p99 {sample['p99_ms']:.3f} ms, "
            f"max {sample['max_ms']:.1f} ms (load {sample.get('loadavg', '?')})")
    samples = results.get("stat_latency", [])
    remounted = results.get("stat_latency_remounted")
    if remounted:
        row(f"cold stat at {count(remounted['files'])} files, fresh mount (phase B)",
            f"p50 {remounted['p50_ms']:.3f} ms, p99 {remounted['p99_ms']:.3f} ms, "
            f"max {remounted['max_ms']:.1f} ms (load {remounted.get('loadavg', '?')})")
    if len(samples) >= 2:
        first, last = samples[0], samples[-1]
        p50, p99 = last["p50_ms"] / first["p50_ms"], last["p99_ms"] / first["p99_ms"]
        row(f"stat latency {count(last['files'])} vs {count(first['files'])} files",
            f"p50 x{p50:.2f}, p99 x{p99:.2f}", "flat: p50 <= x1.5, p99 <= x2",
            p50 <= 1.5 and p99 <= 2.0, last["files"], 1_000_000)
    during_create = results.get("checkpoints_during_create")
    if during_create:
        row("checkpoints during the creation", f"{len(during_create)}, longest "
            f"{max(c['seconds'] or 0 for c in during_create):.2f} s")
    if "umount_after_create" in results:
        row(f"umount (final checkpoint, {count(files)} files)",
            f"{results['umount_after_create']:.2f} s")
    empty = results.get("mount_empty", {}).get("seconds")
    clean = results.get("mount_clean")
    if clean:
        row(f"mount (checkpoint of {count(files)} files)",
            f"{clean['seconds']:.2f} s (daemon start->recovered "
            f"{clean['daemon_start_to_recovered']:.2f} s; empty fs {empty:.2f} s)",
            "<= 10 s", clean["seconds"] <= 10, files, 1_000_000)
    listing = results.get("big_listdir")
    if listing:
        row(f"cold listdir of a {count(listing['entries'])}-entry directory",
            f"{listing['seconds']:.2f} s", "<= 2 s (100k)", listing["seconds"] <= 2,
            listing["entries"], 100_000)
    if "big_scandir" in results:
        row("cold scandir of it", f"{results['big_scandir']['seconds']:.2f} s")
    walk = results.get("stat_walk")
    if walk:
        row("walk: listdir + stat of every file", f"{walk['seconds']:,.1f} s, "
            f"{walk['stats_per_second']:,.0f} files/s")
    rss = results.get("rss")
    if rss:
        row(f"daemon RSS per inode ({rss['inodes']:,} inodes)",
            f"{rss['bytes_per_inode']:,.0f} B ({rss['bytes'] / 2**20:,.0f} MiB, empty "
            f"{rss['empty_bytes'] / 2**20:,.0f} MiB)", "<= 500 B",
            rss["bytes_per_inode"] <= 500, rss["inodes"], 1_000_000)
    generate = results.get("wal_generate")
    if generate:
        row("WAL records made (utime, no checkpoint)",
            f"{generate['records']:,} in {generate['seconds']:,.1f} s "
            f"({generate['records_per_second']:,.0f}/s)")
    replay = results.get("mount_replay")
    if replay:
        row(f"mount after kill -9 (replay {count(replay['replayed'])} records)",
            f"{replay['seconds']:.2f} s (daemon start->recovered "
            f"{replay['daemon_start_to_recovered']:.2f} s)", "<= 10 s (1M)",
            replay["seconds"] <= 10, replay["replayed"], 1_000_000)
        parts = replay_breakdown(replay)
        if parts:
            results["mount_replay"]["breakdown"] = parts
            row("  of which the replay alone (daemon log)",
                f"{parts['replay']:.2f} s ({parts['us_per_record']:.1f} us/record); before: "
                f"{parts['before_replay']:.2f} s, after: {parts['after_replay']:.2f} s",
                "<= 10 s (1M)", parts["replay"] <= 10, replay["replayed"], 1_000_000)
    stall = results.get("checkpoint_stall")
    if stall:
        during, checkpoints = stall["during_checkpoints"], stall["checkpoints"]
        longest = max((c["seconds"] for c in checkpoints), default=0)
        row(f"checkpoints during the stat loop ({count(files)} files)",
            f"{len(checkpoints)}, longest {longest:.2f} s")
        if during.get("count"):
            row("longest stat while a checkpoint runs",
                f"{during['max_ms']:,.1f} ms (p50 {during['p50_ms']:.2f} ms, "
                f"{during['count']:,} stats)", "<= 100 ms", during["max_ms"] <= 100,
                files, 1_000_000)
        outside = stall["outside_checkpoints"]
        if outside.get("count"):
            row("stat latency outside checkpoints",
                f"p50 {outside['p50_ms']:.3f} ms, p99 {outside['p99_ms']:.3f} ms, "
                f"max {outside['max_ms']:.1f} ms")
    if "umount_final" in results:
        row("umount at the end (after the stall probe's checkpoints)",
            f"{results['umount_final']:.2f} s")
    return rows


def extrapolate(results: dict, files: int, target: int = 1_000_000) -> list[dict]:
    """For a run of 100k to 1M files: the size-dependent numbers scaled linearly to ``target``
    files (from the empty filesystem's values where there is a fixed part). NOT measured: a
    linear model of this run, which ignores anything that grows faster (GC of more objects,
    cache misses). The checkpoint stall is left out: it is linear in the inodes only if a
    checkpoint copies the whole tree in one step."""
    rows = []
    factor = target / files

    def row(measure, value, target_text="", met=None):
        verdict = "" if met is None else ("met" if met else "NOT met")
        rows.append({"measure": measure, "value": value, "target": target_text,
                     "verdict": verdict + " (extrapolated)" if verdict else "", "met": met,
                     "scale": None})

    create = results.get("create")
    if create:
        row("create", f"{target / create['files_per_second'] / 60:,.1f} min at "
            f"{create['files_per_second']:,.0f} files/s")
    empty = results.get("mount_empty", {}).get("seconds", 0.0)
    clean = results.get("mount_clean")
    mount_at_target = None
    if clean:
        mount_at_target = empty + max(0.0, clean["seconds"] - empty) * factor
        row("mount (clean)", f"{mount_at_target:.1f} s = empty fs {empty:.2f} s + "
            f"({clean['seconds']:.2f} - {empty:.2f}) s x {factor:g}", "<= 10 s",
            mount_at_target <= 10)
    listing = results.get("big_listdir")
    if listing and listing["entries"] < 100_000:
        seconds = listing["seconds"] * 100_000 / listing["entries"]
        row("cold listdir of 100k entries", f"{seconds:.2f} s", "<= 2 s", seconds <= 2)
    replay = results.get("mount_replay")
    if replay and clean and mount_at_target is not None:
        records = max(replay["replayed"], 1)
        replay_part = (max(0.0, replay["seconds"] - clean["seconds"])
                       * max(1.0, 1_000_000 / records))
        row("mount after kill -9, 1M records",
            f"{mount_at_target + replay_part:.1f} s = mount (clean) above + replay part "
            f"{replay_part:.2f} s", "<= 10 s", mount_at_target + replay_part <= 10)
    if "umount_final" in results:
        row("umount (final checkpoint)", f"{results['umount_final'] * factor:,.1f} s")
    return rows


def format_rows(rows: list[dict]) -> str:
    widths = [max(len(r[key]) for r in rows + [{"measure": "measure", "value": "value",
                                                 "target": "target", "verdict": ""}])
              for key in ("measure", "value", "target")]
    lines = [f"{'measure':<{widths[0]}}  {'value':<{widths[1]}}  {'target':<{widths[2]}}  verdict"]
    for r in rows:
        lines.append(f"{r['measure']:<{widths[0]}}  {r['value']:<{widths[1]}}  "
                     f"{r['target']:<{widths[2]}}  {r['verdict']}".rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1_000_000, help="files to create (N)")
    parser.add_argument("--per-dir", type=int, default=1000, help="files per tree directory")
    parser.add_argument("--big-dir", type=int, default=None,
                        help="files in big/ (part of N; default min(100000, N/2))")
    parser.add_argument("--workers", type=int, default=max(2, os.cpu_count() or 1),
                        help="processes creating, walking and changing files")
    parser.add_argument("--wal-records", type=int, default=1_000_000,
                        help="changes made before kill -9 (WAL records to replay)")
    parser.add_argument("--samples", type=int, default=3000,
                        help="cold stats per milestone of the creation ramp")
    parser.add_argument("--checkpoints", type=int, default=3,
                        help="checkpoints to run under the stat loop")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR,
                        help="a new directory is made here for data and mountpoint")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--json", default=DEFAULT_JSON,
                        help="write the results as JSON here ('' for none)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("scale: run as root (FUSE mounts, /proc/sys/vm/drop_caches)")
    if args.files < 2:
        raise SystemExit("scale: --files must be at least 2")
    args.big = min(100_000, args.files // 2) if args.big_dir is None else args.big_dir
    return args


def run_phases(mount: ScaleMount, layout: Layout, args, results: dict, phase) -> None:
    """Phases A, B and C (the module's docstring); ``phase(name)`` marks each start."""
    rng = random.Random(args.seed)
    phase("A: mkfs, mount, create")
    mount.mkfs()
    results["mount_empty"] = mount.recovery(mount.mount())
    os.stat(mount.path)
    time.sleep(0.5)
    results["rss_empty"] = mount.rss_bytes()
    results["inodes_empty"] = mount.stats_retry()["inodes"]
    phase_create(mount, layout, args, rng, results)
    stats = mount.wait_durable()
    results["stats_after_create"] = {"wal": stats["wal"], "checkpoints": stats["checkpoints"],
                                     "inodes": stats["inodes"]}
    results["checkpoints_during_create"] = [
        {k: e.get(k) for k in ("lsn", "bytes", "seconds")}
        for e in mount.events("checkpoint")]
    log(f"  {len(results['checkpoints_during_create'])} checkpoints during the creation")
    results["umount_after_create"] = mount.umount()
    log(f"  umount: {results['umount_after_create']:.2f} s")

    phase("B: clean mount, listing, stat walk, RSS, WAL records, kill -9")
    clean = mount.recovery(mount.mount(*NEVER_CHECKPOINT))
    results["mount_clean"] = clean
    log(f"  mount: {clean['seconds']:.2f} s (daemon start to recovered "
        f"{clean['daemon_start_to_recovered']} s, {clean['inodes']} inodes, replayed "
        f"{clean['replayed']} records)")
    sample = stat_sample(mount, layout, args.files, args.samples, rng)
    results["stat_latency_remounted"] = sample
    log(f"  stat at {count(args.files)} files after the remount: p50 "
        f"{sample['p50_ms']:.3f} ms, p99 {sample['p99_ms']:.3f} ms, max "
        f"{sample['max_ms']:.1f} ms")
    phase_walk_and_rss(mount, layout, args, results)
    phase_wal(mount, layout, args, results)
    mount.kill9()
    log("  daemon killed with SIGKILL, dead mount detached")

    phase("C: mount after kill -9 (replay), checkpoint stall")
    replay = mount.recovery(mount.mount("--checkpoint-bytes", "1"))
    results["mount_replay"] = replay
    results["rss_after_replay"] = mount.rss_bytes()
    log(f"  mount: {replay['seconds']:.2f} s (daemon start to recovered "
        f"{replay['daemon_start_to_recovered']} s), replayed {replay['replayed']:,} WAL "
        f"records")
    phase_stall(mount, layout, args, rng, results)
    results["umount_final"] = mount.umount()
    log(f"  umount: {results['umount_final']:.2f} s")


def publish(args, context: dict, results: dict, error: str | None) -> None:
    """The table (and the extrapolation of a 100k-1M run) on stdout, everything in --json."""
    version, machine = context["razorfs"], context["machine"]
    changed = (f" + {len(version['changed_files'])} changed file(s)"
               if version["changed_files"] else "")
    rows = build_rows(results, args.files)
    print(f"razorfs {version['commit']}{changed}, scale probe: {args.files:,} files "
          f"({args.big:,} in big/), {args.workers} processes, {' '.join(machine['df_T'])}, "
          f"{machine['nproc']} CPUs, kernel {machine['kernel']}; "
          f"{context['elapsed_seconds'] / 60:.1f} min; load average at each phase: "
          f"{', '.join(f'{value:.1f}' for value in context['loadavg'].values())}")
    print(format_rows(rows))
    print("(cold: dentry cache dropped, every stat a FUSE lookup; RSS = VmRSS of the daemon "
          "after a stat walk minus an empty mount's; \"(at X)\": measured below the target's "
          "scale)")
    extrapolated = (extrapolate(results, args.files)
                    if 100_000 <= args.files < 1_000_000 else [])
    if extrapolated:
        print(f"\nEXTRAPOLATED to 1,000,000 files (NOT measured: linear in the number of files "
              f"from this {args.files:,}-file run):")
        print(format_rows(extrapolated))
    problems = results["daemon_log_problems"]
    if problems:
        print(f"the daemon logged {len(problems)} warning/error line(s), e.g.: "
              f"{problems[0][:300]}")
    if error:
        print(f"FAILED: {error}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as out:
            json.dump({**context, "files": args.files, "big_dir": args.big,
                       "per_dir": args.per_dir, "workers": args.workers,
                       "wal_records": args.wal_records, "samples": args.samples,
                       "razorfs_at_end": common.razorfs_version(), "rows": rows,
                       "extrapolated_to_1M": extrapolated, "results": results,
                       "error": error}, out, indent=1)
        print(f"results: {args.json}")


def main() -> int:
    args = arguments()
    os.makedirs(args.workdir, exist_ok=True)
    workdir = os.path.join(args.workdir, f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.makedirs(workdir)
    context = {"command": sys.argv, "razorfs": common.razorfs_version(),
               "machine": common.machine_info(workdir), "loadavg": {}}
    filesystem = context["machine"]["df_T"][1:]
    if filesystem and filesystem[0] in ("tmpfs", "fuse", "nfs", "nfs4", "overlay"):
        log(f"WARNING: {workdir} is on {filesystem[0]}, not a local disk")
    log(f"razorfs {context['razorfs']['commit']}; {args.files:,} files ({args.big:,} in big/), "
        f"{args.wal_records:,} WAL records, in {workdir}")
    mount = ScaleMount(workdir)
    layout = Layout(mount.path, args.files, args.per_dir, args.big)
    results: dict = {}
    phase_started: dict[str, float] = {}
    error = None
    started = time.time()

    def phase(name: str) -> None:
        phase_started[name] = time.time()
        context["loadavg"][name] = os.getloadavg()[0]  # other work on the machine
        log(f"phase {name} (load average {context['loadavg'][name]:.1f})")

    try:
        run_phases(mount, layout, args, results, phase)
    # Any failure, or Ctrl-C: report what was measured, then clean up below.
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001
        error = f"{type(exc).__name__}: {exc}"
        log(f"FAILED: {error}")
    finally:
        try:
            mount.cleanup()
        finally:
            results["daemon_log_problems"] = (mount._log_problems()
                                              if os.path.exists(mount.log_path) else [])
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
    context["elapsed_seconds"] = round(time.time() - started, 1)
    ends = list(phase_started.values())[1:] + [time.time()]
    context["phase_seconds"] = {name: round(end - begun, 1) for (name, begun), end
                                in zip(phase_started.items(), ends)}
    publish(args, context, results, error)
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
