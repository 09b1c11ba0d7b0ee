"""Access times follow relatime by default (as Linux mounts do), never move with --noatime."""

from __future__ import annotations

import json
import os
import time

from tests.fuse.conftest import razorfs


def read_requests(mount) -> int:
    stats = razorfs("stats", mount.path, "--json")
    assert stats.returncode == 0, stats.stderr
    return json.loads(stats.stdout)["requests"]["ops"].get("read", {}).get("count", 0)


def read_through_the_daemon(mount, path) -> bytes:
    """Read ``path`` with its cached pages dropped first, and check that the read reached the
    daemon: a page-cache hit never does, and would leave atime alone whatever the rule."""
    before = read_requests(mount)
    with open(path, "rb") as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        data = file.read()
    assert read_requests(mount) > before, "the read was served from the page cache"
    return data


def test_relatime_updates_atime_once_after_a_change(mount):
    path = mount.path / "file"
    path.write_bytes(b"data")
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))  # atime older than mtime
    assert read_through_the_daemon(mount, path) == b"data"
    first = os.stat(path).st_atime_ns
    assert first > 2_000_000_000
    time.sleep(0.05)
    read_through_the_daemon(mount, path)
    assert os.stat(path).st_atime_ns == first  # newer than mtime and ctime: left alone
    mount.remount()
    assert os.stat(path).st_atime_ns == first
    time.sleep(0.05)
    with open(path, "r+b") as file:
        file.write(b"D")  # mtime and ctime move past atime
    read_through_the_daemon(mount, path)
    assert os.stat(path).st_atime_ns > first


def test_noatime_never_updates_atime(make_mount):
    mount = make_mount("--noatime")
    path = mount.path / "file"
    path.write_bytes(b"data")
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))
    read_through_the_daemon(mount, path)
    assert os.stat(path).st_atime_ns == 1_000_000_000


def test_listing_a_directory_leaves_its_atime(mount):
    """README's known difference: directory access times never move on a listing (nodiratime
    always holds, diratime has no effect)."""
    directory = mount.path / "dir"
    directory.mkdir()
    (directory / "entry").write_text("x")
    os.utime(directory, ns=(1_000_000_000, 2_000_000_000))
    assert os.listdir(directory) == ["entry"]
    mount.remount()  # past the kernel's attribute cache
    assert os.listdir(directory) == ["entry"]
    assert os.stat(directory).st_atime_ns == 1_000_000_000
