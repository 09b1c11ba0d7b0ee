"""Real FUSE mounts of razorfs for end-to-end tests (root, /dev/fuse and fusermount3 needed).

``Mount`` drives the ``razorfs`` CLI exactly as a user would (mkfs, background mount, umount,
fsck) plus ``kill9`` to simulate a daemon crash. Every mount is cleaned up at teardown, even when
the test failed, then checked: its daemon log must show no request that ended in the
"unexpected error" EIO edge and no failsafe, and ``razorfs fsck`` must find it clean.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# RAZORFS_PRETEND_NO_FUSE: how tests/unit/test_ci_guard.py checks that no test would skip in CI
FUSE_USABLE = (os.geteuid() == 0 and os.path.exists("/dev/fuse")
               and shutil.which("fusermount3") is not None
               and not os.environ.get("RAZORFS_PRETEND_NO_FUSE"))
CLI_TIMEOUT = 120
BAD_EVENTS = ("unexpected error", "failsafe")


def razorfs(*args, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    """Run the razorfs CLI of this interpreter; never raises on a non-zero exit."""
    return subprocess.run([sys.executable, "-m", "razorfs", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def mounted_at(path: Path) -> bool:
    """True if anything (even a dead FUSE connection) is mounted at ``path``."""
    target = os.fsencode(os.path.abspath(path))
    with open("/proc/self/mounts", "rb") as mounts:
        # fields escape space, tab, newline and backslash as \ooo octal; the rest is raw bytes
        return any(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]),
                          line.split()[1]) == target for line in mounts)


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as status:
            return status.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


class Mount:
    """One razorfs data directory ``root/data`` mounted at ``root/mnt``."""

    def __init__(self, root: Path, *options: str, data: Path | None = None,
                 path: Path | None = None) -> None:
        self.root = Path(root)
        self.data = Path(data or self.root / "data")
        self.path = Path(path or self.root / "mnt")
        self.log = self.data / "razorfs.log"
        self.options = options
        self.pid: int | None = None
        self.log_offset = 0

    def mkfs(self) -> Mount:
        result = razorfs("mkfs", self.data)
        assert result.returncode == 0, result.stderr
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def mount(self, *extra: str) -> Mount:
        self.log_offset = self.log.stat().st_size if self.log.exists() else 0
        result = razorfs("mount", self.data, self.path, *self.options, *extra)
        assert result.returncode == 0, f"mount failed: {result.stderr}"
        self.pid = int(re.search(r"daemon pid (\d+)", result.stdout).group(1))
        assert (self.data / "lock").read_text().strip() == str(self.pid)
        assert mounted_at(self.path)
        return self

    def unmount(self) -> None:
        result = razorfs("umount", self.path, "--timeout", "60")
        assert result.returncode == 0, f"umount failed: {result.stdout}{result.stderr}"
        assert not mounted_at(self.path)
        self.pid = None

    def remount(self, *extra: str) -> Mount:
        self.unmount()
        return self.mount(*extra)

    def kill(self, signum: int = signal.SIGKILL) -> bool:
        """Signal the daemon, wait until it is gone, lazily detach a mount it left behind
        (True if there was one: a crashed daemon cannot unmount)."""
        assert self.pid is not None, "not mounted"
        os.kill(self.pid, signum)
        deadline = time.monotonic() + 30
        while not process_gone(self.pid):
            assert time.monotonic() < deadline, f"daemon {self.pid} survived signal {signum}"
            time.sleep(0.02)
        self.pid = None
        left_behind = mounted_at(self.path)
        if left_behind:
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)
            assert not mounted_at(self.path)
        return left_behind

    def kill9(self) -> None:
        """A crash: SIGKILL, then detach the dead mount."""
        assert self.kill(signal.SIGKILL)

    def sync_crash_and_mount(self) -> Mount:
        """fsync (everything done before it is durable, G1), SIGKILL, mount again (recovery)."""
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.kill9()
        return self.mount()

    def fsck(self, *extra: str) -> subprocess.CompletedProcess:
        return razorfs("fsck", self.data, *extra)

    def events(self, since: int | None = None) -> list[dict]:
        """JSON log events written since ``since`` (default: since the latest mount began)."""
        if not self.log.exists():
            return []
        with open(self.log, "rb") as stream:
            stream.seek(self.log_offset if since is None else since)
            lines = stream.read().decode(errors="replace").splitlines()
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # plain stderr text (tracebacks, CLI messages) shares the file
            if isinstance(event, dict):
                events.append(event)
        return events

    def event(self, name: str) -> dict:
        """The single event ``name`` logged by the current mount."""
        found = [e for e in self.events() if e.get("event") == name]
        assert len(found) == 1, f"expected one {name!r} event, got {found}"
        return found[0]

    def cleanup(self) -> None:
        """Unmount whatever is left (kill and detach if a clean unmount fails)."""
        if self.pid is not None and not process_gone(self.pid):
            if mounted_at(self.path):
                try:
                    self.unmount()
                    return
                except AssertionError:
                    pass
            self.kill()
        elif mounted_at(self.path):
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)
        self.pid = None

    def check_after(self) -> None:
        """What every test must leave behind: a log without error events, a clean fsck."""
        bad = [e for e in self.events(since=0)
               if str(e.get("event", "")).startswith(BAD_EVENTS)]
        assert not bad, f"daemon log of {self.data} has error events: {bad}"
        if (self.data / "superblock").exists():
            result = self.fsck()
            assert result.returncode == 0, f"fsck after the test: {result.stdout}{result.stderr}"


def require_fuse() -> None:
    """Skip without FUSE, but fail under CI: a skip there would hide failures. Every fixture
    that mounts must call it before anything else, a module-scoped one too: those run before
    the autouse guard below."""
    if not FUSE_USABLE:
        message = "real FUSE tests need root, /dev/fuse and fusermount3"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must run them, a skip would hide failures")
        pytest.skip(message)


@pytest.fixture(autouse=True)
def _fuse_usable():
    require_fuse()


@pytest.fixture
def make_mount(tmp_path):
    """Factory: ``make_mount(*cli_options, root=None, data=None, path=None)`` → a fresh
    filesystem in ``data`` (default root/data) mounted at ``path`` (default root/mnt)."""
    mounts: list[Mount] = []

    def factory(*options: str, root: Path | None = None, **paths) -> Mount:
        mount = Mount(root or tmp_path / f"fs{len(mounts)}", *options, **paths)
        mounts.append(mount)
        return mount.mkfs().mount()

    yield factory
    errors = []
    for mount in reversed(mounts):
        try:
            mount.cleanup()
        except Exception as exc:  # still clean up (and check) the others
            errors.append(exc)
    for mount in mounts:
        mount.check_after()
    if errors:
        raise errors[0]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 96 MiB disk of our own: space accounting nobody else disturbs, and fills up fast.
    Request it before ``make_mount`` so that the FUSE mount inside goes away first."""
    root = tmp_path / "tmpfs"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(root)], check=True)
    yield root
    if subprocess.run(["umount", str(root)]).returncode != 0:
        subprocess.run(["umount", "-l", str(root)], check=True)


