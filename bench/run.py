"""Benchmarks: razorfs against a plain directory of the same local disk, in the same run.

    .venv/bin/python bench/run.py                      # full suite, 3 repetitions (~9 min)
    .venv/bin/python bench/run.py --quick              # smoke run, 1 repetition (~30 s)
    .venv/bin/python bench/run.py --only fio,dbench    # a subset (selectors below)
    .venv/bin/python bench/run.py --profile fs_mark_nosync   # + py-spy of the daemon

Run as root (it drops the page cache with /proc/sys/vm/drop_caches and installs the Debian
packages fio, fsmark and dbench with apt-get if they are missing; --no-install skips instead).

Each repetition runs every selected probe against a fresh razorfs mount (mkfs + mount, data
directory and mountpoint under --workdir) and against a plain directory next to it on the same
disk, back to back (the order alternates between repetitions). The table shows medians over the
repetitions, the ratio razorfs/plain (for rates: > 1 is better for razorfs) and, where the issue
set one, the target and whether it is met. Results (every run, medians, ratios, targets, razorfs
counters, machine) go to --json (default bench/results/latest.json).

Probes (selector for --only in brackets; `python` and `fio` select groups):

  creates          [creates]  create+close N empty files in one directory      files/s
  stat             [stat]     os.stat of those N files                         stats/s
  seq_write        [seq_write]  1 MiB writes of a file, then fsync            MiB/s
  seq_read         [seq_read]   read it back after dropping the page cache    MiB/s
  rand_fsync_K     [rand_fsync]  K processes: 4 KiB pwrite + fsync at random   durable writes/s
                   offsets of their own file (K = 1, 2, 4, 8, 16: group commit scaling)
  fio_seq_write    [fio_seq_write]  fio, 1 MiB sequential writes, end_fsync=1  MiB/s
  fio_seq_read     [fio_seq_read]   fio, 1 MiB sequential reads of that file
                   after dropping the page cache                               MiB/s
  fio_randwrite_J  [fio_randwrite]  fio, 4 KiB random writes, fsync=1, J jobs
                   (J = 1, 4; group_reporting), time based                     IOPS
  fs_mark_nosync   [fs_mark]  fs_mark: 4 KiB files, one thread, -S 0 (no sync) files/s
  fs_mark_fsync    [fs_mark]  same with -S 1 (fsync before close)              files/s
  dbench           [dbench]   dbench, 4 clients, the package's client.txt     MB/s

Sizes (full / --quick): creates and stat 10,000 / 300 files; seq_* 64 / 8 MiB; rand_fsync_K
3 / 0.5 s each, K = 1,2,4,8,16 / 1,8; fio_seq_* 256 / 16 MiB, at most 10 / 1 s; fio_randwrite_J
a 64 / 4 MiB file per job for 10 / 1 s; fs_mark 5,000 / 200 files (-S 0) and 2,000 / 100 (-S 1);
dbench 10 / 2 s (plus its 2 s warm-up). fio runs with ioengine=psync, fallocate=none; fs_mark's
package is `fsmark`, its binary `fs_mark`; dbench's load file is found with `dpkg -L dbench`.

Derived: group_commit_8v1 = rand_fsync_8 / rand_fsync_1 of the same target (median of the
per-repetition values): how much aggregate durable throughput 8 writers get over one.

razorfs counters: `razorfs stats MOUNT --json` is read before and after every razorfs probe; the
deltas of wal.commits, wal.records and wal.fsyncs give records per group commit and disk fsyncs
per committed transaction (WAL record), the request counts give FUSE requests per probe; with
the daemon's CPU time from /proc/PID/stat, daemon CPU per second and per request, and from
/proc/PID/task/PID/stat the main (trio) thread's CPU per second: that thread serves every
request, so 1.00 there means requests queue behind Python. The table after the results shows
them per probe (rand_fsync_8 is the group-commit probe the issue asks about).

Targets (issue 5, ratios razorfs/plain on the same machine): fio_seq_write >= 0.8,
fio_seq_read >= 0.8, fio_randwrite_4 >= 0.5, fs_mark_nosync >= 0.25, dbench >= 0.1, and
group_commit_8v1 >= 4 on razorfs itself.

--profile PROBE[,PROBE] runs `py-spy record -f raw --threads` on the razorfs
daemon (pid from DATA_DIR/lock) for the duration of those probes (razorfs side only) and prints
samples by category (trio loop, pyfuse3, msgpack, structlog, fsync...) for the trio thread and
the worker threads; raw files go to --profile-dir (default bench/results/profiles). Only the
samples py-spy counts as active are kept, and shares are of those; the busy share of the main
thread comes from the /proc column, not from py-spy: with `--idle --nonblocking` (sessions 1-4)
py-spy put 70-89% of a single fsync writer's main-thread samples in epoll.poll while /proc
showed that thread 75% busy, and even without them it attributes some waiting for the GIL to
epoll.poll.
py-spy: `.venv/bin/pip install py-spy`.

Exit status 0, or 1 if a probe failed (each failure is printed; the other probes still run).
A tool that is missing and cannot be installed is skipped with a message, not a failure.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_JSON = os.path.join(BENCH_DIR, "results", "latest.json")
DEFAULT_PROFILE_DIR = os.path.join(BENCH_DIR, "results", "profiles")

# probe name -> unit (the order is the table's order)
UNITS = {
    "creates": "files/s",
    "stat": "stats/s",
    "seq_write": "MiB/s",
    "seq_read": "MiB/s",
    **{f"rand_fsync_{k}": "writes/s" for k in (1, 2, 4, 8, 16)},
    "fio_seq_write": "MiB/s",
    "fio_seq_read": "MiB/s",
    "fio_randwrite_1": "IOPS",
    "fio_randwrite_4": "IOPS",
    "fs_mark_nosync": "files/s",
    "fs_mark_fsync": "files/s",
    "dbench": "MB/s",
    "group_commit_8v1": "x",
}

# The targets: (row, what is compared, threshold).
#   "ratio": median razorfs / median plain of that row;  "razorfs": the razorfs value itself.
TARGETS = [
    ("fio_seq_write", "ratio", 0.8),
    ("fio_seq_read", "ratio", 0.8),
    ("fio_randwrite_4", "ratio", 0.5),
    ("fs_mark_nosync", "ratio", 0.25),
    ("dbench", "ratio", 0.1),
    ("group_commit_8v1", "razorfs", 4.0),
]


# ---------------------------------------------------------------- helpers

def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as control:
        control.write("3\n")


def run_tool(command: list[str], timeout: float, cwd: str = "/") -> str:
    """Run an external benchmark tool; its stdout, or RuntimeError with the tail of its output."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
        raise RuntimeError(f"{command[0]} exited with status {result.returncode}: "
                           + " | ".join(tail))
    return result.stdout


