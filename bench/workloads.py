"""The workloads of bench/run.py. Each takes a Meter (bound to one target), the directory to
work in and the run's Sizes, and measures one or more named steps with ``meter.step``.

A step's value is its wall time in seconds, unless the step sets ``count`` (then the value is
count per second) or ``value`` itself (fio's own figure). Where the target has a daemon, the
meter also records its CPU time over the step and, for razorfs and the floor, the requests it
served per kind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import mmap
import os
import re
import shutil
import subprocess
import time

from common import MiB, cpu_between, cpu_sample, drop_caches, log, run_tool, settle

REQUEST_KINDS = ("create", "unlink", "mkdir", "rename", "setattr", "write", "fsync", "read")


@dataclasses.dataclass
class Sizes:
    tarball: str | None  # the tree workloads' source (None: skip them)
    requests: int  # requests of each kind in the per-request loops
    request_seconds: float  # at most this long for the loops on one open file
    appends: int
    fio_size: int  # bytes of the sequential fio file
    fio_rand_size: int  # bytes of each random-write job's file
    fio_runtime: int  # seconds
    fs_mark_files: int
    fs_mark_files_sync: int
    dbench_seconds: int


class Meter:
    def __init__(self, target, profiler=None) -> None:
        self.target = target
        self.profiler = profiler
        self.steps: dict[str, dict] = {}

    @contextlib.contextmanager
    def step(self, name: str):
        pid = self.target.pid
        record: dict = {"load": round(os.getloadavg()[0], 2)}
        before = self.target.requests()
        profiling = self.profiler is not None and self.profiler.wants(name, self.target)
        if profiling:
            self.profiler.start(pid, name, self.target.kind)
        cpu_before = cpu_sample(pid) if pid else None
        started = time.perf_counter()
        try:
            yield record
        finally:
            record["seconds"] = time.perf_counter() - started
            if cpu_before is not None:
                record["cpu"], record["main_cpu"] = cpu_between(cpu_before, cpu_sample(pid), pid)
            if profiling:
                self.profiler.stop()
        after = self.target.requests()
        if before is not None and after is not None:
            record["requests"] = {key: after[key] - before.get(key, 0) for key in after
                                  if after[key] != before.get(key, 0)}
        if "value" not in record:
            record["value"] = (record["count"] / record["seconds"] if "count" in record
                               else record["seconds"])
        self.steps[name] = record
        log(f"  {self.target.kind:<8}{name:<18}{record['value']:>12.2f}  "
            f"({record['seconds']:.1f} s, load {record['load']})")


# ---------------------------------------------------------------- everyday trees

def tree(meter: Meter, root: str, sizes: Sizes, tools) -> None:
    """Extract a source tarball, copy the tree, grep it with a cold cache, stat every entry,
    remove it."""
    source, copy = os.path.join(root, "tree"), os.path.join(root, "tree-copy")
    os.mkdir(source)
    with open(sizes.tarball, "rb") as tarball:  # in the page cache: time the target's writes
        while tarball.read(MiB):
            pass
    with meter.step("tree_extract"):
        run_tool(["tar", "-xf", sizes.tarball, "-C", source], timeout=900)
    with meter.step("tree_cp"):
        run_tool(["cp", "-a", source, copy], timeout=900)
    drop_caches()
    settle(meter.target.pid)
    with meter.step("tree_grep_cold"):
        grep = subprocess.run(["grep", "-r", "-c", "-F", "include", source],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=900)
    if grep.returncode not in (0, 1):  # 1: no line matched, which is no error here
        raise RuntimeError(f"grep -r failed: {grep.stderr.decode()[-300:]}")
    with meter.step("tree_find_stat"):
        subprocess.run(["find", source, "-exec", "stat", "--format=%s", "{}", "+"],
                       stdout=subprocess.DEVNULL, check=True, timeout=900)
    with meter.step("tree_rm"):
        run_tool(["rm", "-rf", source], timeout=900)
    shutil.rmtree(copy)


def make_small_tarball(path: str, files: int = 200) -> str:
    """A reproducible tarball of small text files in nested directories (--quick: no network):
    same names, bytes and metadata on every machine."""
    import io
    import random
    import tarfile

    rng = random.Random(14)
    words = [b"include", b"static", b"return", b"buffer", b"struct", b"int", b"void"]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for directory in sorted({f"src/d{i % 20:02d}" for i in range(files)}):
            info = tarfile.TarInfo(directory)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            archive.addfile(info)
        for i in range(files):
            lines = (b" ".join(rng.choices(words, k=8)) for _ in range(rng.randint(5, 200)))
            data = b"\n".join(lines) + b"\n"
            info = tarfile.TarInfo(f"src/d{i % 20:02d}/f{i:05d}.c")
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            archive.addfile(info, io.BytesIO(data))
    return path


# ---------------------------------------------------------------- per request kind

def requests(meter: Meter, root: str, sizes: Sizes, tools) -> None:
    """A loop of one request kind at a time (a step named req_KIND each; count = loops)."""
    n = sizes.requests
    base = os.path.join(root, "requests")
    os.mkdir(base)
    names = [os.path.join(base, f"f{i:06d}") for i in range(n)]
    others = [os.path.join(base, f"g{i:06d}") for i in range(n)]

    def loop(kind: str, body, cold: bool = False, seconds: float | None = None) -> None:
        """``n`` times ``body``, or as many as fit in ``seconds``."""
        if cold:  # forget every name: each op looks its name up, on every target alike
            drop_caches(2)
            settle(meter.target.pid)
        deadline = time.perf_counter() + (seconds or float("inf"))
        with meter.step(f"req_{kind}") as step:
            for i in range(n):
                body(i)
                if time.perf_counter() > deadline:
                    break
            step["count"] = i + 1

    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    loop("create", lambda i: os.close(os.open(names[i], flags, 0o644)))
    loop("unlink", lambda i: os.unlink(names[i]), cold=True)
    loop("mkdir", lambda i: os.mkdir(names[i]))
    loop("rename", lambda i: os.rename(names[i], others[i]), cold=True)
    block = os.urandom(4096)
    fd = os.open(os.path.join(base, "data"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        # these loops touch one open file: a time limit keeps a slow target's run short
        limit = sizes.request_seconds
        loop("setattr", lambda i: os.utime(fd, ns=(i, i)), seconds=limit)  # futimens: no lookup
        loop("write", lambda i: os.pwrite(fd, block, i % 256 * 4096), seconds=limit)
        loop("fsync", lambda i: (os.pwrite(fd, block, i % 256 * 4096), os.fsync(fd)),
             seconds=limit)
    finally:
        os.close(fd)
    direct = os.open(os.path.join(base, "data"), os.O_RDONLY | os.O_DIRECT)
    buffer = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
    try:  # O_DIRECT: every read reaches the filesystem, none is served from the page cache
        loop("read", lambda i: os.preadv(direct, [buffer], i % 256 * 4096), seconds=limit)
    finally:
        os.close(direct)
    for path in others:
        os.rmdir(path)
    shutil.rmtree(base)


# ---------------------------------------------------------------- small appends

def append(meter: Meter, root: str, sizes: Sizes, tools) -> None:
    """Many tiny O_APPEND writes to one file, as a logger makes (issue 18, item 7)."""
    fd = os.open(os.path.join(root, "append.log"), os.O_CREAT | os.O_WRONLY | os.O_APPEND,
                 0o644)
    line = b"0123456789abcde\n"
    try:
        with meter.step("append") as step:
            for _ in range(sizes.appends):
                os.write(fd, line)
            step["count"] = sizes.appends
    finally:
        os.close(fd)
    os.unlink(os.path.join(root, "append.log"))


# ---------------------------------------------------------------- fio, fs_mark, dbench

def _fio(tools, root: str, job: list[str], timeout: float) -> dict:
    command = [tools.binary("fio"), "--output-format=json", f"--directory={root}",
               "--ioengine=psync", "--fallocate=none", "--group_reporting", *job]
    output = run_tool(command, timeout)
    return json.loads(output[output.index("{"):])["jobs"][0]  # notes may precede the JSON


def fio(meter: Meter, root: str, sizes: Sizes, tools) -> None:
    """Sequential 1 MiB write with an fsync at the end, its cold read; 4 KiB random writes with
    an fsync after each, 1 and 4 jobs (fio's figures: MiB/s and IOPS)."""
    runtime = sizes.fio_runtime
    common = ["--filename=fio-seq.bin", "--bs=1M", f"--size={sizes.fio_size}",
              f"--runtime={runtime}"]
    with meter.step("fio_seq_write") as step:
        job = _fio(tools, root, ["--name=seqwrite", "--rw=write", "--end_fsync=1", *common],
                   timeout=runtime * 10 + 120)
        step["value"] = job["write"]["bw"] / 1024  # KiB/s; fio counts the end fsync in
    drop_caches()
    settle(meter.target.pid)
    with meter.step("fio_seq_read") as step:
        job = _fio(tools, root, ["--name=seqread", "--rw=read", *common],
                   timeout=runtime * 10 + 120)
        step["value"] = job["read"]["bw"] / 1024
    os.unlink(os.path.join(root, "fio-seq.bin"))
    for jobs in (1, 4):
        with meter.step(f"fio_randwrite_{jobs}") as step:
            job = _fio(tools, root, [f"--name=randwrite{jobs}", "--rw=randwrite", "--bs=4k",
                                     "--fsync=1", f"--size={sizes.fio_rand_size}",
                                     f"--numjobs={jobs}", "--time_based",
                                     f"--runtime={runtime}"], timeout=runtime * 10 + 300)
            step["value"] = job["write"]["iops"]
        for name in os.listdir(root):
            if name.startswith("randwrite"):
                os.unlink(os.path.join(root, name))


def fs_mark(meter: Meter, root: str, sizes: Sizes, tools) -> None:
    """fs_mark, 4 KiB files, one thread: -S 0 (no sync), then -S 1 (fsync before close)."""
    binary = tools.binary("fs_mark")
    for sync, files in ((0, sizes.fs_mark_files), (1, sizes.fs_mark_files_sync)):
        directory = f"fs_mark_S{sync}"
        os.mkdir(os.path.join(root, directory))
        with meter.step(f"fs_mark_{'fsync' if sync else 'nosync'}") as step:
            # a relative -d: fs_mark refuses paths of 40 bytes or more
            output = run_tool([binary, "-d", directory, "-s", "4096", "-n", str(files),
                               "-t", "1", "-S", str(sync), "-L", "1"], timeout=600, cwd=root)
            rows = [line.split() for line in output.splitlines()
                    if re.match(r"^\s*\d+\s+\d+\s+\d+\s+[\d.]+\s+\d+\s*$", line)]
            if not rows:
                raise RuntimeError(f"fs_mark printed no result line: {output[-300:]!r}")
            step["value"] = float(rows[-1][3])  # FSUse% Count Size Files/sec Overhead
        shutil.rmtree(os.path.join(root, directory))


def dbench(meter: Meter, root: str, sizes: Sizes, tools) -> None:
    """dbench, 4 clients, the load file the Debian package ships (MB/s)."""
    binary = tools.binary("dbench")
    listing = subprocess.run(["dpkg", "-L", "dbench"], capture_output=True, text=True).stdout
    loadfiles = [line for line in listing.splitlines() if line.endswith("/client.txt")]
    if not loadfiles:
        raise RuntimeError("dbench's load file client.txt was not found (dpkg -L dbench)")
    directory = os.path.join(root, "dbench")
    os.mkdir(directory)
    with meter.step("dbench") as step:
        output = run_tool([binary, "-D", directory, "-t", str(sizes.dbench_seconds),
                           "-c", loadfiles[0], "4"], timeout=sizes.dbench_seconds * 6 + 180)
        match = re.search(r"Throughput\s+([\d.]+)\s+MB/sec", output)
        if not match:
            raise RuntimeError(f"dbench printed no Throughput line: {output[-300:]!r}")
        step["value"] = float(match.group(1))
    shutil.rmtree(directory)
