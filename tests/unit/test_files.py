"""The real storage's page-cache-only read (RWF_NOWAIT), which lets reads skip a worker thread."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from razorfs.storage.files import FileStorage


@pytest.fixture
def disk_dir():
    """A directory on a real disk: /tmp may be a tmpfs, whose pages cannot be dropped."""
    path = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="razorfs-files-"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_pread_if_cached_serves_cached_bytes_and_declines_the_rest(disk_dir):
    tmp_path = disk_dir
    storage = FileStorage(str(tmp_path))
    data = os.urandom(64 << 10)
    with storage.open("f", create=True) as file:
        file.pwrite(0, data)
        file.fsync()
        assert file.pread_if_cached(4096, 8192) == data[4096:12288]
        assert file.pread_if_cached(60 << 10, 8192) is None  # runs past the end: short

        # Clean pages dropped from the page cache: a read would wait for the disk.
        fd = os.open(tmp_path / "f", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        assert file.pread_if_cached(0, 8192) is None
        assert file.pread(0, 8192) == data[:8192]
        assert file.pread_if_cached(0, 8192) == data[:8192]  # cached again by that read
