"""Which mtimes and ctimes each operation changes, compared with ext4 operation by operation.

Every case runs in a fresh copy of the same small tree on both sides (a razorfs mount shared
by the module, and a plain directory of the local disk, ext4: pytest's base temporary
directory)::

    d/  d/f (8292 bytes)  d/empty  d/sl -> f  d/sub/  e/  e/g (10 bytes)  e/h/

plus whatever the case adds. Before the operation every entry gets an atime and mtime in the
past (so a changed mtime shows however fast the operation is) and is held open with O_PATH, so
that it is still seen after a rename or an unlink; the clock is made to pass every ctime (which
cannot be set into the past: ext4 may stamp with a coarse clock tick). After the operation each
held inode reports which of mtime and ctime moved, and each entry the operation created whether
its mtime equals its ctime. The reference must give the result the case expects (what ext4
does, mostly what POSIX specifies: so the test checks itself), and razorfs the same result.
Access times are not compared (relatime has its own tests); razorfs is mounted with the
default relatime, so that an access-time update on read is seen not to move mtime or ctime.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from conftest import Mount, require_fuse
from posix_ops import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2

PAST_NS = 1_500_000_000 * 10**9  # atime; mtime one second later: older than any real change
OTHER_PAST_NS = 1_400_000_000 * 10**9  # what an explicit utime sets
F_DATA = b"x" * (2 * 4096 + 100)
G_DATA = b"g" * 10
CLOCK_REALTIME_COARSE = 5  # what ext4 stamps with when it need not be finer (linux/time.h)

UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: str, atime: int | str | None, mtime: int | str | None) -> None:
    """utimensat(2) with UTIME_NOW (None) and UTIME_OMIT ("omit"), which os.utime lacks."""
    def spec(value):
        if value is None:
            return _Timespec(0, UTIME_NOW)
        if value == "omit":
            return _Timespec(0, UTIME_OMIT)
        return _Timespec(*divmod(value, 10**9))
    times = (_Timespec * 2)(spec(atime), spec(mtime))
    if _libc.utimensat(-100, os.fsencode(path), times, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) itself: os.posix_fallocate falls back to writing zeros where it fails."""
    if _libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def mmap_write(fd: int) -> None:
    with mmap.mmap(fd, 4096) as mapped:
        mapped[10:13] = b"abc"
        mapped.flush()


def wait_for_clock_past(ns: int) -> None:
    """Until the coarse real-time clock reads later than ``ns`` (at most one tick, some ms):
    then any timestamp stamped from now on is later than ``ns``, on any kernel."""
    while time.clock_gettime_ns(CLOCK_REALTIME_COARSE) <= ns:
        time.sleep(0.0005)


# ---- the cases ----

Op = Callable[[Callable[[str], str], dict], object]


@dataclass
class Case:
    op: Op                          # op(p, fds): p(relative path) -> absolute path
    changes: dict[str, str]          # entry (before the op) -> "m", "c" or "mc"; others: ""
    created: tuple[str, ...] = ()    # entries the op creates
    error: str | None = None         # the errno name the op fails with on both sides
    setup: Op | None = None          # more entries, before the timestamps are set
    fds: dict[str, tuple[str, int]] = field(default_factory=dict)  # opened before the op


TREE_DIRS = ("d", "d/sub", "e", "e/h")
TREE_FILES = {"d/f": F_DATA, "d/empty": b"", "e/g": G_DATA}
TREE_SYMLINKS = {"d/sl": "f"}

MC = "mc"
C = "c"
RO, WO, RW = os.O_RDONLY, os.O_WRONLY, os.O_RDWR


def create(path: str, flags: int = os.O_CREAT | os.O_WRONLY) -> None:
    os.close(os.open(path, flags, 0o644))


