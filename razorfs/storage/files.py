"""The real storage: plain files in a directory of the local disk."""

from __future__ import annotations

import os

from razorfs.storage.interface import IOCounters, SpaceInfo, Storage, StorageFile


class RealFile(StorageFile):
    def __init__(self, fd: int, counters: IOCounters) -> None:
        self._fd = fd
        self._counters = counters

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        self._counters.add(read=len(data))
        return data

    def pread_if_cached(self, offset: int, length: int) -> bytearray | None:
        buffer = bytearray(length)
        try:
            # RWF_NOWAIT: EAGAIN instead of waiting for the disk (Linux >= 4.14, buffered reads
            # >= 5.9); a partly cached range comes back short.
            got = os.preadv(self._fd, [buffer], offset, os.RWF_NOWAIT)
        except OSError:  # EAGAIN; any other error, the ordinary pread meets and reports
            return None
        if got != length:
            return None
        self._counters.add(read=got)
        return buffer  # not copied into bytes: the copy is a visible share of a cached read

    def pwrite(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written
        self._counters.add(written=len(data))

    def fsync(self) -> None:
        os.fdatasync(self._fd)
        self._counters.add(fsyncs=1)

    def truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FileStorage(Storage):
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.counters = IOCounters()

    def _path(self, path: str) -> str:
        return os.path.join(self.root, path) if path else self.root

    def open(self, path: str, *, create: bool = False) -> StorageFile:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        return RealFile(os.open(self._path(path), flags, 0o600), self.counters)

    def exists(self, path: str) -> bool:
        return os.path.exists(self._path(path))

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(self._path(path)))

    def mkdir(self, path: str) -> None:
        os.makedirs(self._path(path), mode=0o700, exist_ok=True)

    def rename(self, src: str, dst: str) -> None:
        os.rename(self._path(src), self._path(dst))

    def unlink(self, path: str) -> None:
        os.unlink(self._path(path))

    def fsync_dir(self, path: str) -> None:
        fd = os.open(self._path(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.counters.add(fsyncs=1)

    def space(self) -> SpaceInfo:
        st = os.statvfs(self.root)
        return SpaceInfo(total=st.f_blocks * st.f_frsize, available=st.f_bavail * st.f_frsize)
