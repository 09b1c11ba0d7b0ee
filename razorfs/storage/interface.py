"""The one storage interface: every byte razorfs reads or writes in a data directory goes through it.

Two implementations exist: ``files.FileStorage`` (the real disk, used by the daemon) and
``simdisk.SimDisk`` (tests only: an in-memory disk that can "lose power" and keep only what was made
durable). Paths are relative to the data directory and use ``/`` as separator.

All methods are blocking; callers on the trio loop run the slow ones (fsync, big pread/pwrite)
through ``trio.to_thread``. Implementations must be safe to call from several threads at once.
Errors are raised as ``OSError`` with a real errno (EIO, ENOSPC, ENOENT...), as the OS would.

What razorfs assumes of the disk under a real implementation, and no more (``SimDisk`` crashes
at least this meanly; tests/crash/test_ext4_power_cut.py cuts the power of a real ext4):

* ``fsync`` of a file makes its bytes and size durable once it returns; ``fsync_dir`` of a
  directory makes its entries durable (creates, renames, unlinks in it). Nothing else is
  durable by itself, not even the name of a file just fsync'd.
* Anything not yet made durable may be lost at a power cut, wholly or in part, in any order:
  unsynced writes each land whole, not at all, or as any subset of their 512-byte sectors;
  a file may grow without its data (zeros); directory changes land as any subset in which
  each name takes its values in order. A sector holds all of its old or all of its new bytes,
  and bytes that no unsynced write covers keep their value.
* A rename within one directory is atomic across a power cut: the target names the old or
  the new file, never neither.
* A failed fsync leaves unknown what reached the disk, and a retried fsync proves nothing
  (Linux may drop the dirty pages it failed to write): razorfs never retries one, it stops
  writing (failsafe).
* Durable bytes do not change by themselves; if they do, checksums find it (G5), but nothing
  repairs it.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass


class IOCounters:
    """How many fsyncs and bytes went to the disk; read by stats and by group-commit tests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.fsyncs = 0
        self.bytes_written = 0
        self.bytes_read = 0

    def add(self, *, fsyncs: int = 0, written: int = 0, read: int = 0) -> None:
        with self._lock:
            self.fsyncs += fsyncs
            self.bytes_written += written
            self.bytes_read += read


@dataclass(frozen=True)
class SpaceInfo:
    """Free space of the disk under the data directory, in bytes."""

    total: int
    available: int


class StorageFile(abc.ABC):
    """An open file of the data directory."""

    @abc.abstractmethod
    def pread(self, offset: int, length: int) -> bytes:
        """Read up to ``length`` bytes; short only at end of file."""

    def pread_if_cached(self, offset: int, length: int) -> bytes | bytearray | None:
        """All ``length`` bytes if they can be had without waiting for the device (from the
        page cache), else None. Lets the event loop skip a worker thread for cached reads;
        an implementation that cannot tell returns None."""
        return None

    @abc.abstractmethod
    def pwrite(self, offset: int, data: bytes) -> None:
        """Write all of ``data`` at ``offset`` (raises on a short write)."""

    @abc.abstractmethod
    def fsync(self) -> None:
        """Make the content and size durable (fdatasync semantics are enough)."""

    @abc.abstractmethod
    def truncate(self, size: int) -> None:
        ...

    @abc.abstractmethod
    def size(self) -> int:
        ...

    @abc.abstractmethod
    def close(self) -> None:
        ...

    def __enter__(self) -> StorageFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Storage(abc.ABC):
    """A data directory."""

    counters: IOCounters

    @abc.abstractmethod
    def open(self, path: str, *, create: bool = False) -> StorageFile:
        """Open an existing file (``create=True``: create it empty if missing)."""

    @abc.abstractmethod
    def exists(self, path: str) -> bool:
        ...

    @abc.abstractmethod
    def listdir(self, path: str) -> list[str]:
        """Names in a directory, sorted."""

    @abc.abstractmethod
    def mkdir(self, path: str) -> None:
        """Create a directory (parent must exist); no error if it exists."""

    @abc.abstractmethod
    def rename(self, src: str, dst: str) -> None:
        """Atomically replace ``dst`` by ``src`` (durable only after ``fsync_dir``)."""

    @abc.abstractmethod
    def unlink(self, path: str) -> None:
        ...

    @abc.abstractmethod
    def fsync_dir(self, path: str) -> None:
        """Make the entries of a directory (creates, renames, unlinks in it) durable."""

    @abc.abstractmethod
    def space(self) -> SpaceInfo:
        ...

    def write_file_atomically(self, path: str, data: bytes | list[bytes]) -> None:
        """Replace ``path`` by ``data`` (bytes, or a list of parts written one after the other)
        so that a crash leaves either the old or the new file."""
        directory = path.rpartition("/")[0]
        temp = path + ".tmp"
        with self.open(temp, create=True) as f:
            f.truncate(0)
            offset = 0
            for part in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
                f.pwrite(offset, part)
                offset += len(part)
            f.fsync()
        self.rename(temp, path)
        self.fsync_dir(directory)

    def read_file(self, path: str) -> bytes:
        with self.open(path) as f:
            return f.pread(0, f.size())
