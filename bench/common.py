"""What the bench scripts share: the filesystems under test, daemon CPU from /proc, caches,
medians, the machine and the commit measured.

Targets are context managers that give a directory to work in: Plain (a directory of the local
disk), Razorfs (mkfs + mount), Anchor (libfuse's C passthrough_hp over a directory of the same
disk) and Floor (bench/floorfs.py). Those with a daemon give its pid for CPU accounting and, for
razorfs and the floor, the requests it served per kind.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time

from razorfs.control import ControlError, query
from tools import ANCHOR_FLAGS, log

MiB = 1 << 20
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RAZORFS = [sys.executable, "-m", "razorfs"]
TICK = os.sysconf("SC_CLK_TCK")
WAIT_EXIT = 120  # seconds a daemon may take to end after its unmount (its writeback included)


def drop_caches(level: int = 3) -> None:
    """3: page cache, dentries and inodes; 2: dentries and inodes only (every name is looked
    up again by the next access)."""
    if level & 1:
        os.sync()  # only clean pages can be dropped
    with open("/proc/sys/vm/drop_caches", "w") as control:
        control.write(f"{level}\n")


def run_tool(command: list[str], timeout: float, cwd: str = "/") -> str:
    """Run an external program; its stdout, or RuntimeError with the tail of its output."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
        raise RuntimeError(f"{command[0]} exited with status {result.returncode}: "
                           + " | ".join(tail))
    return result.stdout


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# ---------------------------------------------------------------- daemon CPU from /proc

def _stat_fields(path: str) -> list[str]:
    with open(path) as stat_file:
        return stat_file.read().rsplit(")", 1)[1].split()


def cpu_sample(pid: int) -> tuple[float, float, dict[int, int]]:
    """(process utime+stime in seconds, main thread's, {thread id: nanoseconds on CPU}).
    The tick counts include exited threads but are 10 ms coarse; schedstat is exact."""
    process = _stat_fields(f"/proc/{pid}/stat")
    main = _stat_fields(f"/proc/{pid}/task/{pid}/stat")
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as schedstat:
                threads[int(tid)] = int(schedstat.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread exited meanwhile
    return ((int(process[11]) + int(process[12])) / TICK,
            (int(main[11]) + int(main[12])) / TICK, threads)


def cpu_between(before, after, pid: int) -> tuple[float, float]:
    """CPU seconds of the process and of its main thread between two samples: exact while no
    thread of the first sample has exited, else from the coarse tick counts."""
    old, new = before[2], after[2]
    if set(old) <= set(new):
        total = sum(new[tid] - old.get(tid, 0) for tid in new) / 1e9
    else:
        total = after[0] - before[0]
    main = ((new[pid] - old[pid]) / 1e9 if pid in old and pid in new
            else after[1] - before[1])
    return total, main


def settle(pid: int | None, quiet: float = 0.005, interval: float = 0.1,
           limit: float = 60.0) -> float:
    """Wait until the daemon is idle (under ``quiet`` CPU seconds per ``interval``): after a
    drop of the dentry cache the kernel sends FORGETs that it works through for a while
    (seconds with a million inodes). The time waited."""
    started = time.monotonic()
    if pid is None:
        return 0.0
    before = cpu_sample(pid)
    while time.monotonic() - started < limit:
        time.sleep(interval)
        after = cpu_sample(pid)
        if cpu_between(before, after, pid)[0] < quiet:
            break
        before = after
    return time.monotonic() - started


# ---------------------------------------------------------------- targets

def _wait_mounted(path: str, process: subprocess.Popen | None, timeout: float = 30) -> None:
    parent = os.stat(os.path.dirname(path)).st_dev
    deadline = time.monotonic() + timeout
    while os.stat(path).st_dev == parent:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} "
                               f"before mounting {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} not mounted after {timeout} s")
        time.sleep(0.01)


def _unmount(path: str, process: subprocess.Popen) -> list[str]:
    """Unmount a daemon's mount and wait for the daemon to end; what went wrong, if anything
    (a stuck daemon is stopped, so that the run goes on)."""
    problems = []
    for attempt in range(40):
        result = subprocess.run(["fusermount3", "-u", path], capture_output=True, text=True)
        if result.returncode == 0:
            break
        time.sleep(0.25)  # a just-finished tool may still hold a file open
    else:
        problems.append(f"fusermount3 -u {path} kept failing ({result.stderr.strip()}); "
                        f"detached it lazily")
        subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)
    for stop in (None, signal.SIGTERM, signal.SIGKILL):
        if stop is not None:
            problems.append(f"{process.args[0]} still running {WAIT_EXIT} s after the "
                            f"unmount: sent {stop.name}")
            process.send_signal(stop)
        try:
            process.wait(timeout=WAIT_EXIT)
            break
        except subprocess.TimeoutExpired:
            continue
    for problem in problems:
        log(problem)
    return problems


