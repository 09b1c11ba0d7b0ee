"""Many processes and threads hammering one mount; then a SIGKILL in the middle of it.

Each worker thread (PROCESSES x THREADS of them) owns a private directory whose files it
rewrites with content derived from (worker, file, version) -- in place (O_TRUNC, chunked writes,
fsync) or atomically (temporary file, fsync, rename, fsync of the directory) -- and re-reads to
check them; it records the last version whose fsync returned. All workers also create, rename,
link, unlink, mkdir, rmdir, symlink and list under ``shared/`` (where errors like ENOENT or
EEXIST are expected, others are not), link their private files into it, append fixed-size
records to one common log, and write, truncate and read one common "hot" file all at once.
The checks: no unexpected error, file contents, link counts against the names found in the
tree, no duplicated names, whole and ordered log records, and the fixture's fsck.

    RAZORFS_LONG=1   longer runs, plus Debian's stress-ng filesystem stressors
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import random
import shutil
import stat
import subprocess
import threading
import time
from collections import Counter

import pytest

LONG = bool(os.environ.get("RAZORFS_LONG"))
PROCESSES, THREADS = 4, 3
DURATION = 120 if LONG else 20
KILL_AFTER = 30 if LONG else 6     # seconds of load before kill -9 in the crash test
FILES = 6                          # private files per worker
SHARED = ("s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7")
RECORD = 64                        # bytes per append to the common log
EXPECTED_SHARED_ERRORS = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR,
                          errno.ENOTDIR, errno.EINVAL, errno.EPERM, errno.ELOOP}
DISCONNECTED = {errno.ENOTCONN, errno.ECONNABORTED}
HOT_BYTES = {0, *range(1, 1 + PROCESSES * THREADS)}  # zeros, and worker w's byte 1 + w


def content(worker: int, index: int, version: int) -> bytes:
    rng = random.Random(f"{worker}/{index}/{version}")
    return rng.randbytes(rng.choice((0, 1, 100, 4095, 4096, 4097, rng.randint(1, 64 << 10))))


def record(worker: int, seq: int) -> bytes:
    return f"{worker:03d} {seq:09d} ".encode().ljust(RECORD - 1, b".") + b"\n"


class Worker:
    """One thread's workload; paths are relative to the mount (the process's cwd)."""

    def __init__(self, wid: int, deadline: float, killed) -> None:
        self.wid = wid
        self.deadline = deadline
        self.killed = killed
        self.rng = random.Random(wid)
        self.dir = f"private/w{wid}"
        self.version = [0] * FILES           # last version whose fsync returned (0: none)
        self.in_flight: list[tuple | None] = [None] * FILES   # (version, "inplace"|"atomic")
        self.appended = 0
        self.ops = 0
        self.failures: list[str] = []
        self.disconnected = False

    def path(self, index: int) -> str:
        return f"{self.dir}/f{index}"

    def run(self) -> None:
        actions = ([self.rewrite] * 4 + [self.verify] * 3 + [self.shared] * 6 + [self.append]
                   + [self.hot] * 3)
        action = self.make_dir
        while time.monotonic() < self.deadline and not self.disconnected:
            try:
                action()
                self.ops += 1
            except OSError as exc:
                if self.killed.is_set():
                    # the daemon was killed: whatever this op got, the run is over
                    self.disconnected = True
                elif exc.errno in DISCONNECTED:
                    self.failures.append(f"w{self.wid}: mount gone before the kill: {exc!r}")
                    self.disconnected = True
                else:
                    self.failures.append(f"w{self.wid} {action.__name__}: {exc!r}")
            except Exception as exc:  # a wrong result (AssertionError) or a bug in the test
                self.failures.append(f"w{self.wid} {action.__name__}: {exc!r}")
            action = self.rng.choice(actions)

    def make_dir(self) -> None:
        os.mkdir(self.dir)

    def rewrite(self) -> None:
        index = self.rng.randrange(FILES)
        version = self.version[index] + 1
        data = content(self.wid, index, version)
        how = self.rng.choice(("inplace", "atomic"))
        self.in_flight[index] = (version, how)
        target = self.path(index) if how == "inplace" else self.path(index) + ".tmp"
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            offset = 0
            while offset < len(data):  # chunks of random sizes, so partial blocks everywhere
                offset += os.write(fd, data[offset : offset + self.rng.randint(1, 20_000)])
            os.fsync(fd)
        finally:
            os.close(fd)
        if how == "atomic":
            os.rename(target, self.path(index))
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.version[index] = version
        self.in_flight[index] = None

    def verify(self) -> None:
        index = self.rng.randrange(FILES)
        if self.version[index] == 0:
            assert not os.path.lexists(self.path(index)), f"{self.path(index)} exists"
            return
        with open(self.path(index), "rb") as stream:
            got = stream.read()
        assert got == content(self.wid, index, self.version[index]), \
            f"{self.path(index)}: {len(got)} bytes, not version {self.version[index]}"

    def shared_name(self) -> str:
        first = self.rng.choice(SHARED)
        return f"shared/{first}" if self.rng.random() < 0.7 else \
            f"shared/{first}/{self.rng.choice(SHARED)}"

    def shared(self) -> None:
        rng = self.rng
        kind = rng.choice(("create", "rename", "rename", "link", "link_private", "unlink",
                           "mkdir", "rmdir", "symlink", "listdir", "stat"))
        name, other = self.shared_name(), self.shared_name()
        try:
            if kind == "create":
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.write(fd, rng.randbytes(rng.randint(0, 9000)))
                finally:
                    os.close(fd)
            elif kind == "rename":
                os.rename(name, other)
            elif kind == "link":
                os.link(name, other, follow_symlinks=False)
            elif kind == "link_private":
                os.link(self.path(rng.randrange(FILES)), name)
            elif kind == "unlink":
                os.unlink(name)
            elif kind == "mkdir":
                os.mkdir(name)
            elif kind == "rmdir":
                os.rmdir(name)
            elif kind == "symlink":
                os.symlink(rng.choice(SHARED), name)
            elif kind == "listdir":
                names = os.listdir(os.path.dirname(name))
                assert len(names) == len(set(names)), f"duplicated names: {sorted(names)}"
            else:
                os.lstat(name)
        except OSError as exc:
            if exc.errno not in EXPECTED_SHARED_ERRORS:
                raise

    def append(self) -> None:
        fd = os.open("appendlog", os.O_WRONLY | os.O_APPEND)
        try:
            assert os.write(fd, record(self.wid, self.appended)) == RECORD
        finally:
            os.close(fd)
        self.appended += 1

    def hot(self) -> None:
        """Unaligned writes, truncates and reads of one file by everyone at once: a read may
        race a copy-on-write replacement of its blocks, never with EIO or bytes that no one
        wrote there (each worker writes its own byte value; holes and extensions are zeros)."""
        rng = self.rng
        fd = os.open("hotfile", os.O_RDWR)
        try:
            roll = rng.random()
            if roll < 0.45:
                os.pwrite(fd, bytes([1 + self.wid]) * rng.randint(1, 3 * 4096),
                          rng.randint(0, 16 * 4096))
            elif roll < 0.6:
                os.ftruncate(fd, rng.randint(0, 16 * 4096))
            else:
                offset, size = rng.randint(0, 16 * 4096), rng.randint(1, 8 * 4096)
                data = os.pread(fd, size, offset)
                strays = set(data) - HOT_BYTES
                assert not strays, f"pread at {offset}: bytes {sorted(strays)[:5]} nobody wrote"
        finally:
            os.close(fd)

    def result(self) -> dict:
        return {"wid": self.wid, "version": self.version, "in_flight": self.in_flight,
                "appended": self.appended, "ops": self.ops, "failures": self.failures}


def worker_process(mount_path: str, proc: int, deadline: float, killed, results) -> None:
    os.chdir(mount_path)  # after a lazy unmount the cwd stays on the dead mount: no strays
    workers = [Worker(proc * THREADS + t, deadline, killed) for t in range(THREADS)]
    threads = [threading.Thread(target=w.run) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for worker in workers:
        results.put(worker.result())


def hammer(mount, duration: float, kill_after: float | None = None) -> list[dict]:
    """Run the workload for ``duration`` s (kill -9 the daemon after ``kill_after`` s if
    given); return every worker's result."""
    os.mkdir(mount.path / "private")
    os.mkdir(mount.path / "shared")
    (mount.path / "appendlog").write_bytes(b"")
    (mount.path / "hotfile").write_bytes(b"")
    context = multiprocessing.get_context("fork")
    killed, results = context.Event(), context.Queue()
    deadline = time.monotonic() + duration
    processes = [context.Process(target=worker_process,
                                 args=(str(mount.path), p, deadline, killed, results))
                 for p in range(PROCESSES)]
    for process in processes:
        process.start()
    try:
        if kill_after is not None:
            time.sleep(kill_after)
            killed.set()
            mount.kill9()
        collected = [results.get(timeout=duration + 120) for _ in range(PROCESSES * THREADS)]
    finally:
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    failures = [f for r in collected for f in r["failures"]]
    assert not failures, "\n".join(failures[:30])
    print(f"{sum(r['ops'] for r in collected)} operations by {len(collected)} workers")
    return collected