CASES: dict[str, Case] = {
    # ---- creating entries: the parent changes, a new inode has mtime == ctime ----
    "create": Case(lambda p, fd: create(p("d/new")), {"d": MC}, created=("d/new",)),
    "create, exists (no O_EXCL)": Case(lambda p, fd: create(p("d/f")), {}),
    "create O_EXCL, exists": Case(
        lambda p, fd: create(p("d/f"), os.O_CREAT | os.O_EXCL | os.O_WRONLY), {},
        error="EEXIST"),
    "mkfifo": Case(lambda p, fd: os.mkfifo(p("d/fifo")), {"d": MC}, created=("d/fifo",)),
    "mknod socket": Case(lambda p, fd: os.mknod(p("d/sock"), 0o140644), {"d": MC},
                         created=("d/sock",)),
    "mkdir": Case(lambda p, fd: os.mkdir(p("d/new")), {"d": MC}, created=("d/new",)),
    "mkdir, exists": Case(lambda p, fd: os.mkdir(p("d/sub")), {}, error="EEXIST"),
    "symlink": Case(lambda p, fd: os.symlink("f", p("d/new")), {"d": MC}, created=("d/new",)),
    "link, other directory": Case(lambda p, fd: os.link(p("d/f"), p("e/f")),
                                  {"d/f": C, "e": MC}),
    "link, same directory": Case(lambda p, fd: os.link(p("d/f"), p("d/f2")),
                                 {"d/f": C, "d": MC}),
    "link a symlink itself": Case(lambda p, fd: os.link(p("d/sl"), p("e/sl"),
                                                        follow_symlinks=False),
                                  {"d/sl": C, "e": MC}),
    "link, exists": Case(lambda p, fd: os.link(p("d/f"), p("e/g")), {}, error="EEXIST"),
    # ---- removing entries: the parent changes, the inode's ctime too (link count) ----
    "unlink, other links remain": Case(lambda p, fd: os.unlink(p("d/f")), {"d/f": C, "d": MC},
                                       setup=lambda p, fd: os.link(p("d/f"), p("e/f"))),
    "unlink, last link": Case(lambda p, fd: os.unlink(p("d/empty")), {"d/empty": C, "d": MC}),
    "unlink, open file": Case(lambda p, fd: os.unlink(p("d/f")), {"d/f": C, "d": MC},
                              fds={"f": ("d/f", RO)}),
    "unlink symlink": Case(lambda p, fd: os.unlink(p("d/sl")), {"d/sl": C, "d": MC}),
    "unlink, missing": Case(lambda p, fd: os.unlink(p("d/nothing")), {}, error="ENOENT"),
    "rmdir": Case(lambda p, fd: os.rmdir(p("d/sub")), {"d/sub": C, "d": MC}),
    "rmdir, not empty": Case(lambda p, fd: os.rmdir(p("d")), {}, error="ENOTEMPTY"),
    # ---- rename: both parents change, the renamed inode's ctime, a replaced inode's ctime ----
    "rename, same directory": Case(lambda p, fd: os.rename(p("d/f"), p("d/f2")),
                                   {"d/f": C, "d": MC}),
    "rename, other directory": Case(lambda p, fd: os.rename(p("d/f"), p("e/f")),
                                    {"d/f": C, "d": MC, "e": MC}),
    "rename symlink, other directory": Case(lambda p, fd: os.rename(p("d/sl"), p("e/sl")),
                                            {"d/sl": C, "d": MC, "e": MC}),
    "rename directory, same directory": Case(lambda p, fd: os.rename(p("d/sub"), p("d/sub2")),
                                             {"d/sub": C, "d": MC}),
    "rename directory, other directory": Case(lambda p, fd: os.rename(p("d/sub"), p("e/sub")),
                                              {"d/sub": C, "d": MC, "e": MC}),
    "rename over file, same directory": Case(lambda p, fd: os.rename(p("d/f"), p("d/empty")),
                                             {"d/f": C, "d/empty": C, "d": MC}),
    "rename over file, other directory": Case(lambda p, fd: os.rename(p("d/f"), p("e/g")),
                                              {"d/f": C, "e/g": C, "d": MC, "e": MC}),
    "rename over file, other links remain": Case(
        lambda p, fd: os.rename(p("d/f"), p("e/g")), {"d/f": C, "e/g": C, "d": MC, "e": MC},
        setup=lambda p, fd: os.link(p("e/g"), p("e/g2"))),
    "rename over empty directory": Case(lambda p, fd: os.rename(p("d/sub"), p("e/h")),
                                        {"d/sub": C, "e/h": C, "d": MC, "e": MC}),
    "rename onto its own hard link": Case(lambda p, fd: os.rename(p("d/f"), p("d/f2")), {},
                                          setup=lambda p, fd: os.link(p("d/f"), p("d/f2"))),
    "rename onto itself": Case(lambda p, fd: os.rename(p("d/f"), p("d/f")), {}),
    "rename, target directory not empty": Case(lambda p, fd: os.rename(p("e/h"), p("d")), {},
                                               error="ENOTEMPTY"),
    "RENAME_NOREPLACE": Case(lambda p, fd: renameat2(p("d/f"), p("e/f"), RENAME_NOREPLACE),
                             {"d/f": C, "d": MC, "e": MC}),
    "RENAME_NOREPLACE, exists": Case(
        lambda p, fd: renameat2(p("d/f"), p("e/g"), RENAME_NOREPLACE), {}, error="EEXIST"),
    "RENAME_EXCHANGE, same directory": Case(
        lambda p, fd: renameat2(p("d/f"), p("d/empty"), RENAME_EXCHANGE),
        {"d/f": C, "d/empty": C, "d": MC}),
    "RENAME_EXCHANGE, other directory": Case(
        lambda p, fd: renameat2(p("d/f"), p("e/g"), RENAME_EXCHANGE),
        {"d/f": C, "e/g": C, "d": MC, "e": MC}),
    "RENAME_EXCHANGE, directory and file": Case(
        lambda p, fd: renameat2(p("d/sub"), p("e/g"), RENAME_EXCHANGE),
        {"d/sub": C, "e/g": C, "d": MC, "e": MC}),
    "RENAME_EXCHANGE, two directories": Case(
        lambda p, fd: renameat2(p("d/sub"), p("e/h"), RENAME_EXCHANGE),
        {"d/sub": C, "e/h": C, "d": MC, "e": MC}),
    # ---- attributes: ctime only ----
    "chmod": Case(lambda p, fd: os.chmod(p("d/f"), 0o600), {"d/f": C}),
    "chmod, same mode": Case(lambda p, fd: os.chmod(p("d/f"), 0o644), {"d/f": C}),
    "chmod through a symlink": Case(lambda p, fd: os.chmod(p("d/sl"), 0o600), {"d/f": C}),
    "chmod directory": Case(lambda p, fd: os.chmod(p("d"), 0o700), {"d": C}),
    "fchmod": Case(lambda p, fd: os.fchmod(fd["f"], 0o600), {"d/f": C},
                   fds={"f": ("d/f", RO)}),
    "chown": Case(lambda p, fd: os.chown(p("d/f"), 1000, 1000), {"d/f": C}),
    "chown, same owner": Case(lambda p, fd: os.chown(p("d/f"), 0, 0), {"d/f": C}),
    "chown -1 -1": Case(lambda p, fd: os.chown(p("d/f"), -1, -1), {"d/f": C}),
    "lchown symlink": Case(lambda p, fd: os.chown(p("d/sl"), 1000, 1000,
                                                  follow_symlinks=False), {"d/sl": C}),
    # ---- times ----
    "utime, explicit": Case(lambda p, fd: os.utime(p("d/f"), ns=(OTHER_PAST_NS,) * 2),
                            {"d/f": MC}),
    "utime, now": Case(lambda p, fd: os.utime(p("d/f")), {"d/f": MC}),
    "utimensat, mtime now, atime omitted": Case(
        lambda p, fd: utimensat(p("d/f"), "omit", None), {"d/f": MC}),
    "utimensat, atime now, mtime omitted": Case(
        lambda p, fd: utimensat(p("d/f"), None, "omit"), {"d/f": C}),
    "utimensat, atime explicit, mtime omitted": Case(
        lambda p, fd: utimensat(p("d/f"), OTHER_PAST_NS, "omit"), {"d/f": C}),
    "utimensat, both omitted": Case(lambda p, fd: utimensat(p("d/f"), "omit", "omit"), {}),
    "utime symlink itself": Case(
        lambda p, fd: os.utime(p("d/sl"), ns=(OTHER_PAST_NS,) * 2, follow_symlinks=False),
        {"d/sl": MC}),
    "utime directory": Case(lambda p, fd: os.utime(p("d"), ns=(OTHER_PAST_NS,) * 2),
                            {"d": MC}),
    "futimens, now": Case(lambda p, fd: os.utime(fd["f"]), {"d/f": MC}, fds={"f": ("d/f", WO)}),
    # ---- size ----
    "truncate up": Case(lambda p, fd: os.truncate(p("d/f"), 20000), {"d/f": MC}),
    "truncate down": Case(lambda p, fd: os.truncate(p("d/f"), 10), {"d/f": MC}),
    # Linux ext4 moves both even when the size stays (POSIX: "if the file size is changed";
    # tmpfs moves neither then).
    "truncate, same size": Case(lambda p, fd: os.truncate(p("d/f"), len(F_DATA)), {"d/f": MC}),
    "truncate empty file to 0": Case(lambda p, fd: os.truncate(p("d/empty"), 0),
                                     {"d/empty": MC}),
    "truncate through a symlink": Case(lambda p, fd: os.truncate(p("d/sl"), 10), {"d/f": MC}),
    "ftruncate up": Case(lambda p, fd: os.ftruncate(fd["f"], 20000), {"d/f": MC},
                         fds={"f": ("d/f", WO)}),
    "ftruncate down": Case(lambda p, fd: os.ftruncate(fd["f"], 10), {"d/f": MC},
                           fds={"f": ("d/f", WO)}),
    "ftruncate, same size": Case(lambda p, fd: os.ftruncate(fd["f"], len(F_DATA)), {"d/f": MC},
                                 fds={"f": ("d/f", WO)}),
    "open O_TRUNC, non-empty": Case(lambda p, fd: os.close(os.open(p("d/f"), WO | os.O_TRUNC)),
                                    {"d/f": MC}),
    "open O_TRUNC, empty": Case(lambda p, fd: os.close(os.open(p("d/empty"), WO | os.O_TRUNC)),
                                {"d/empty": MC}),
    "open O_RDONLY|O_TRUNC": Case(lambda p, fd: os.close(os.open(p("d/f"), RO | os.O_TRUNC)),
                                  {"d/f": MC}),
    "open O_CREAT|O_TRUNC, exists": Case(
        lambda p, fd: create(p("d/f"), os.O_CREAT | os.O_TRUNC | os.O_WRONLY), {"d/f": MC}),
    # ---- data ----
    "write": Case(lambda p, fd: os.write(fd["f"], b"abc"), {"d/f": MC}, fds={"f": ("d/f", WO)}),
    "write, appending": Case(lambda p, fd: os.write(fd["f"], b"abc"), {"d/f": MC},
                             fds={"f": ("d/f", WO | os.O_APPEND)}),
    "write, empty file": Case(lambda p, fd: os.write(fd["f"], b"abc"), {"d/empty": MC},
                              fds={"f": ("d/empty", WO)}),
    "write, same bytes": Case(lambda p, fd: os.write(fd["f"], F_DATA[:100]), {"d/f": MC},
                              fds={"f": ("d/f", WO)}),
    "pwrite, inside": Case(lambda p, fd: os.pwrite(fd["f"], b"abc", 5000), {"d/f": MC},
                           fds={"f": ("d/f", WO)}),
    "pwrite, past the end": Case(lambda p, fd: os.pwrite(fd["f"], b"abc", 50000), {"d/f": MC},
                                 fds={"f": ("d/f", WO)}),
    "write 0 bytes": Case(lambda p, fd: os.write(fd["f"], b""), {}, fds={"f": ("d/f", WO)}),
    "pwrite 0 bytes past the end": Case(lambda p, fd: os.pwrite(fd["f"], b"", 50000), {},
                                        fds={"f": ("d/f", WO)}),
    "write into a FIFO": Case(lambda p, fd: os.write(fd["w"], b"abc"), {"d/fifo": MC},
                              setup=lambda p, fd: os.mkfifo(p("d/fifo")),
                              fds={"w": ("d/fifo", RW | os.O_NONBLOCK)}),
    "read": Case(lambda p, fd: os.read(fd["f"], 1 << 20), {}, fds={"f": ("d/f", RO)}),
    "pread at end of file": Case(lambda p, fd: os.pread(fd["f"], 100, len(F_DATA)), {},
                                 fds={"f": ("d/f", RO)}),
    "copy_file_range": Case(
        lambda p, fd: os.copy_file_range(fd["src"], fd["dst"], 5000, 0, 3), {"e/g": MC},
        fds={"src": ("d/f", RO), "dst": ("e/g", WO)}),
    "copy_file_range, nothing to copy": Case(
        lambda p, fd: os.copy_file_range(fd["src"], fd["dst"], 100, 0, 0), {},
        fds={"src": ("d/empty", RO), "dst": ("e/g", WO)}),
    "posix_fallocate, extending": Case(lambda p, fd: os.posix_fallocate(fd["f"], 0, 20000),
                                       {"d/f": MC}, fds={"f": ("d/f", RW)}),
    "posix_fallocate, write-only descriptor": Case(
        lambda p, fd: os.posix_fallocate(fd["f"], 0, 20000), {"d/f": MC},
        fds={"f": ("d/f", WO)}),
    "fallocate(2)": Case(lambda p, fd: fallocate(fd["f"], 0, 0, 20000), {"d/f": MC},
                         fds={"f": ("d/f", RW)}),
    "copy_file_range, same file": Case(
        lambda p, fd: os.copy_file_range(fd["f"], fd["f"], 100, 0, 9000), {"d/f": MC},
        fds={"f": ("d/f", RW)}),
    "mmap write, msync": Case(lambda p, fd: mmap_write(fd["f"]), {"d/f": MC},
                              fds={"f": ("d/f", RW)}),
    "fsync": Case(lambda p, fd: os.fsync(fd["f"]), {}, fds={"f": ("d/f", WO)}),
    # ---- extended attributes: ctime only ----
    "setxattr": Case(lambda p, fd: os.setxattr(p("d/f"), "user.a", b"1"), {"d/f": C}),
    "setxattr, replace": Case(lambda p, fd: os.setxattr(p("d/f"), "user.a", b"2"), {"d/f": C},
                              setup=lambda p, fd: os.setxattr(p("d/f"), "user.a", b"1")),
    # ext4 leaves an attribute that already has the value alone, ctime included
    # (ext4_xattr_set_handle: ext4_xattr_value_same)
    "setxattr, same value": Case(lambda p, fd: os.setxattr(p("d/f"), "user.a", b"1"), {},
                                 setup=lambda p, fd: os.setxattr(p("d/f"), "user.a", b"1")),
    "setxattr, same empty value": Case(lambda p, fd: os.setxattr(p("d/f"), "user.a", b""), {},
                                       setup=lambda p, fd: os.setxattr(p("d/f"), "user.a", b"")),
    "setxattr XATTR_REPLACE, same value": Case(
        lambda p, fd: os.setxattr(p("d/f"), "user.a", b"1", os.XATTR_REPLACE), {},
        setup=lambda p, fd: os.setxattr(p("d/f"), "user.a", b"1")),
    "setxattr, directory": Case(lambda p, fd: os.setxattr(p("d"), "user.a", b"1"), {"d": C}),
    "setxattr XATTR_CREATE, exists": Case(
        lambda p, fd: os.setxattr(p("d/f"), "user.a", b"2", os.XATTR_CREATE), {},
        error="EEXIST", setup=lambda p, fd: os.setxattr(p("d/f"), "user.a", b"1")),
    "fsetxattr": Case(lambda p, fd: os.setxattr(fd["f"], "user.a", b"1"), {"d/f": C},
                      fds={"f": ("d/f", RO)}),
    "lsetxattr on a symlink": Case(
        lambda p, fd: os.setxattr(p("d/sl"), "user.a", b"1", follow_symlinks=False), {},
        error="EPERM"),
    "removexattr": Case(lambda p, fd: os.removexattr(p("d/f"), "user.a"), {"d/f": C},
                        setup=lambda p, fd: os.setxattr(p("d/f"), "user.a", b"1")),
    "removexattr, missing": Case(lambda p, fd: os.removexattr(p("d/f"), "user.a"), {},
                                 error="ENODATA"),
    # ---- reading metadata changes nothing ----
    "getxattr and listxattr": Case(
        lambda p, fd: (os.getxattr(p("d/f"), "user.a"), os.listxattr(p("d/f"))), {},
        setup=lambda p, fd: os.setxattr(p("d/f"), "user.a", b"1")),
    "listdir": Case(lambda p, fd: os.listdir(p("d")), {}),
    "readlink": Case(lambda p, fd: os.readlink(p("d/sl")), {}),
}

