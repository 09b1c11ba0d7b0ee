"""Access times follow relatime by default (as Linux mounts do), never move with --noatime."""

from __future__ import annotations

import os
import time


def read_all(path) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def test_relatime_updates_atime_once_after_a_change(mount):
    path = mount.path / "file"
    path.write_bytes(b"data")
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))  # atime older than mtime
    read_all(path)
    first = os.stat(path).st_atime_ns
    assert first > 2_000_000_000
    time.sleep(0.05)
    read_all(path)
    assert os.stat(path).st_atime_ns == first  # newer than mtime and ctime: left alone
    mount.remount()
    assert os.stat(path).st_atime_ns == first


def test_noatime_never_updates_atime(make_mount):
    mount = make_mount("--noatime")
    path = mount.path / "file"
    path.write_bytes(b"data")
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))
    read_all(path)
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