def check_tree(root) -> None:
    """No duplicated names; every inode's st_nlink equals the names (and, for a directory,
    the subdirectories) found by walking the tree (lstat: symlinks are not directories)."""
    names: Counter = Counter()
    nlink: dict[int, int] = {}
    problems = []
    stack = [os.fspath(root)]
    while stack:
        directory = stack.pop()
        listing = os.listdir(directory)
        if len(listing) != len(set(listing)):
            problems.append(f"{directory}: duplicated names {sorted(listing)}")
        subdirs = 0
        for name in listing:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                subdirs += 1
                stack.append(path)
            else:
                names[st.st_ino] += 1
                nlink[st.st_ino] = st.st_nlink
        st = os.lstat(directory)
        if st.st_nlink != 2 + subdirs:
            problems.append(f"{directory}: st_nlink {st.st_nlink}, {subdirs} subdirectories")
    problems += [f"inode {ino}: st_nlink {nlink[ino]}, {count} names"
                 for ino, count in names.items() if nlink[ino] != count]
    assert not problems, "\n".join(problems[:30])


def read_or_none(path) -> bytes | None:
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except FileNotFoundError:
        return None


def check_private_files(root, results: list[dict], *, crashed: bool) -> None:
    """Every private file holds its last fsync'd version. After a crash, a file rewritten at
    the time may instead hold the new version (atomic rename) or a prefix of it (in place)."""
    problems = []
    for r in results:
        for index in range(FILES):
            path = root / "private" / f"w{r['wid']}" / f"f{index}"
            got = read_or_none(path)
            version = r["version"][index]
            expected = content(r["wid"], index, version) if version else None
            if got == expected:
                continue
            in_flight = r["in_flight"][index]
            if crashed and in_flight is not None:
                new = content(r["wid"], index, in_flight[0])
                if got == new or (in_flight[1] == "inplace" and got is not None
                                  and new.startswith(got)):
                    continue
            problems.append(f"{path}: {None if got is None else len(got)} bytes, expected "
                            f"version {version} ({None if expected is None else len(expected)}"
                            f" bytes), in flight {in_flight}")
    assert not problems, "\n".join(problems)


