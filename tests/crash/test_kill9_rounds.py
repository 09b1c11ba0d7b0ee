"""Process crashes on a real mount, round after round on the same data directory.

Each round: concurrent writer threads replace files (write a temp file, rename it over the name,
fsync the directory) and append to logs (pwrite, fsync), with deterministic contents, recording
what each returned fsync acknowledged; the daemon is SIGKILLed at a seeded random moment; fsck
must find the crashed directory clean; after the remount every acknowledged file holds exactly
its acknowledged version or a later one of the same writer (never older, never a mix), every log
is a prefix of its stream at least as long as acknowledged. The next round goes on from there.

CI runs ROUNDS rounds within about BUDGET seconds; RAZORFS_LONG=1 runs 100. RAZORFS_SEED=N
replays the kill moments and workload choices of a failure (thread timing still varies).
"""

from __future__ import annotations

import errno
import functools
import os
import random
import threading
import time
from pathlib import Path

import pytest

from tests.crash.powercut_writer import write_all
from tests.fuse.conftest import FUSE_USABLE, Mount

LONG = bool(os.environ.get("RAZORFS_LONG"))
ROUNDS = 100 if LONG else 10
BUDGET = None if LONG else 60.0  # seconds; CI stops early once spent (after MIN_ROUNDS)
MIN_ROUNDS = 4
SEED = int(os.environ.get("RAZORFS_SEED") or random.randrange(1 << 32))
WRITERS = 3
NAMES = [f"file{i}" for i in range(4)]
SIZES = [0, 1, 100, 4095, 4096, 9000, 70_000, 150_000]
LOG_CAP = 256 << 10
GONE = {errno.ENOTCONN, errno.ECONNABORTED}  # what a dead daemon's mount answers

pytestmark = [
    pytest.mark.skipif(not FUSE_USABLE and not os.environ.get("CI"),
                       reason="real FUSE tests need root, /dev/fuse and fusermount3"),
    pytest.mark.timeout(1800 if LONG else 300),
]


def version_bytes(writer: int, name: str, version: int) -> bytes:
    rng = random.Random(f"{writer}/{name}/{version}")
    return f"w{writer} {name} v{version}\n".encode() + rng.randbytes(rng.choice(SIZES))


@functools.cache
def log_stream(writer: int, index: int) -> bytes:
    return random.Random(f"log {writer}/{index}").randbytes(LOG_CAP)