class Tools:
    """fio, fs_mark and dbench: found on PATH, or installed from Debian when allowed."""

    PACKAGES = {"fio": "fio", "fs_mark": "fsmark", "dbench": "dbench"}

    def __init__(self, install: bool) -> None:
        self.install = install
        self.paths: dict[str, str] = {}
        self.missing: dict[str, str] = {}
        self._apt_updated = False

    def require(self, binary: str) -> str | None:
        if binary in self.paths:
            return self.paths[binary]
        if binary in self.missing:
            return None
        path = shutil.which(binary)
        if path is None:
            path = self._install(binary)
        if path is None:
            log(f"SKIPPING the {binary} probes: {self.missing[binary]}")
        else:
            self.paths[binary] = path
        return path

    def _candidate(self, package: str) -> str | None:
        result = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True)
        match = re.search(r"Candidate:\s*(\S+)", result.stdout)
        if match and match.group(1) != "(none)":
            return match.group(1)
        return None

    def _install(self, binary: str) -> str | None:
        package = self.PACKAGES[binary]
        if not self.install:
            self.missing[binary] = (f"{binary} is not installed (Debian package {package}; "
                                    f"--no-install was given)")
            return None
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            self.missing[binary] = (f"{binary} is not installed and cannot be installed here "
                                    f"(needs root and apt-get: apt-get install {package})")
            return None
        candidate = self._candidate(package)
        if candidate is None and not self._apt_updated:
            log("running apt-get update to look for benchmark packages")
            subprocess.run(["apt-get", "update"], capture_output=True)
            self._apt_updated = True
            candidate = self._candidate(package)
        if candidate is None:
            self.missing[binary] = (f"{binary} is not packaged for this system (no installation "
                                    f"candidate for the Debian package {package})")
            return None
        log(f"{binary} is missing: installing the Debian package {package} {candidate} "
            f"(apt-get install -y {package})")
        result = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends",
                                 "-o", "DPkg::Lock::Timeout=300", package],
                                capture_output=True, text=True,
                                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        path = shutil.which(binary)
        if result.returncode != 0 or path is None:
            tail = " | ".join(result.stderr.strip().splitlines()[-3:])
            self.missing[binary] = f"apt-get install {package} failed: {tail}"
            return None
        return path

    def versions(self) -> dict[str, str]:
        versions = {}
        for binary in self.paths:
            result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", self.PACKAGES[binary]],
                                    capture_output=True, text=True)
            versions[binary] = result.stdout.strip() or "?"
        return versions

    def dbench_loadfile(self) -> str | None:
        """The client.txt load file that the dbench package ships."""
        candidates = ["/usr/share/dbench/client.txt", "/usr/local/share/dbench/client.txt",
                      "/usr/share/dbench/client_enterprise.txt"]
        listing = subprocess.run(["dpkg", "-L", "dbench"], capture_output=True, text=True)
        candidates += [line for line in listing.stdout.splitlines()
                       if line.endswith("client.txt")]
        for path in candidates:
            if os.path.isfile(path):
                return path
        for base in ("/usr/share", "/usr/local/share"):
            for dirpath, _, files in os.walk(base):
                if "client.txt" in files and "dbench" in dirpath:
                    return os.path.join(dirpath, "client.txt")
        return None


# ---------------------------------------------------------------- Python probes