def check_append_log(root, results: list[dict], *, crashed: bool) -> None:
    """Whole records; each worker's in its own order. Complete without a crash; after one, a
    prefix per worker (recovery equals some prefix of the completed operations, G3)."""
    data = (root / "appendlog").read_bytes()
    assert len(data) % RECORD == 0, f"append log of {len(data)} bytes"
    seen: dict[int, list[int]] = {}
    for offset in range(0, len(data), RECORD):
        chunk = data[offset : offset + RECORD]
        wid, seq = (int(field) for field in chunk.split()[:2])
        assert chunk == record(wid, seq), f"torn record at {offset}: {chunk!r}"
        seen.setdefault(wid, []).append(seq)
    for r in results:
        seqs = seen.get(r["wid"], [])
        assert seqs == list(range(len(seqs))), f"worker {r['wid']}: records {seqs[:50]}"
        if not crashed:
            assert len(seqs) == r["appended"], f"worker {r['wid']} lost records"


@pytest.mark.timeout(DURATION + 240)
def test_concurrent_workers(mount):
    results = hammer(mount, DURATION)
    for _ in ("live", "after remount"):
        check_private_files(mount.path, results, crashed=False)
        check_append_log(mount.path, results, crashed=False)
        check_tree(mount.path)
        mount.remount()


@pytest.mark.timeout(KILL_AFTER + 300)
def test_kill9_under_load(mount):
    results = hammer(mount, KILL_AFTER + 60, kill_after=KILL_AFTER)
    fsck = mount.fsck()  # before recovery: the crashed data directory as left
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    mount.mount()
    check_private_files(mount.path, results, crashed=True)
    check_append_log(mount.path, results, crashed=True)
    check_tree(mount.path)
    synced = sum(v > 0 for r in results for v in r["version"])
    in_flight = sum(f is not None for r in results for f in r["in_flight"])
    print(f"{synced} private files fsync'd before the kill, {in_flight} being rewritten at it")
    assert synced > 0, "nothing was ever fsync'd"


STRESSORS = ("dentry", "dir", "filename", "link", "rename", "symlink", "xattr", "seek", "hdd")


@pytest.mark.skipif(not LONG, reason="stress-ng runs only with RAZORFS_LONG=1")
@pytest.mark.timeout(900)
def test_stress_ng(mount, tmp_path):
    if shutil.which("stress-ng") is None:
        install = subprocess.run(["apt-get", "install", "-y", "stress-ng"], capture_output=True,
                                 text=True, timeout=600)
        if install.returncode != 0 or shutil.which("stress-ng") is None:
            pytest.skip(f"stress-ng missing and apt-get failed: {install.stderr[-500:]}")
    workdir = mount.path / "stress-ng"
    workdir.mkdir()
    command = ["stress-ng", "--temp-path", str(workdir), "--timeout", "20s", "--verify",
               "--metrics-brief", "--hdd-bytes", "16m", "--seek-size", "16m"]
    for name in STRESSORS:
        command += [f"--{name}", "2"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, f"stress-ng exit {run.returncode}:\n{run.stdout}{run.stderr}"
    assert stat.S_ISDIR(os.stat(mount.path).st_mode)  # still alive
    check_tree(mount.path)