# Differences from ext4, case -> reason: a strict xfail each, so that a fix is noticed.
FIFO_WRITE = (
    "LIMITATION of FUSE: a write into a FIFO is pipe I/O in the kernel, which would stamp "
    "mtime and ctime (pipe_write: file_update_time) but FUSE inodes other than regular files "
    "are S_NOCMTIME, and the daemon never hears of it")
NO_FALLOCATE = (
    "LIMITATION of pyfuse3 (no fallocate handler): fallocate(2) fails with EOPNOTSUPP and "
    "glibc's posix_fallocate falls back to reading and writing a byte per block, which needs a "
    "descriptor open for reading too")
KNOWN_DIFFERENCES: dict[str, str] = {
    "write into a FIFO": FIFO_WRITE,
    "posix_fallocate, write-only descriptor": NO_FALLOCATE,
    "fallocate(2)": NO_FALLOCATE,
}


# ---- running a case on one side ----

def build_tree(p) -> None:
    for rel in TREE_DIRS:
        os.mkdir(p(rel))
    for rel, data in TREE_FILES.items():
        with open(p(rel), "wb") as stream:
            stream.write(data)
        os.chmod(p(rel), 0o644)
    for rel, target in TREE_SYMLINKS.items():
        os.symlink(target, p(rel))


