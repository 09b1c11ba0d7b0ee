"""Issue 18 item 4: the options users and tools give mount(8) — remount ro/rw, the atime family,
kernel flags — through /sbin/mount.fuse.razorfs and /sbin/umount.fuse.razorfs, on real mounts."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from conftest import Mount, mount_8, remount_8
from razorfs import control
from razorfs.datadir import holder_pid

pytestmark = pytest.mark.timeout(90)


def mount_options(path) -> tuple[set[str], set[str]]:
    """(per-mount options, superblock options) of the mount at ``path``, from mountinfo."""
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if fields[4] == str(path):
                separator = fields.index("-")
                return set(fields[5].split(",")), set(fields[separator + 3].split(","))
    raise AssertionError(f"nothing mounted at {path}")


def stats(mount) -> dict:
    return control.query(str(mount.data))


@pytest.fixture
def mounted_8(tmp_path, mount_helpers):
    """Factory: a fresh filesystem mounted through mount(8) with ``options``; unmounted and
    checked (log, fsck) at the end as ``make_mount`` does."""
    mounts = []

    def mount_with(options: str) -> Mount:
        fs = Mount(tmp_path / f"fs{len(mounts)}").mkfs()
        mounts.append(fs)
        result = mount_8(fs.data, fs.path, options)
        assert result.returncode == 0, result.stdout + result.stderr
        fs.pid = holder_pid(fs.data)
        return fs

    yield mount_with
    for fs in mounts:
        fs.cleanup()
    for fs in mounts:
        fs.check_after()


def test_remount_read_only_commits_and_refuses_changes(mounted_8):
    fs = mounted_8("defaults")
    (fs.path / "written").write_text("not fsync'd")
    assert stats(fs)["wal"]["durable_lsn"] < stats(fs)["wal"]["last_lsn"]

    result = remount_8(fs.path, "ro")
    assert result.returncode == 0, result.stderr
    per_mount, superblock = mount_options(fs.path)
    assert "ro" in per_mount and "ro" in superblock  # the kernel's flag matches
    assert {"nosuid", "nodev"} <= per_mount  # a remount keeps the flags it was not asked about
    state = stats(fs)
    assert state["read_only"] is True
    assert state["wal"]["durable_lsn"] == state["wal"]["last_lsn"]  # everything committed
    with pytest.raises(OSError) as refused:
        (fs.path / "new").write_text("x")
    assert refused.value.errno == errno.EROFS
    assert (fs.path / "written").read_text() == "not fsync'd"

    fs.kill9()  # nothing was lost by going read-only: it was all committed
    fs.mount()
    assert (fs.path / "written").read_text() == "not fsync'd"


def test_remount_read_write_accepts_changes_again(mounted_8):
    fs = mounted_8("ro")
    assert stats(fs)["read_only"] is True
    with pytest.raises(OSError) as refused:
        (fs.path / "file").write_text("x")
    assert refused.value.errno == errno.EROFS

    result = remount_8(fs.path, "rw")
    assert result.returncode == 0, result.stderr
    per_mount, superblock = mount_options(fs.path)
    assert "rw" in per_mount and "rw" in superblock and {"nosuid", "nodev"} <= per_mount
    assert stats(fs)["read_only"] is False
    (fs.path / "file").write_text("writable again")
    fs.remount()
    assert (fs.path / "file").read_text() == "writable again"


def test_remount_read_only_refused_while_a_file_is_open_for_writing(mounted_8):
    fs = mounted_8("defaults")
    with open(fs.path / "open", "w") as held:
        result = remount_8(fs.path, "ro")
        assert result.returncode != 0
        assert "open for writing" in result.stderr
        held.write("the mount stayed writable")
    assert "rw" in mount_options(fs.path)[0] and stats(fs)["read_only"] is False
    assert (fs.path / "open").read_text() == "the mount stayed writable"


def test_daemon_refuses_changes_while_read_only_even_if_the_kernel_lets_them_through(mount):
    # The daemon's own switch, without the kernel's flag: changes reach it and get EROFS.
    assert control.query(str(mount.data), "remount", read_only=True, noatime=False) == {
        "read_only": True, "noatime": False}
    for change in (lambda: (mount.path / "f").write_text("x"),
                   lambda: (mount.path / "d").mkdir(),
                   lambda: os.symlink("target", mount.path / "l")):
        with pytest.raises(OSError) as refused:
            change()
        assert refused.value.errno == errno.EROFS
    control.query(str(mount.data), "remount", read_only=False, noatime=False)
    (mount.path / "f").write_text("x")
    assert [e for e in mount.events() if e["event"] == "remounted"][-1]["read_only"] is False


def test_remount_switches_noatime(mounted_8):
    fs = mounted_8("defaults")
    path = fs.path / "file"
    path.write_bytes(b"data")
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))
    assert remount_8(fs.path, "noatime").returncode == 0
    assert "noatime" in mount_options(fs.path)[0] and stats(fs)["noatime"] is True
    path.read_bytes()
    assert os.stat(path).st_atime_ns == 1_000_000_000  # noatime: left alone
    assert remount_8(fs.path, "relatime").returncode == 0
    assert stats(fs)["noatime"] is False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)  # a read that reaches the daemon
    try:
        os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
    assert os.stat(path).st_atime_ns > 2_000_000_000  # relatime again


STANDARD = ("rw,atime,relatime,norelatime,strictatime,nostrictatime,diratime,nodiratime,"
            "lazytime,nolazytime,async,defaults,auto,nofail,_netdev,noexec,nosuid,nodev")


def test_standard_options_are_accepted(mounted_8):
    fs = mounted_8(STANDARD)
    per_mount, _ = mount_options(fs.path)
    assert {"rw", "noexec", "nosuid", "nodev"} <= per_mount  # kernel flags applied
    assert stats(fs)["durability"] == "fsync" and stats(fs)["noatime"] is False
    (fs.path / "file").write_text("mounted")


def test_exec_and_dirsync(mounted_8):
    fs = mounted_8("noexec,exec,dirsync")
    assert "noexec" not in mount_options(fs.path)[0]  # the last of noexec/exec wins
    assert stats(fs)["durability"] == "sync"  # dirsync: directory changes durable, and more
    (fs.path / "dir").mkdir()
    state = stats(fs)["wal"]
    assert state["durable_lsn"] == state["last_lsn"]


def test_umount_8_waits_for_the_final_commit(mounted_8):
    fs = mounted_8("defaults")
    (fs.path / "file").write_text("committed at unmount")
    # -c as systemd runs it for a .mount unit: umount(8) then reads mountinfo, finds the type
    # fuse.razorfs and runs its helper. (A bare `umount PATH` takes the type from statfs(),
    # plain "fuse", and unmounts without a helper: the daemon still commits, just after.)
    result = subprocess.run(["umount", "-c", str(fs.path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert holder_pid(fs.data) is None  # umount.fuse.razorfs returned after the daemon exited
    assert fs.events()[-1]["event"] == "stopped cleanly"
    fs.pid = None
    fs.mount()
    assert fs.event("recovered")["replayed"] == 0
    assert (fs.path / "file").read_text() == "committed at unmount"


def test_unknown_option_is_refused_and_nothing_is_mounted(make_mount, mount_helpers):
    fs = make_mount()
    fs.unmount()
    fs.log_offset = fs.log.stat().st_size
    refused = mount_8(fs.data, fs.path, "rw,nodiratime,frobnicate")
    assert refused.returncode != 0
    assert "unknown option 'frobnicate'" in refused.stderr
    assert holder_pid(fs.data) is None
    assert not fs.events()  # the daemon was never started