@pytest.fixture
def mount(make_mount) -> Mount:
    return make_mount()


@pytest.fixture
def cli():
    """The CLI runner: ``cli("fsck", path)`` → CompletedProcess."""
    return razorfs


HELPERS = {Path("/sbin/mount.fuse.razorfs"): "mount.fuse.razorfs",
           Path("/sbin/umount.fuse.razorfs"): "umount.fuse.razorfs"}
HELPER_LOCK = Path("/run/lock/razorfs-mount-helpers.lock")


@pytest.fixture
def mount_helpers():
    """/sbin/mount.fuse.razorfs and /sbin/umount.fuse.razorfs linked to this venv's scripts for
    the test (where mount(8) and umount(8) look), put back as they were afterwards. The links
    are machine-wide: a lock keeps test runs of other checkouts from swapping them meanwhile."""
    scripts = {link: Path(sys.executable).parent / name for link, name in HELPERS.items()}
    missing = [str(script) for script in scripts.values() if not script.exists()]
    if missing:
        message = f"{', '.join(missing)} missing: reinstall razorfs (pip install -e .)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    HELPER_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(HELPER_LOCK, "w") as lock, contextlib.ExitStack() as restore:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for link, script in scripts.items():
            previous = os.readlink(link) if link.is_symlink() else None
            if link.is_symlink():
                link.unlink()
            assert not link.exists(), f"{link} is a file, not a link: not ours to replace"
            link.symlink_to(script)
            restore.callback(_put_back, link, previous)
        yield scripts


def _put_back(link: Path, previous: str | None) -> None:
    link.unlink()
    if previous is not None:
        link.symlink_to(previous)


def mount_8(data: Path, path: Path, options: str) -> subprocess.CompletedProcess:
    """``mount -t fuse.razorfs DATA PATH -o OPTIONS`` (through /sbin/mount.fuse.razorfs)."""
    return subprocess.run(["mount", "-t", "fuse.razorfs", str(data), str(path), "-o", options],
                          capture_output=True, text=True, timeout=60)


def remount_8(path: Path, options: str) -> subprocess.CompletedProcess:
    """``mount -o remount,OPTIONS PATH``, as a user switches a live mount."""
    return subprocess.run(["mount", "-o", f"remount,{options}", str(path)],
                          capture_output=True, text=True, timeout=60)