class Writer:
    """One writer thread's workload in directory w<index>, and what fsync acknowledged."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.name = f"w{index}"
        self.version = 0  # last version number handed out (each is used once)
        self.acked: dict[str, int] = {}  # file → version made durable by a returned fsync
        self.attempted: dict[str, int] = {}  # file → newest version written
        self.logs: dict[int, list[int]] = {0: [0, 0]}  # log → [acked length, attempted length]
        self.error: BaseException | None = None
        self.operations = 0

    def run(self, root: Path, rng: random.Random) -> None:
        try:
            dirfd = os.open(root / self.name, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            self.error = None if exc.errno in GONE else exc
            return
        try:
            while True:
                if rng.random() < 0.3:
                    self.append(dirfd, rng)
                else:
                    self.replace(dirfd, rng)
                self.operations += 1
        except OSError as exc:
            if exc.errno not in GONE:
                self.error = exc
        except BaseException as exc:
            self.error = exc
        finally:
            try:
                os.close(dirfd)
            except OSError:
                pass

    def replace(self, dirfd: int, rng: random.Random) -> None:
        name = rng.choice(NAMES)
        self.version += 1
        self.attempted[name] = version = self.version
        fd = os.open(f".{name}.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dirfd)
        try:
            write_all(fd, version_bytes(self.index, name, version), 0)
            if rng.random() < 0.5:
                os.fsync(fd)  # optional: razorfs' G1 covers the data at the directory fsync
        finally:
            os.close(fd)
        os.rename(f".{name}.tmp", name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        os.fsync(dirfd)
        self.acked[name] = version

    def append(self, dirfd: int, rng: random.Random) -> None:
        index = max(self.logs)
        lengths = self.logs[index]
        if lengths[1] >= LOG_CAP:
            index += 1
            lengths = self.logs[index] = [0, 0]
        start = lengths[1]
        end = min(LOG_CAP, start + rng.choice([1, 100, 4096, 5000, 20_000]))
        fd = os.open(f"log{index}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dirfd)
        try:
            lengths[1] = end
            write_all(fd, log_stream(self.index, index)[start:end], start)
            os.fsync(fd)
            lengths[0] = end
        finally:
            os.close(fd)

    def verify(self, root: Path) -> None:
        """Check what survived against the acknowledgements; then it is the new baseline (the
        recovery that just ran checkpointed it)."""
        directory = root / self.name
        expected = set(NAMES) | {f"log{i}" for i in self.logs}
        present = {p.name for p in directory.iterdir()}
        assert present - expected <= {f".{n}.tmp" for n in NAMES}, f"{directory}: {present}"
        for name in NAMES:
            path = directory / name
            if not path.exists():
                assert name not in self.acked, f"{path}: version {self.acked[name]} " \
                                               "was acknowledged, the file is gone"
                continue
            data = path.read_bytes()
            header = data.split(b"\n", 1)[0].decode(errors="replace")
            assert header.startswith(f"w{self.index} {name} v"), f"{path}: header {header!r}"
            version = int(header.rsplit("v", 1)[1])
            assert self.acked.get(name, 0) <= version <= self.attempted[name], (
                f"{path}: version {version}, acknowledged {self.acked.get(name)}, newest "
                f"written {self.attempted[name]}")
            assert data == version_bytes(self.index, name, version), \
                f"{path}: version {version} has wrong bytes ({len(data)} bytes)"
            self.acked[name] = self.attempted[name] = version
        for index, lengths in self.logs.items():
            path = directory / f"log{index}"
            data = path.read_bytes() if path.exists() else b""
            assert lengths[0] <= len(data) <= lengths[1], (
                f"{path}: {len(data)} bytes, acknowledged {lengths[0]}, written {lengths[1]}")
            assert data == log_stream(self.index, index)[: len(data)], \
                f"{path}: not a prefix of its stream"
            lengths[:] = [len(data), len(data)]


def crash_round(mount: Mount, writers: list[Writer], rng: random.Random, label: str) -> int:
    """Run the writers, SIGKILL the daemon at a random moment, detach, fsck, remount, verify;
    return the number of operations the writers completed."""
    threads = [threading.Thread(target=w.run, name=w.name,
                                args=(mount.path, random.Random(f"{label}/{w.name}")))
               for w in writers]
    before = sum(w.operations for w in writers)
    for thread in threads:
        thread.start()
    time.sleep(rng.uniform(0.05, 0.8))
    try:
        mount.kill9()
    finally:
        for thread in threads:
            thread.join(30)
    assert not any(t.is_alive() for t in threads), "a writer hangs on the dead mount"
    for writer in writers:
        assert writer.error is None, f"{writer.name}: {writer.error!r}"
    check = mount.fsck()
    assert check.returncode == 0, f"fsck of the crashed directory: {check.stdout}{check.stderr}"
    mount.mount()
    for writer in writers:
        writer.verify(mount.path)
    return sum(w.operations for w in writers) - before


def test_kill9_rounds(tmp_path):
    mount = Mount(tmp_path, "--commit-interval", "0.2").mkfs().mount()
    writers = [Writer(i) for i in range(WRITERS)]
    for writer in writers:
        (mount.path / writer.name).mkdir()
    root = os.open(mount.path, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(root)
    os.close(root)
    master = random.Random(SEED)
    started = time.monotonic()
    operations = []
    try:
        for round_number in range(ROUNDS):
            if (BUDGET is not None and round_number >= MIN_ROUNDS
                    and time.monotonic() - started > BUDGET):
                break
            where = f"RAZORFS_SEED={SEED} round {round_number}"
            try:
                operations.append(crash_round(mount, writers, master, where))
            except Exception as exc:
                raise AssertionError(f"{where}: {type(exc).__name__}: {exc}") from exc
        mount.unmount()
    finally:
        mount.cleanup()
    mount.check_after()  # no G6 error events in the log; fsck clean after the last unmount
    print(f"kill -9 rounds: seed {SEED}, {len(operations)} rounds, operations per round "
          f"{operations}, {time.monotonic() - started:.1f} s")
    assert sum(operations) > 0, "the writers never completed an operation before the kill"


def test_wal_stays_bounded_across_crashes(tmp_path):
    """Each mount starts a WAL segment; recovery must trim like any checkpoint, or a crash loop
    fills the disk and every mount reads more."""
    mount = Mount(tmp_path).mkfs().mount()
    segments = []
    try:
        for cycle in range(3):
            fd = os.open(mount.path / f"f{cycle}", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"x" * 5000)
            os.fsync(fd)
            os.close(fd)
            mount.kill9()
            mount.mount()
            segments.append(len(list((mount.data / "wal").glob("*.wal"))))
        mount.unmount()
        segments.append(len(list((mount.data / "wal").glob("*.wal"))))
    finally:
        mount.cleanup()
    mount.check_after()
    # Kept back to the previous checkpoint (docs/DESIGN.md): a few segments, whatever the history.
    assert max(segments) <= 3, f"WAL segments after each crash, then after unmount: {segments}"