def probe_creates(root: str, count: int) -> float:
    directory = os.path.join(root, "creates")
    os.mkdir(directory)
    started = time.perf_counter()
    for i in range(count):
        os.close(os.open(os.path.join(directory, f"f{i:06d}"), os.O_CREAT | os.O_WRONLY, 0o644))
    return count / (time.perf_counter() - started)


def probe_stat(root: str, count: int) -> float:
    directory = os.path.join(root, "creates")
    if not os.path.isdir(directory):  # --only stat: make the files first, untimed
        probe_creates(root, count)
    started = time.perf_counter()
    for i in range(count):
        os.stat(os.path.join(directory, f"f{i:06d}"))
    return count / (time.perf_counter() - started)


def probe_seq_write(root: str, size: int) -> float:
    chunk = random.Random(1).randbytes(MiB)
    path = os.path.join(root, "seq.bin")
    started = time.perf_counter()
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    for _ in range(size // MiB):
        os.write(fd, chunk)
    os.fsync(fd)
    os.close(fd)
    return size / MiB / (time.perf_counter() - started)


def probe_seq_read(root: str, size: int) -> float:
    path = os.path.join(root, "seq.bin")
    if not os.path.exists(path):  # --only seq_read: write the file first, untimed
        probe_seq_write(root, size)
    drop_caches()
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    total = 0
    while data := os.read(fd, MiB):
        total += len(data)
    os.close(fd)
    return total / MiB / (time.perf_counter() - started)


def _fsync_writer(path: str, seconds: float, seed: int, start, result) -> None:
    rng = random.Random(seed)
    block = rng.randbytes(4096)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    start.wait()
    done = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        os.pwrite(fd, block, rng.randrange(256) * 4096)
        os.fsync(fd)
        done += 1
    os.close(fd)
    result.put(done)


def probe_rand_fsync(root: str, writers: int, seconds: float) -> float:
    result = multiprocessing.Queue()
    start = multiprocessing.Event()
    directory = os.path.join(root, f"rand_fsync_{writers}")
    os.mkdir(directory)
    processes = [multiprocessing.Process(
        target=_fsync_writer, args=(os.path.join(directory, f"w{i}"), seconds, i, start, result))
        for i in range(writers)]
    for process in processes:
        process.start()
    time.sleep(0.2)  # let every writer open its file: the timed part is pwrite+fsync only
    start.set()
    total = sum(result.get(timeout=seconds + 120) for _ in processes)
    for process in processes:
        process.join()
    return total / seconds


# ---------------------------------------------------------------- external tools

def _fio(tools: Tools, root: str, job: list[str], timeout: float) -> dict:
    fio = tools.require("fio")
    command = [fio, "--output-format=json", f"--directory={root}", "--ioengine=psync",
               "--fallocate=none", "--group_reporting"] + job
    output = run_tool(command, timeout)
    # fio may print notes before the JSON document
    report = json.loads(output[output.index("{"):])
    return report["jobs"][0]


def probe_fio_seq_write(tools: Tools, root: str, size: int, runtime: float) -> float:
    job = _fio(tools, root, ["--name=seqwrite", "--filename=fio-seq.bin", "--rw=write",
                             "--bs=1M", f"--size={size}", "--end_fsync=1",
                             f"--runtime={runtime}"], timeout=runtime * 10 + 120)
    return job["write"]["bw"] / 1024  # KiB/s -> MiB/s (end_fsync time included by fio)


def probe_fio_seq_read(tools: Tools, root: str, size: int, runtime: float) -> float:
    path = os.path.join(root, "fio-seq.bin")
    if not os.path.exists(path):  # --only fio_seq_read: lay the file out first, untimed
        probe_fio_seq_write(tools, root, size, runtime)
    drop_caches()
    job = _fio(tools, root, ["--name=seqread", "--filename=fio-seq.bin", "--rw=read",
                             "--bs=1M", f"--size={os.path.getsize(path)}",
                             f"--runtime={runtime}"], timeout=runtime * 10 + 120)
    return job["read"]["bw"] / 1024


def probe_fio_randwrite(tools: Tools, root: str, numjobs: int, size: int,
                        runtime: float) -> float:
    job = _fio(tools, root, [f"--name=randwrite{numjobs}", "--rw=randwrite", "--bs=4k",
                             "--fsync=1", f"--size={size}", f"--numjobs={numjobs}",
                             "--time_based", f"--runtime={runtime}"],
               timeout=runtime * 10 + 300)
    return job["write"]["iops"]


def probe_fs_mark(tools: Tools, root: str, sync: int, files: int) -> float:
    fs_mark = tools.require("fs_mark")
    directory = f"fs_mark_S{sync}"
    os.mkdir(os.path.join(root, directory))
    # fs_mark refuses a -d path of 40 bytes or more: give it a relative one (it also writes its
    # small fs_log.txt into the current directory, after the timed part)
    output = run_tool([fs_mark, "-d", directory, "-s", "4096", "-n", str(files), "-t", "1",
                       "-S", str(sync), "-L", "1"], timeout=600, cwd=root)
    # FSUse%  Count  Size  Files/sec  App Overhead
    rows = [line.split() for line in output.splitlines()
            if re.match(r"^\s*\d+\s+\d+\s+\d+\s+[\d.]+\s+\d+\s*$", line)]
    if not rows:
        raise RuntimeError(f"fs_mark printed no result line: {output[-300:]!r}")
    return float(rows[-1][3])


def probe_dbench(tools: Tools, root: str, seconds: int, clients: int = 4) -> float:
    dbench = tools.require("dbench")
    loadfile = tools.dbench_loadfile()
    if loadfile is None:
        raise RuntimeError("dbench's load file client.txt was not found (dpkg -L dbench)")
    directory = os.path.join(root, "dbench")
    os.mkdir(directory)
    output = run_tool([dbench, "-D", directory, "-t", str(seconds), "-c", loadfile,
                       str(clients)], timeout=seconds * 6 + 180)
    match = re.search(r"Throughput\s+([\d.]+)\s+MB/sec", output)
    if not match:
        raise RuntimeError(f"dbench printed no Throughput line: {output[-300:]!r}")
    return float(match.group(1))


# ---------------------------------------------------------------- targets

class RazorMount:
    kind = "razorfs"

    def __init__(self, workdir: str) -> None:
        self.data = os.path.join(workdir, "razorfs-data")
        self.path = os.path.join(workdir, "razorfs-mnt")

    def __enter__(self) -> str:
        os.makedirs(self.path, exist_ok=True)
        razorfs = [sys.executable, "-m", "razorfs"]
        subprocess.run(razorfs + ["mkfs", self.data], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(razorfs + ["mount", self.data, self.path], check=True,
                       stdout=subprocess.DEVNULL)
        return self.path

    def daemon_pid(self) -> int | None:
        try:
            with open(os.path.join(self.data, "lock")) as lock:
                text = lock.read().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def daemon_cpu_seconds(self) -> tuple[float, float] | None:
        """utime + stime of the daemon, (all its threads, its main trio thread), from /proc."""
        pid = self.daemon_pid()
        seconds = []
        for path in (f"/proc/{pid}/stat", f"/proc/{pid}/task/{pid}/stat"):
            try:
                with open(path) as stat_file:
                    fields = stat_file.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                return None
            seconds.append((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
        return seconds[0], seconds[1]

    def stats(self) -> dict | None:
        result = subprocess.run([sys.executable, "-m", "razorfs", "stats", self.path, "--json"],
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            log(f"razorfs stats failed: {result.stderr.strip()}")
            return None
        return json.loads(result.stdout)

    def __exit__(self, *exc_info) -> None:
        for attempt in range(20):
            result = subprocess.run([sys.executable, "-m", "razorfs", "umount", self.path],
                                    capture_output=True, text=True)
            if result.returncode == 0:
                break
            time.sleep(0.5)  # a just-finished tool may still hold a file open
        else:
            raise RuntimeError(f"razorfs umount {self.path} failed: {result.stderr.strip()}")
        self.log_problems = self._log_problems()
        shutil.rmtree(self.data)

    def _log_problems(self) -> list[str]:
        """Warning and error lines of the daemon's log (kept in the results: a benchmark is
        also a stress test)."""
        problems = []
        try:
            with open(os.path.join(self.data, "razorfs.log"), errors="replace") as log_file:
                for line in log_file:
                    try:
                        level = json.loads(line).get("level")
                    except ValueError:
                        level = "unparsed"
                    if level not in ("info", "debug"):
                        problems.append(line.strip()[:2000])
        except OSError as exc:
            problems.append(f"cannot read the daemon log: {exc}")
        return problems


class PlainDir:
    kind = "plain"

    def __init__(self, workdir: str) -> None:
        self.path = os.path.join(workdir, "plain")

    def __enter__(self) -> str:
        os.makedirs(self.path)
        return self.path

    def __exit__(self, *exc_info) -> None:
        shutil.rmtree(self.path)


# ---------------------------------------------------------------- the suite

def plan(args, tools: Tools) -> list[tuple[str, callable]]:
    """(probe name, function(root) -> value) for every selected probe, in table order."""
    steps = []

    def add(name, function):
        if name in args.selected:
            steps.append((name, function))

    add("creates", lambda root: probe_creates(root, args.files))
    add("stat", lambda root: probe_stat(root, args.files))
    add("seq_write", lambda root: probe_seq_write(root, args.size))
    add("seq_read", lambda root: probe_seq_read(root, args.size))
    for writers in args.writers:
        add(f"rand_fsync_{writers}",
            lambda root, w=writers: probe_rand_fsync(root, w, args.seconds))
    add("fio_seq_write",
        lambda root: probe_fio_seq_write(tools, root, args.fio_size, args.fio_runtime))
    add("fio_seq_read",
        lambda root: probe_fio_seq_read(tools, root, args.fio_size, args.fio_runtime))
    for numjobs in (1, 4):
        add(f"fio_randwrite_{numjobs}",
            lambda root, j=numjobs: probe_fio_randwrite(tools, root, j, args.fio_rand_size,
                                                        args.fio_runtime))
    add("fs_mark_nosync", lambda root: probe_fs_mark(tools, root, 0, args.fs_mark_files))
    add("fs_mark_fsync", lambda root: probe_fs_mark(tools, root, 1, args.fs_mark_files_sync))
    add("dbench", lambda root: probe_dbench(tools, root, args.dbench_seconds))
    return steps


TOOL_OF = {"fio": "fio", "fs_mark": "fs_mark", "dbench": "dbench"}


def tool_for(probe: str) -> str | None:
    for prefix, binary in TOOL_OF.items():
        if probe.startswith(prefix):
            return binary
    return None


class Profiler:
    """py-spy on the razorfs daemon for the duration of one probe."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.py_spy = (shutil.which("py-spy")
                       or shutil.which("py-spy", path=os.path.dirname(sys.executable)))
        self.files: dict[str, list[str]] = collections.defaultdict(list)
        self._process = None

    def start(self, pid: int, probe: str, repetition: int) -> None:
        if self.py_spy is None:
            log("py-spy not found: `.venv/bin/pip install py-spy` to use --profile")
            return
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"{probe}-rep{repetition + 1}.txt")
        self._process = subprocess.Popen(
            [self.py_spy, "record", "-p", str(pid), "-o", path, "-f", "raw", "--threads"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.files[probe].append(path)
        time.sleep(0.5)  # py-spy attaches

    def stop(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
            self._process.wait(timeout=60)
            self._process = None


def _request_count(stats: dict) -> int:
    """FUSE requests served so far (every operation, failed ones included)."""
    return sum(row["count"] for row in stats["requests"]["ops"].values())


def run_suite(target, steps, args, tools: Tools, repetition: int,
              profiler: Profiler | None) -> dict:
    results: dict[str, float] = {}
    counters: dict[str, dict] = {}
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {}
    loadavg: dict[str, float] = {}  # 1-min load average as each probe starts (other work)
    with target as root:
        for name, function in steps:
            binary = tool_for(name)
            if binary and tools.require(binary) is None:
                continue
            before = target.stats() if target.kind == "razorfs" else None
            cpu_before = target.daemon_cpu_seconds() if target.kind == "razorfs" else None
            profiling = (profiler is not None and target.kind == "razorfs"
                         and name in args.profile)
            if profiling:
                profiler.start(target.daemon_pid(), name, repetition)
            loadavg[name] = os.getloadavg()[0]
            started = time.monotonic()
            try:
                results[name] = function(root)
            except Exception as exc:  # one failing probe must not lose the others
                errors[name] = f"{type(exc).__name__}: {exc}"
                log(f"{target.kind} {name} FAILED: {errors[name]}")
            finally:
                seconds[name] = round(time.monotonic() - started, 2)
                if profiling:
                    profiler.stop()
            cpu_after = target.daemon_cpu_seconds() if target.kind == "razorfs" else None
            if before is not None:
                after = target.stats()
                if after is not None:
                    counters[name] = {key: after["wal"][key] - before["wal"][key]
                                      for key in ("commits", "records", "fsyncs")}
                    requests = (_request_count(after) - _request_count(before))
                    counters[name]["requests"] = requests
                    ops_before = before["requests"]["ops"]
                    counters[name]["ops"] = {
                        op: row["count"] - ops_before.get(op, {}).get("count", 0)
                        for op, row in after["requests"]["ops"].items()
                        if row["count"] != ops_before.get(op, {}).get("count", 0)}
                    if cpu_before is not None and cpu_after is not None and seconds[name]:
                        cpu = cpu_after[0] - cpu_before[0]
                        # daemon CPU time / wall time of the probe: 1.0 = one core saturated
                        counters[name]["daemon_cpu"] = round(cpu / seconds[name], 3)
                        counters[name]["main_thread_cpu"] = round(
                            (cpu_after[1] - cpu_before[1]) / seconds[name], 3)
                        if requests:
                            counters[name]["cpu_us_per_request"] = round(cpu / requests * 1e6, 1)
            if name in results:
                log(f"  {target.kind:<8} {name:<16} {results[name]:>12.1f} "
                    f"{UNITS[name]:<9} ({seconds[name]:.1f} s)")
        final_stats = target.stats() if target.kind == "razorfs" else None
    log_problems = getattr(target, "log_problems", [])
    for line in log_problems[:5]:
        log(f"razorfs daemon log: {line[:300]}")
    return {"results": results, "counters": counters, "errors": errors, "seconds": seconds,
            "final_stats": final_stats, "loadavg": loadavg, "daemon_log_problems": log_problems}


# ---------------------------------------------------------------- reporting

def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(runs: dict[str, list[dict]], repeat: int) -> dict:
    medians: dict[str, dict[str, float]] = {}
    ranges: dict[str, dict[str, list[float]]] = {}
    for kind, suite_runs in runs.items():
        ranges[kind] = {p: [min(values), max(values)] for p in UNITS
                        if (values := [run["results"][p] for run in suite_runs
                                       if p in run["results"]])}
        probes = [p for p in UNITS if any(p in run["results"] for run in suite_runs)]
        medians[kind] = {p: median_or_none([run["results"][p] for run in suite_runs
                                            if p in run["results"]]) for p in probes}
        scaling = [run["results"]["rand_fsync_8"] / run["results"]["rand_fsync_1"]
                   for run in suite_runs
                   if run["results"].get("rand_fsync_1") and "rand_fsync_8" in run["results"]]
        if scaling:
            medians[kind]["group_commit_8v1"] = statistics.median(scaling)
    ratios = {}
    for probe, value in medians.get("razorfs", {}).items():
        plain = medians.get("plain", {}).get(probe)
        if value is not None and plain:
            ratios[probe] = value / plain
    targets = []
    for probe, compared, threshold in TARGETS:
        value = ratios.get(probe) if compared == "ratio" else medians.get("razorfs", {}).get(probe)
        targets.append({"probe": probe, "compared": compared, "threshold": threshold,
                        "value": value, "met": None if value is None else value >= threshold})
    counters = {}
    for probe in UNITS:
        deltas = [run["counters"][probe] for run in runs.get("razorfs", [])
                  if probe in run["counters"]]
        if not deltas:
            continue
        row = {key: statistics.median(d[key] for d in deltas)
               for key in ("commits", "records", "fsyncs")}
        for key in ("requests", "daemon_cpu", "main_thread_cpu", "cpu_us_per_request"):
            values = [d[key] for d in deltas if key in d]
            if values:
                row[key] = statistics.median(values)
        per_run = [(d["records"] / d["commits"], d["fsyncs"] / d["records"],
                    d["fsyncs"] / d["commits"]) for d in deltas if d["commits"] and d["records"]]
        if per_run:
            row["records_per_commit"] = statistics.median(r[0] for r in per_run)
            row["fsyncs_per_transaction"] = statistics.median(r[1] for r in per_run)
            row["fsyncs_per_commit"] = statistics.median(r[2] for r in per_run)
        counters[probe] = row
    return {"medians": medians, "ranges": ranges, "ratios": ratios, "targets": targets,
            "counters": counters}


def format_table(summary: dict) -> str:
    medians, ratios = summary["medians"], summary["ratios"]
    targets = {t["probe"]: t for t in summary["targets"]}
    lines = [f"{'probe':<18}{'unit':<10}{'razorfs':>11}{'plain':>11}{'ratio':>8}  "
             f"{'target':<16}{'met':<4}"]
    for probe in UNITS:
        razor = medians.get("razorfs", {}).get(probe)
        plain = medians.get("plain", {}).get(probe)
        if razor is None and plain is None:
            continue
        ratio = ratios.get(probe)
        target = targets.get(probe)
        if target is None:
            target_text, met = "", ""
        elif target["compared"] == "ratio":
            target_text = f"ratio >= {target['threshold']:.2f}"
            met = {None: "?", True: "yes", False: "NO"}[target["met"]]
        else:
            target_text = f"razorfs >= {target['threshold']:.1f}x"
            met = {None: "?", True: "yes", False: "NO"}[target["met"]]
        cell = lambda v: f"{v:>11.2f}" if v is not None and v < 100 else (
            f"{v:>11.0f}" if v is not None else f"{'-':>11}")
        lines.append(f"{probe:<18}{UNITS[probe]:<10}{cell(razor)}{cell(plain)}"
                     f"{(f'{ratio:.3f}' if ratio is not None else '-'):>8}  "
                     f"{target_text:<16}{met:<4}")
    return "\n".join(lines)


def format_counters(summary: dict) -> str:
    counters = summary["counters"]
    if not counters:
        return ""
    lines = ["razorfs WAL counters per probe (deltas of `razorfs stats --json`, medians):",
             f"{'probe':<18}{'commits':>9}{'records':>9}{'fsyncs':>9}{'rec/commit':>12}"
             f"{'fsync/txn':>11}{'fsync/commit':>14}{'requests':>10}{'daemon CPU':>12}"
             f"{'main thread':>12}{'us CPU/req':>12}"]
    for probe, row in counters.items():
        def number(key, digits):
            value = row.get(key)
            return f"{value:.{digits}f}" if value is not None and row["commits"] else "-"
        def plain(key, digits):
            value = row.get(key)
            return f"{value:.{digits}f}" if value is not None else "-"
        lines.append(f"{probe:<18}{row['commits']:>9.0f}{row['records']:>9.0f}"
                     f"{row['fsyncs']:>9.0f}{number('records_per_commit', 2):>12}"
                     f"{number('fsyncs_per_transaction', 3):>11}"
                     f"{number('fsyncs_per_commit', 2):>14}{plain('requests', 0):>10}"
                     f"{plain('daemon_cpu', 2):>12}{plain('main_thread_cpu', 2):>12}"
                     f"{plain('cpu_us_per_request', 0):>12}")
    lines.append("(fsync/txn: disk fsyncs per committed transaction (WAL record); requests: FUSE "
                 "requests served; daemon CPU: CPU seconds of the daemon per second of the probe, "
                 "1.00 = one core; main thread: the same for the trio thread alone, which serves every "
                 "request; us CPU/req: daemon CPU microseconds per FUSE request)")
    eight = counters.get("rand_fsync_8")
    if eight and "records_per_commit" in eight:
        lines.append(f"group commit, 8 writers: {eight['records_per_commit']:.2f} records per "
                     f"commit, {eight['fsyncs_per_transaction']:.3f} disk fsyncs per committed "
                     f"transaction ({eight['fsyncs_per_commit']:.2f} per commit: block store + "
                     f"log segment)")
    return "\n".join(lines)


def profile_category(frames: list[str]) -> str:
    """A coarse bucket for one py-spy stack, by its innermost frame."""
    leaf = frames[-1]
    buckets = [
        ("trio loop in epoll.poll: its per-pass syscall, waiting, or retaking the GIL",
         ("get_events",)),
        ("idle: worker thread waiting for a job", ("WorkerThread._work",)),
        ("fsync (block store / WAL segment)", ("RealFile.fsync",)),
        ("pwrite", ("RealFile.pwrite",)),
        ("pread", ("RealFile.pread",)),
        ("pyfuse3 (Cython: /dev/fuse read, dispatch, reply)", ("_pyfuse3.py",)),
        ("actor messages: msgpack, dataclass construction",
         ("msgpack", "actors/messages.py", "__create_fn__")),
        ("structlog contextvars (per-request binding)", ("structlog", "contextvars")),
        ("CRC-32C", ("crc",)),
        ("trio scheduling, channels, task switches", ("trio/", "outcome", "attrs generated")),
    ]
    for name, needles in buckets:
        if any(needle in leaf for needle in needles):
            return name
    if "razorfs/" in leaf:
        return "razorfs: " + re.sub(r":\d+\)", ")", leaf)
    return "other: " + re.sub(r":\d+\)", ")", leaf)


def summarise_profile(paths: list[str], top: int = 12) -> dict:
    """py-spy raw files (folded stacks, first frame the thread): samples per thread, per coarse
    category (main trio thread and worker threads apart) and top innermost frames."""
    threads: collections.Counter = collections.Counter()
    categories: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    own: collections.Counter = collections.Counter()
    total = 0
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path) as raw:
            for line in raw:
                stack, _, count_text = line.rstrip("\n").rpartition(" ")
                if not count_text.isdigit():
                    continue
                count = int(count_text)
                frames = stack.split(";")
                thread = frames[0].split(":", 1)[-1].strip()
                group = "main" if thread == "MainThread" else "workers"
                threads[thread] += count
                total += count
                categories[group][profile_category(frames)] += count
                if group == "main":
                    own[frames[-1]] += count
    return {"samples": total, "threads": threads.most_common(),
            "categories": {group: counter.most_common(top)
                           for group, counter in categories.items()},
            "main_thread_self": own.most_common(top)}


def razorfs_version() -> dict:
    """The commit measured, and razorfs files changed from it (read-only git queries)."""
    repo = os.path.dirname(BENCH_DIR)

    def git(*arguments: str) -> str:
        result = subprocess.run(["git", "--no-optional-locks", "-C", repo, *arguments],
                                capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    return {"commit": git("rev-parse", "--short", "HEAD") or "?",
            "changed_files": git("status", "--porcelain", "--", "razorfs").splitlines()}


def machine_info(workdir: str) -> dict:
    df = subprocess.run(["df", "-T", workdir], capture_output=True, text=True).stdout
    fields = df.splitlines()[-1].split() if df else []
    info = {"nproc": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "workdir": workdir, "df_T": fields[:2],
            "loadavg_at_start": os.getloadavg()}
    if fields and fields[0].startswith("/dev/"):
        lsblk = subprocess.run(["lsblk", "-dno", "ROTA,MODEL", fields[0]], capture_output=True,
                               text=True).stdout.split(None, 1)
        if lsblk:
            info["rotational"] = lsblk[0] == "1"
            info["model"] = lsblk[1].strip() if len(lsblk) > 1 else ""
    return info


# ---------------------------------------------------------------- main

SELECTORS = {
    "python": ["creates", "stat", "seq_write", "seq_read", "rand_fsync"],
    "fio": ["fio_seq_write", "fio_seq_read", "fio_randwrite"],
    "group_commit": ["rand_fsync"],
}


def expand(selection: str | None, writers: tuple[int, ...]) -> set[str]:
    all_probes = {p for p in UNITS if p != "group_commit_8v1" and not p.startswith("rand_fsync")}
    all_probes |= {f"rand_fsync_{w}" for w in writers}
    if not selection:
        return all_probes
    chosen: set[str] = set()
    pending = [s.strip() for s in selection.split(",") if s.strip()]
    while pending:
        item = pending.pop()
        if item in SELECTORS:
            pending.extend(SELECTORS[item])
            continue
        matched = {p for p in all_probes if p == item or p.startswith(item + "_")}
        if item.startswith("rand_fsync_") and item not in all_probes:
            matched = {item} if item[len("rand_fsync_"):].isdigit() else set()
        if not matched:
            raise SystemExit(f"bench: unknown probe {item!r} for --only; probes: "
                             f"{', '.join(sorted(all_probes))}; groups: {', '.join(SELECTORS)}")
        chosen |= matched
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=None,
                        help="repetitions (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run, < 1 min)")
    parser.add_argument("--only", default=None, metavar="PROBE[,PROBE]",
                        help="run only these probes or groups (python, fio, group_commit)")
    parser.add_argument("--workdir", default=None,
                        help="directory on the disk to measure (default: a new one in /var/tmp)")
    parser.add_argument("--json", default=DEFAULT_JSON,
                        help="write the results as JSON here ('' for none)")
    parser.add_argument("--no-install", dest="install", action="store_false",
                        help="do not apt-get install missing tools: skip their probes")
    parser.add_argument("--profile", default="", metavar="PROBE[,PROBE]",
                        help="py-spy the razorfs daemon during these probes")
    parser.add_argument("--profile-dir", default=DEFAULT_PROFILE_DIR)
    args = parser.parse_args()
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    quick = args.quick
    args.files = 300 if quick else 10_000
    args.size = 8 * MiB if quick else 64 * MiB
    args.seconds = 0.5 if quick else 3.0
    args.writers = (1, 8) if quick else (1, 2, 4, 8, 16)
    args.fio_size = 16 * MiB if quick else 256 * MiB
    args.fio_rand_size = 4 * MiB if quick else 64 * MiB
    args.fio_runtime = 1 if quick else 10
    args.fs_mark_files = 200 if quick else 5000
    args.fs_mark_files_sync = 100 if quick else 2000
    args.dbench_seconds = 2 if quick else 10
    args.selected = expand(args.only, args.writers)
    args.profile = set(expand(args.profile, args.writers)) if args.profile else set()
    if os.geteuid() != 0:
        log("warning: not root: drop_caches will fail and read probes will error")

    tools = Tools(args.install)
    for binary in sorted({tool_for(p) for p in args.selected} - {None}):
        tools.require(binary)  # install up front, so that no probe's time includes it
    steps = plan(args, tools)
    workdir = args.workdir or tempfile.mkdtemp(prefix="razorfs-bench-", dir="/var/tmp")
    os.makedirs(workdir, exist_ok=True)
    profiler = Profiler(args.profile_dir) if args.profile else None
    machine = machine_info(workdir)
    version = razorfs_version()
    log(f"{len(steps)} probes x {args.repeat} repetitions on {workdir} "
        f"({' '.join(machine['df_T'])}, {machine['nproc']} CPUs, kernel {machine['kernel']})")
    started = time.time()
    runs: dict[str, list[dict]] = {"razorfs": [], "plain": []}
    for repetition in range(args.repeat):
        order = [RazorMount(workdir), PlainDir(workdir)]
        if repetition % 2:
            order.reverse()
        for target in order:
            log(f"repetition {repetition + 1}/{args.repeat}: {target.kind}")
            runs[target.kind].append(run_suite(target, steps, args, tools, repetition,
                                               profiler))
    summary = summarise(runs, args.repeat)
    elapsed = time.time() - started

    changed = (f" + {len(version['changed_files'])} changed file(s)"
               if version["changed_files"] else "")
    print(f"razorfs {version['commit']}{changed} vs plain directory on "
          f"{' '.join(machine['df_T'])} ({workdir}), {machine['nproc']} CPUs, kernel "
          f"{machine['kernel']}; medians of {args.repeat} repetition(s)"
          f"{', --quick' if quick else ''}; {elapsed:.0f} s")
    print(format_table(summary))
    counters = format_counters(summary)
    if counters:
        print()
        print(counters)
    for binary, reason in tools.missing.items():
        print(f"skipped ({binary}): {reason}")
    errors = {f"{kind}/{probe}": message for kind, suite_runs in runs.items()
              for run in suite_runs for probe, message in run["errors"].items()}
    for where, message in errors.items():
        print(f"error {where}: {message}")
    problems = sum(len(run.get("daemon_log_problems", [])) for run in runs["razorfs"])
    if problems:
        print(f"the razorfs daemon logged {problems} warning/error line(s): see "
              f"runs.razorfs[].daemon_log_problems in the JSON")
    profiles = {}
    if profiler is not None:
        for probe, paths in profiler.files.items():
            profiles[probe] = summarise_profile(paths)
            profile = profiles[probe]
            print(f"\npy-spy of the daemon during {probe} ({profile['samples']} active samples; "
                  f"busy shares are the 'main thread' column above; files {', '.join(paths)}):")
            print("  samples by thread: " + ", ".join(f"{name} {count}"
                                                      for name, count in profile["threads"][:6]))
            for group in ("main", "workers"):
                rows = profile["categories"].get(group, [])
                samples = sum(count for _, count in rows) or 1
                print(f"  {'main trio thread' if group == 'main' else 'worker threads'}, "
                      f"by category:")
                for category, count in rows[:8]:
                    print(f"    {count:>6} {100 * count / samples:5.1f}%  {category}")
            print("  main thread, top innermost frames:")
            for frame, count in profile["main_thread_self"][:8]:
                print(f"    {count:>6}  {frame}")

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as out:
            json.dump({"command": sys.argv, "repeat": args.repeat, "quick": quick,
                       "razorfs": version, "machine": machine, "elapsed_seconds": round(elapsed, 1),
                       "units": UNITS, **summary,
                       "tool_versions": tools.versions(), "skipped": tools.missing, "errors": errors, "profiles": profiles,
                       "runs": runs}, out, indent=1)
        print(f"\nresults: {args.json}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
