"""The razorfs command line on bad input, and a filesystem whose disk fills up."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import subprocess

import pytest

from razorfs.storage.formats import Superblock

pytestmark = pytest.mark.timeout(60)


def assert_usage_error(result: subprocess.CompletedProcess, *words: str) -> None:
    """Exit status 2 and a one-line message naming the problem."""
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_mount_missing_data_dir(cli, tmp_path):
    (tmp_path / "mnt").mkdir()
    result = cli("mount", tmp_path / "nothing", tmp_path / "mnt")
    assert_usage_error(result, "does not exist")
    assert not os.path.ismount(tmp_path / "mnt")


def test_mount_foreign_dir(cli, tmp_path):
    (tmp_path / "mnt").mkdir()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "file").write_text("not razorfs")
    assert_usage_error(cli("mount", tmp_path / "foreign", tmp_path / "mnt"), "not a razorfs")
    assert not os.path.ismount(tmp_path / "mnt")


def test_mount_missing_mountpoint(cli, tmp_path):
    assert cli("mkfs", tmp_path / "data").returncode == 0
    assert_usage_error(cli("mount", tmp_path / "data", tmp_path / "nowhere"), "mountpoint")
    assert not (tmp_path / "nowhere").exists()


def test_second_mount_of_same_data_dir(mount, cli, tmp_path):
    (mount.path / "file").write_bytes(b"first mount")
    second = tmp_path / "mnt2"
    second.mkdir()
    result = cli("mount", mount.data, second)
    assert result.returncode == 2, result
    assert "in use" in result.stderr
    assert not os.path.ismount(second)
    assert_usage_error(cli("fsck", mount.data), "in use")  # fsck refuses a mounted fs too
    # the first mount is untouched and still serves requests
    assert (mount.path / "file").read_bytes() == b"first mount"
    (mount.path / "other").write_bytes(b"still writable")
    assert sorted(os.listdir(mount.path)) == ["file", "other"]
    assert (mount.data / "lock").read_text().strip() == str(mount.pid)


def test_mount_on_a_mountpoint_in_use(mount, cli, tmp_path):
    assert cli("mkfs", tmp_path / "other").returncode == 0
    assert_usage_error(cli("mount", tmp_path / "other", mount.path), "already mounted")
    (mount.path / "f").write_bytes(b"alive")
    assert (mount.path / "f").read_bytes() == b"alive"


def test_umount_busy(mount, cli):
    (mount.path / "f").write_bytes(b"open")
    with open(mount.path / "f", "rb"):
        result = cli("umount", mount.path, "--timeout", "10")
        assert result.returncode == 1, result
        assert "busy" in result.stderr
        assert (mount.path / "f").read_bytes() == b"open"  # still mounted and served
    mount.unmount()


def test_stats(make_mount, cli, tmp_path):
    mount = make_mount("--durability", "sync")
    os.mkdir(mount.path / "d")
    (mount.path / "d" / "f").write_bytes(b"s" * 10_000)
    (mount.path / "d" / "f").read_bytes()
    result = cli("stats", mount.path, "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["inodes"] == 3 and stats["durability"] == "sync" and not stats["failsafe"]
    assert stats["requests"]["bytes_written"] == 10_000
    assert stats["requests"]["bytes_read"] == 10_000
    assert stats["requests"]["unexpected_errors"] == 0
    # sync: every change waited for its commit, except the read's relatime update, which no
    # read waits for (a read never costs an fsync)
    assert stats["wal"]["last_lsn"] - 1 <= stats["wal"]["durable_lsn"] <= stats["wal"]["last_lsn"]
    human = cli("stats", mount.path)
    assert human.returncode == 0 and "durability sync" in human.stdout
    assert_usage_error(cli("stats", tmp_path), "no razorfs is mounted")


def test_mkfs_refuses_non_empty_dir(cli, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious").write_text("keep me")
    assert_usage_error(cli("mkfs", tmp_path / "data"), "not empty")
    assert os.listdir(tmp_path / "data") == ["precious"]
    assert (tmp_path / "data" / "precious").read_text() == "keep me"


def test_fsck_clean(mount):
    os.makedirs(mount.path / "x" / "y")
    (mount.path / "x" / "y" / "f").write_bytes(os.urandom(50_000))
    mount.unmount()
    result = mount.fsck()
    assert result.returncode == 0, result.stdout
    assert "clean" in result.stdout


def test_fsck_bad_input(cli, tmp_path):
    assert_usage_error(cli("fsck", tmp_path / "missing"), "does not exist")


def test_umount_not_mounted(cli, tmp_path):
    assert_usage_error(cli("umount", tmp_path), "no razorfs is mounted")


@pytest.fixture
def version_99(cli, tmp_path):
    """A data directory whose (valid, checksummed) superblock says format version 99."""
    data, mnt = tmp_path / "data", tmp_path / "mnt"
    assert cli("mkfs", data).returncode == 0
    mnt.mkdir()
    superblock = Superblock.decode((data / "superblock").read_bytes())
    (data / "superblock").write_bytes(dataclasses.replace(superblock, version=99).encode())
    return data, mnt


def test_unknown_format_version_refused(cli, version_99):
    data, mnt = version_99
    assert_usage_error(cli("mount", data, mnt), "not supported")
    assert not os.path.ismount(mnt)
    assert_usage_error(cli("fsck", data), "not supported")
    assert (data / "superblock").read_bytes()[8:12] == (99).to_bytes(4, "little")


@pytest.mark.timeout(120)
def test_full_disk(small_tmpfs, make_mount):
    mount = make_mount(root=small_tmpfs)
    digests, chunk, failure = {}, os.urandom(1 << 20), None
    for i in range(200):  # 200 MiB cannot fit in a 96 MiB disk
        name = f"fill-{i:03d}"
        fd = os.open(mount.path / name, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for _ in range(4):
                os.write(fd, chunk)
        except OSError as exc:
            failure = exc
        finally:
            os.close(fd)
        if failure:
            break
        digests[name] = hashlib.sha256(chunk * 4).hexdigest()
    assert failure is not None, "the disk never filled up"
    assert failure.errno == errno.ENOSPC, failure
    assert len(digests) >= 2
    # the mount is alive, still reads, and takes metadata changes
    assert len(os.listdir(mount.path)) == len(digests) + 1
    first = sorted(digests)[0]
    assert hashlib.sha256((mount.path / first).read_bytes()).hexdigest() == digests[first]
    os.unlink(mount.path / first)
    os.mkdir(mount.path / "dir-after-enospc")
    dfd = os.open(mount.path, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    del digests[first]
    mount.unmount()
    result = mount.fsck()
    assert result.returncode == 0, result.stdout
    mount.mount()
    names = set(os.listdir(mount.path))
    assert first not in names and "dir-after-enospc" in names
    for name, digest in digests.items():
        assert hashlib.sha256((mount.path / name).read_bytes()).hexdigest() == digest
    # the blocks of the deleted file can be used again
    (mount.path / "reuse").write_bytes(b"r" * 8192)
    assert (mount.path / "reuse").read_bytes() == b"r" * 8192


@pytest.mark.parametrize("data_name, mnt_name", [
    ("data dir", "mount point"),
    ("dätä", "mnt"),           # fsname: libfuse takes mount options as ASCII
    ("data,dir", "mnt"),       # fsname: a comma would split the option list
    ("data", "mnt é x"),       # /proc/self/mounts: \040 escapes next to non-ASCII bytes
])
def test_special_characters_in_paths(make_mount, cli, tmp_path, data_name, mnt_name):
    mount = make_mount(data=tmp_path / data_name, path=tmp_path / mnt_name)
    (mount.path / "f").write_bytes(b"x")
    mount.remount()  # `razorfs umount` must find the mount from /proc/self/mounts
    assert (mount.path / "f").read_bytes() == b"x"
    stats = cli("stats", mount.path, "--json")  # and so must `razorfs stats`
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["inodes"] == 2


def test_mount_over_the_dead_mount_of_a_killed_daemon(mount, cli):
    """A kill -9 leaves a dead mount ("Transport endpoint is not connected"); mounting the same
    data directory again detaches it (its lock is free: nobody serves it) instead of refusing.
    What a systemd restart after a crash relies on."""
    import signal
    import time

    from conftest import mounted_at, process_gone

    (mount.path / "before").write_text("x")
    os.kill(mount.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not process_gone(mount.pid):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    mount.pid = None
    assert mounted_at(mount.path)
    with pytest.raises(OSError) as dead:
        os.stat(mount.path)
    assert dead.value.errno == errno.ENOTCONN

    other = mount.root / "other"
    other.mkdir()
    refused = cli("mkfs", other / "data")
    assert refused.returncode == 0
    refused = cli("mount", other / "data", mount.path)  # another data directory: still refused
    assert refused.returncode == 2 and "not usable" in refused.stderr

    mount.mount()
    assert [e["mountpoint"] for e in mount.events()
            if e["event"] == "detached the mount a killed daemon left behind"] == [str(mount.path)]
    assert os.listdir(mount.path) is not None