class Plain:
    """A directory of the local disk: what the kernel's own filesystem does (ext4 here)."""
    kind = "plain"
    pid: int | None = None

    def __init__(self, workdir: str) -> None:
        self.path = os.path.join(workdir, "plain")

    def __enter__(self) -> str:
        os.makedirs(self.path)
        return self.path

    def __exit__(self, *exc_info) -> None:
        shutil.rmtree(self.path)

    def requests(self) -> dict[str, int] | None:
        return None


class Anchor(Plain):
    """libfuse's C passthrough_hp over a directory of the same disk: the FUSE limit."""
    kind = "C"

    def __init__(self, workdir: str, binary: str) -> None:
        self.binary = binary
        self.backing = os.path.join(workdir, "anchor-backing")
        self.path = os.path.join(workdir, "anchor-mnt")
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> str:
        os.makedirs(self.backing)
        os.makedirs(self.path)
        # absolute paths: it chdirs to / before mounting
        with open(os.path.join(os.path.dirname(self.path), "anchor.log"), "ab") as output:
            self.process = subprocess.Popen(
                [self.binary, *ANCHOR_FLAGS, self.backing, self.path], stdout=output,
                stderr=subprocess.STDOUT)
        self.pid = self.process.pid
        _wait_mounted(self.path, self.process)
        return self.path

    def __exit__(self, *exc_info) -> None:
        self.log_problems = _unmount(self.path, self.process)
        os.rmdir(self.path)
        shutil.rmtree(self.backing)


class Floor(Plain):
    """bench/floorfs.py: what pyfuse3 + trio cost with nothing behind them."""
    kind = "floor"

    def __init__(self, workdir: str) -> None:
        self.path = os.path.join(workdir, "floor-mnt")
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> str:
        os.makedirs(self.path)
        self.process = subprocess.Popen([sys.executable,
                                         os.path.join(BENCH_DIR, "floorfs.py"), self.path])
        self.pid = self.process.pid
        _wait_mounted(self.path, self.process)
        return self.path

    def __exit__(self, *exc_info) -> None:
        self.log_problems = _unmount(self.path, self.process)
        os.rmdir(self.path)

    def requests(self) -> dict[str, int]:
        return json.loads(os.getxattr(self.path, "user.floor.counts"))


class Razorfs(Plain):
    """A fresh razorfs: mkfs, then `razorfs mount` of a data directory on the local disk."""
    kind = "razorfs"

    def __init__(self, workdir: str) -> None:
        self.data = os.path.join(workdir, "razorfs-data")
        self.path = os.path.join(workdir, "razorfs-mnt")
        self.log_problems: list[str] = []

    def __enter__(self) -> str:
        os.makedirs(self.path, exist_ok=True)
        subprocess.run(RAZORFS + ["mkfs", self.data], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(RAZORFS + ["mount", self.data, self.path], check=True,
                       stdout=subprocess.DEVNULL)
        self.pid = self.daemon_pid()
        return self.path

    def __exit__(self, *exc_info) -> None:
        for _ in range(20):
            result = subprocess.run(RAZORFS + ["umount", self.path], capture_output=True,
                                    text=True)
            if result.returncode == 0:
                break
            time.sleep(0.5)  # a just-finished tool may still hold a file open
        else:
            raise RuntimeError(f"razorfs umount {self.path} failed: {result.stderr.strip()}")
        self.log_problems = self._log_problems()
        shutil.rmtree(self.data)

    def daemon_pid(self) -> int | None:
        try:
            with open(os.path.join(self.data, "lock")) as lock:
                text = lock.read().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def daemon_cpu_seconds(self) -> tuple[float, float] | None:
        """utime + stime of the daemon, (all its threads, its main trio thread)."""
        try:
            total, main, _ = cpu_sample(self.daemon_pid())
        except (OSError, TypeError):
            return None
        return total, main

    def stats(self) -> dict | None:
        """What `razorfs stats --json` prints, asked over the control socket directly (a
        process per ask would take ~0.5 s)."""
        try:
            return query(self.data)
        except ControlError as exc:
            log(f"razorfs stats failed: {exc}")
            return None

    def requests(self) -> dict[str, int] | None:
        stats = self.stats()
        if stats is None:
            return None
        counts = {op: row["count"] for op, row in stats["requests"]["ops"].items()}
        counts.update({f"wal.{key}": stats["wal"][key] for key in ("commits", "records",
                                                                    "fsyncs")})
        return counts

    def _log_problems(self) -> list[str]:
        """Warning and error lines of the daemon's log (a benchmark is also a stress test)."""
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


# ---------------------------------------------------------------- the run's context

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
    return {"nproc": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "workdir": workdir, "df_T": fields[:2],
            "loadavg_at_start": os.getloadavg()}
