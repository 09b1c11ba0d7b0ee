"""One writer process of the ext4 power-cut test (tests/crash/test_ext4_power_cut.py).

    python powercut_writer.py DIRECTORY JOURNAL WRITER ROUND SEED DURABILITY

Works in DIRECTORY (on a razorfs mount) until the filesystem fails under it, and tells the test
what it did through JOURNAL, a file on the host that no power cut touches, one JSON line per
step: ``["try", k, path, spec]`` before step k may change ``path`` (relative to DIRECTORY) into
what ``spec`` describes, ``["ack", k]`` once every step up to k is acknowledged durable: an
fsync or fdatasync returned (razorfs makes everything completed before it durable, G1), or,
with DURABILITY ``sync``, the call itself returned (G2). The steps: replace a file through a
temporary file and a rename, append to a log, create a file, make a directory with a file in
it, remove a file. Everything written is a function of its name (``content``, ``stream``),
so the test can rebuild it. Only the errors a shut-down disk or a killed daemon gives end the
run quietly; any other error is a failure (exit status 1).

Specs: ``["absent"]``; ``["dir"]``; ``["file", cid]`` (exactly ``content(cid)``, or while the
step is not acknowledged any prefix of it: a write may be cut between two FUSE requests);
``["log", name, length]`` (the log is ``stream(writer, name)`` up to between its acknowledged
length and the longest length tried).
"""

from __future__ import annotations

import errno
import json
import os
import random
import sys

SIZES = (0, 1, 100, 4095, 4096, 9000, 70_000, 150_000)
REPLACED = ("f0", "f1", "f2")
LOGS = ("log0", "log1")
LOG_CAP = 1 << 20
# What a write to a filesystem whose disk was shut down, or whose daemon was killed, may get.
THE_END = {errno.EIO, errno.EROFS, errno.ENOTCONN, errno.ECONNABORTED}


def content(cid: str) -> bytes:
    """The bytes of a file version: a header naming it, then seeded random bytes."""
    rng = random.Random(cid)
    return f"{cid}\n".encode() + rng.randbytes(rng.choice(SIZES))


def stream(writer: int, name: str) -> bytes:
    return random.Random(f"log {writer}/{name}").randbytes(LOG_CAP)


def write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class Writer:
    def __init__(self, directory: str, journal: str, writer: int, round_number: int,
                 seed: int, sync: bool) -> None:
        self.dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        self.journal = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.writer, self.round, self.sync = writer, round_number, sync
        self.rng = random.Random(seed)
        self.step = 0
        self.made = 0  # files and directories made this round: unique names
        self.log_sizes: dict[str, int] = {}

    def note(self, *record) -> None:
        os.write(self.journal, (json.dumps(record) + "\n").encode())

    def tried(self, path: str, *spec) -> None:
        self.step += 1
        self.note("try", self.step, path, list(spec))

    def durable(self, fd: int | None = None) -> None:
        """Acknowledge every step so far: fsync (or fdatasync) ``fd`` or the directory; in
        sync mode a returned call is acknowledged already, and fsync is only sometimes done."""
        if not self.sync or self.rng.random() < 0.2:
            sync = os.fdatasync if fd is not None and self.rng.random() < 0.5 else os.fsync
            sync(self.dirfd if fd is None else fd)
        self.acknowledge()

    def acknowledge(self) -> None:
        self.note("ack", self.step)

    def returned(self) -> None:
        """A call returned: in sync mode that is an acknowledgement (G2)."""
        if self.sync:
            self.acknowledge()

    def run(self) -> int:
        steps = [self.replace] * 4 + [self.append] * 3 + [self.create] * 2 + [self.mkdir] \
            + [self.remove]
        try:
            while True:
                self.rng.choice(steps)()
        except OSError as exc:
            if exc.errno not in THE_END:
                raise
            self.note("end", errno.errorcode.get(exc.errno, exc.errno))
            return 0

    def open(self, path: str, flags: int) -> int:
        return os.open(path, flags | os.O_CLOEXEC, 0o644, dir_fd=self.dirfd)

    def replace(self) -> None:
        name = self.rng.choice(REPLACED)
        temp = f".{name}.tmp"
        self.made += 1
        cid = f"w{self.writer} {name} r{self.round}.{self.made}"
        self.tried(temp, "file", cid)
        fd = self.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            write_all(fd, content(cid), 0)
            self.returned()
            if self.rng.random() < 0.5:
                self.durable(fd)
        finally:
            os.close(fd)
        self.tried(name, "file", cid)
        self.tried(temp, "absent")
        os.rename(temp, name, src_dir_fd=self.dirfd, dst_dir_fd=self.dirfd)
        self.returned()
        self.durable()

    def append(self) -> None:
        name = self.rng.choice(LOGS)
        if name not in self.log_sizes:
            try:
                self.log_sizes[name] = os.stat(name, dir_fd=self.dirfd).st_size
            except FileNotFoundError:
                self.log_sizes[name] = 0
        start = self.log_sizes[name]
        end = min(LOG_CAP, start + self.rng.choice((1, 100, 4096, 5000, 20_000)))
        self.tried(name, "log", name, end)  # before the open: it may create the log
        fd = self.open(name, os.O_WRONLY | os.O_CREAT)
        try:
            write_all(fd, stream(self.writer, name)[start:end], start)
            self.log_sizes[name] = end
            self.returned()
            self.durable(fd)
        finally:
            os.close(fd)

    def create(self, directory: str = "") -> None:
        self.made += 1
        path = f"{directory}n{self.round}.{self.made}"
        cid = f"w{self.writer} {path}"
        self.tried(path, "file", cid)
        fd = self.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            write_all(fd, content(cid), 0)
            self.returned()
            self.durable(fd)  # G1: the name is durable with the data, no directory fsync
        finally:
            os.close(fd)

    def mkdir(self) -> None:
        self.made += 1
        path = f"d{self.round}.{self.made}"
        self.tried(path, "dir")
        os.mkdir(path, dir_fd=self.dirfd)
        self.returned()
        self.create(f"{path}/")

    def remove(self) -> None:
        names = sorted(n for n in os.listdir(self.dirfd) if n.startswith("n"))
        if not names:
            return
        name = self.rng.choice(names)
        self.tried(name, "absent")
        os.unlink(name, dir_fd=self.dirfd)
        self.returned()
        self.durable()


def main(argv: list[str]) -> int:
    directory, journal, writer, round_number, seed, durability = argv
    return Writer(directory, journal, int(writer), int(round_number), int(seed),
                  durability == "sync").run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