def entries(root: str) -> list[str]:
    """Relative paths of everything under ``root`` and ``""`` for root itself; of several hard
    links to one inode only the first in sorted order."""
    found = [""]
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.append(os.path.relpath(os.path.join(dirpath, name), root))
    inodes = {}
    for rel in sorted(found):
        inodes.setdefault(os.lstat(os.path.join(root, rel)).st_ino, rel)
    return sorted(inodes.values())


def stamps(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_mtime_ns, st.st_ctime_ns


def filesystem_type(path: str) -> str:
    """The type of the filesystem ``path`` is on (the longest mount point above it)."""
    path = os.path.realpath(path)
    best = ("", "?")
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1].encode().decode("unicode_escape")
            if (path == point or path.startswith(point.rstrip("/") + "/")) and \
                    len(point) >= len(best[0]):
                best = (point, fields[2])
    return best[1]


def run_case(root: str, case: Case) -> dict:
    """The op's outcome, then for every entry that existed before it which of its inode's
    mtime and ctime changed, then for every entry it created whether mtime == ctime."""
    os.mkdir(root)

    def p(rel: str) -> str:
        return os.path.join(root, rel) if rel else root

    build_tree(p)
    if case.setup:
        case.setup(p, {})
    watched = entries(root)
    for rel in reversed(watched):  # children first: setting a child's times changes no parent
        os.utime(p(rel), ns=(PAST_NS, PAST_NS + 10**9), follow_symlinks=False)
    held = {rel: os.open(p(rel), os.O_PATH | os.O_NOFOLLOW) for rel in watched}
    fds = {name: os.open(p(rel), flags) for name, (rel, flags) in case.fds.items()}
    try:
        before = {rel: stamps(fd) for rel, fd in held.items()}
        wait_for_clock_past(max(ctime for _, ctime in before.values()))
        try:
            case.op(p, fds)
            result: dict = {"outcome": "ok"}
        except OSError as exc:
            result = {"outcome": errno.errorcode.get(exc.errno, exc.errno)}
        for rel, fd in held.items():
            (mtime, ctime), (old_mtime, old_ctime) = stamps(fd), before[rel]
            result[rel or "."] = ("m" if mtime != old_mtime else "") + (
                "c" if ctime != old_ctime else "")
    finally:
        for fd in [*fds.values(), *held.values()]:
            os.close(fd)
    for rel in case.created:
        st = os.lstat(p(rel))
        result[f"new {rel}"] = "mtime == ctime" if st.st_mtime_ns == st.st_ctime_ns else \
            "mtime != ctime"
    return result


# ---- the tests ----

@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    """(razorfs directory, ext4 directory) for the module: one mount for every case."""
    require_fuse()
    root = tmp_path_factory.mktemp("timestamps")
    mount = Mount(root).mkfs().mount()
    (root / "ext4").mkdir()
    try:
        yield str(mount.path), str(root / "ext4"), filesystem_type(str(root / "ext4"))
    finally:
        mount.cleanup()
    mount.check_after()


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_DIFFERENCES[name]))
    if name in KNOWN_DIFFERENCES else name for name in CASES])
def test_timestamps_change_as_on_ext4(sides, name):
    case = CASES[name]
    ours_root, ext4_root, ext4_type = sides
    directory = f"case{list(CASES).index(name)}"
    ext4 = run_case(os.path.join(ext4_root, directory), case)
    ours = run_case(os.path.join(ours_root, directory), case)
    want = {"outcome": case.error or "ok"}
    want.update({key: "" for key in ext4 if key != "outcome" and not key.startswith("new ")})
    want.update({rel or ".": changed for rel, changed in case.changes.items()})
    want.update({f"new {rel}": "mtime == ctime" for rel in case.created})
    assert ext4 == want, f"{name}: the reference ({ext4_type}) differs from what the case " \
                         f"expects (ext4's behaviour): {differences(ext4, want)}"
    assert ours == ext4, f"{name}: razorfs differs from ext4 (razorfs, ext4): " \
                         f"{differences(ours, ext4)}"


def differences(got: dict, want: dict) -> dict:
    return {key: (got.get(key, "<absent>"), want.get(key, "<absent>"))
            for key in sorted({*got, *want}) if got.get(key) != want.get(key)}
