"""Every request field at its limits, on razorfs and on ext4 (the reference), syscall by syscall.

Each case makes what it needs in a fresh directory of each side, makes one or a few system calls
with a field at or past its limit (timestamps at +-2**63 s, ids 0 and 2**32-1, modes with every
bit, sizes and offsets near 2**63, names of 255/256 bytes and odd bytes, symlink targets of
4095/4096 bytes, xattr names and values at and past their limits, device numbers, rename
flags) and returns what a program would see: the result or errno and the attributes after.
razorfs must answer exactly as ext4 does, except where ``DIFFERENCES`` says (each a documented
difference, README); never EIO. The mount's log must hold no "unexpected error" (conftest), and
what was stored (timestamps above all) must read back the same after a crash and its WAL replay,
and after a clean remount (from the checkpoint).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from pathlib import Path

from posix_ops import RENAME_EXCHANGE, RENAME_NOREPLACE, outcome, renameat2

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
RENAME_WHITEOUT = 4
EXT4_TIME_MIN, EXT4_TIME_MAX = -(1 << 31), (1 << 34) - (1 << 31) - 1
EXT4_MAX_FILE_SIZE = (1 << 44) - 4096  # 4 KiB blocks
I64_MAX = (1 << 63) - 1


def check(result: int) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_long)]


def utimensat(path, atime: tuple[int, int], mtime: tuple[int, int], flags: int = 0) -> None:
    """utimensat(2) with raw (seconds, nanoseconds) pairs: any 64-bit seconds, UTIME_NOW,
    UTIME_OMIT, invalid nanoseconds (os.utime checks and converts them itself)."""
    times = (Timespec * 2)(Timespec(*atime), Timespec(*mtime))
    check(_libc.utimensat(AT_FDCWD, os.fsencode(path), times, flags))


def truncate(path, size: int) -> None:
    """truncate(2) with any 64-bit length (negative ones included)."""
    check(_libc.truncate(os.fsencode(path), ctypes.c_int64(size)))


def chown_raw(path, uid: int, gid: int) -> None:
    """chown(2) with any 32-bit ids (2**32 - 1 is -1: leave as is)."""
    check(_libc.lchown(os.fsencode(path), ctypes.c_uint32(uid), ctypes.c_uint32(gid)))


def mknod_raw(path, mode: int, dev: int) -> None:
    check(_libc.mknod(os.fsencode(path), ctypes.c_uint32(mode), ctypes.c_uint64(dev)))


def size_unless_directory(st: os.stat_result) -> int | str:
    return "directory" if stat.S_ISDIR(st.st_mode) else st.st_size


def times_of(path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_atime_ns, st.st_mtime_ns


def kept(path) -> tuple:
    """What a case leaves that must survive a crash and a remount."""
    st = os.lstat(path)
    return (oct(st.st_mode), st.st_uid, st.st_gid, st.st_size, st.st_rdev, st.st_atime_ns,
            st.st_mtime_ns)


# ---- the cases: each takes a fresh directory and returns what must agree ----

TIME_VALUES = {
    "i64 max": (I64_MAX, 999_999_999),
    "i64 min": (-(1 << 63), 0),
    "past ext4 max": (EXT4_TIME_MAX + 1, 5),
    "ext4 max": (EXT4_TIME_MAX, 123),
    "below ext4 max": (EXT4_TIME_MAX - 1, 999_999_999),
    "ext4 min": (EXT4_TIME_MIN, 5),
    "above ext4 min": (EXT4_TIME_MIN + 1, 7),
    "past ext4 min": (EXT4_TIME_MIN - 1, 7),
    "2**63 ns": divmod(1 << 63, 10**9),
    "just before 1970": (-1, 500_000_000),
    "epoch": (0, 0),
    "nsec 10**9": (0, 10**9),
    "nsec -1": (0, -1),
}


def time_case(value, nofollow=False, kind="file"):
    def case(root: Path):
        path = root / "t"
        if kind == "file":
            path.write_bytes(b"t")
        elif kind == "dir":
            path.mkdir()
        else:
            os.symlink("nowhere", path)
        before = times_of(path)
        result = outcome(lambda: utimensat(path, value, value,
                                           AT_SYMLINK_NOFOLLOW if nofollow else 0))
        return result, times_of(path) if result[0] == "ok" else times_of(path) == before
    return case


def omit_and_now_case(root: Path):
    """UTIME_OMIT leaves a time, UTIME_NOW takes the clock (the kernel: no ATTR_*_SET)."""
    path = root / "t"
    path.write_bytes(b"t")
    utimensat(path, (EXT4_TIME_MAX + 10, 0), (1 << 40, 0))
    utimensat(path, (0, UTIME_OMIT), (I64_MAX, 1))
    omitted = times_of(path)
    utimensat(path, (0, UTIME_NOW), (0, UTIME_OMIT))
    atime, mtime = times_of(path)
    now = os.stat(root).st_ctime_ns  # the clock of that side, just before
    return omitted, abs(atime - now) < 60 * 10**9, mtime


def owner_case(uid, gid, symlink=False):
    def case(root: Path):
        path = root / "o"
        if symlink:
            os.symlink("nowhere", path)
        else:
            path.write_bytes(b"o")
        result = outcome(lambda: chown_raw(path, uid, gid))
        st = os.lstat(path)
        return result, st.st_uid, st.st_gid
    return case


def mode_case(mode, make):
    def case(root: Path):
        path = root / "m"
        old = os.umask(0)
        try:
            if make == "chmod":
                path.write_bytes(b"m")
                result = outcome(lambda: os.chmod(path, mode))
            elif make == "mkdir":
                result = outcome(lambda: os.mkdir(path, mode))
            elif make == "create":
                result = outcome(lambda: os.close(os.open(path, os.O_CREAT | os.O_WRONLY,
                                                          mode)))
            else:
                result = outcome(lambda: mknod_raw(path, mode, 0))
        finally:
            os.umask(old)
        return result, outcome(lambda: oct(os.lstat(path).st_mode))
    return case


def size_case(size, how):
    def case(root: Path):
        path = root / "s"
        path.write_bytes(b"0123456789")
        if how == "truncate":
            result = outcome(lambda: truncate(path, size))
        else:
            fd = os.open(path, os.O_WRONLY)
            try:
                result = outcome(lambda: os.ftruncate(fd, size))
            finally:
                os.close(fd)
        return result, os.stat(path).st_size
    return case


def offset_case(offset, what):
    def case(root: Path):
        path = root / "w"
        path.write_bytes(b"abc")
        fd = os.open(path, os.O_RDWR)
        try:
            if what == "pwrite":
                result = outcome(lambda: os.pwrite(fd, b"z", offset))
            elif what == "pread":
                result = outcome(lambda: os.pread(fd, 10, offset))
            elif what == "lseek":
                result = outcome(lambda: os.lseek(fd, offset, os.SEEK_SET))
            else:
                result = outcome(lambda: os.lseek(fd, offset, os.SEEK_END))
        finally:
            os.close(fd)
        return result, os.stat(path).st_size
    return case


def copy_range_case(offset_in, offset_out, size):
    def case(root: Path):
        (root / "src").write_bytes(b"source bytes")
        (root / "dst").write_bytes(b"")
        src = os.open(root / "src", os.O_RDONLY)
        dst = os.open(root / "dst", os.O_WRONLY)
        try:
            result = outcome(lambda: os.copy_file_range(src, dst, size, offset_in, offset_out))
        finally:
            os.close(src)
            os.close(dst)
        return result, os.stat(root / "dst").st_size
    return case


ODD_NAMES = {
    "255 bytes": b"n" * 255,
    "256 bytes": b"n" * 256,
    "1024 bytes": b"n" * 1024,
    "1025 bytes": b"n" * 1025,
    "control bytes": bytes(range(1, 32)),
    "high bytes": bytes(range(128, 256)),
    "255 high bytes": b"\xff" * 255,
    "newline and space": b" \n ",
    "backslash and del": b"\\\x7f",
    "dot": b".",
    "dot dot": b"..",
    "three dots": b"...",
}


def name_case(name: bytes):
    def case(root: Path):
        base = os.fsencode(root)
        path = base + b"/" + name
        results = [
            outcome(lambda: os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))),
            outcome(lambda: size_unless_directory(os.lstat(path))),
            outcome(lambda: os.rename(path, base + b"/renamed")),
            outcome(lambda: os.rename(base + b"/renamed", path)),
            outcome(lambda: os.link(path, base + b"/hard")),
            outcome(lambda: os.mkdir(path + b"d"[: 255 - len(name)])),
            outcome(lambda: os.symlink(b"target", base + b"/s")),
            outcome(lambda: os.rename(base + b"/s", path)),
            outcome(lambda: os.readlink(path)),
            outcome(lambda: sorted(os.listdir(base))),
            outcome(lambda: os.unlink(path)),
            outcome(lambda: sorted(os.listdir(base))),
        ]
        return tuple(results)
    return case


def symlink_case(target: bytes):
    def case(root: Path):
        path = os.fsencode(root) + b"/l"
        made = outcome(lambda: os.symlink(target, path))
        return made, outcome(lambda: os.readlink(path)), outcome(lambda: os.lstat(path).st_size)
    return case


def xattr_case(name: str, value: bytes, where="file"):
    def case(root: Path):
        path = root / "x"
        path.mkdir() if where == "dir" else path.write_bytes(b"x")
        result = outcome(lambda: os.setxattr(path, name, value))
        got = outcome(lambda: os.getxattr(path, name))
        return result, got, outcome(lambda: os.listxattr(path))
    return case


def many_xattr_names_case(root: Path):
    """Long names until the filesystem says no: listxattr must still answer."""
    path = root / "x"
    path.write_bytes(b"x")
    failure = None
    for i in range(400):
        try:
            os.setxattr(path, "user." + f"{i:04d}" * 62, b"")
        except OSError as exc:
            failure = errno.errorcode[exc.errno]
            break
    names = os.listxattr(path)
    return failure, len(names) == len(set(names)), all(n.startswith("user.") for n in names)


def device_case(mode_kind, dev):
    def case(root: Path):
        path = root / "dev"
        result = outcome(lambda: mknod_raw(path, mode_kind | 0o600, dev))
        return result, outcome(lambda: os.lstat(path).st_rdev)
    return case


def rename_flags_case(flags, target_exists):
    def case(root: Path):
        (root / "a").write_bytes(b"a")
        if target_exists:
            (root / "b").write_bytes(b"b")
        result = outcome(lambda: renameat2(str(root / "a"), str(root / "b"), flags))
        return result, sorted(os.listdir(root))
    return case


CASES = {
    **{f"utime {name}": time_case(value) for name, value in TIME_VALUES.items()},
    "utime i64 max, directory": time_case(TIME_VALUES["i64 max"], kind="dir"),
    "utime i64 min, symlink itself": time_case(TIME_VALUES["i64 min"], nofollow=True,
                                               kind="symlink"),
    "utime omit and now": omit_and_now_case,
    **{f"chown {uid} {gid}": owner_case(uid, gid)
       for uid, gid in ((0, 0), (2**32 - 2, 2**32 - 2), (2**32 - 1, 2**32 - 1), (2**31, 7),
                        (2**32 - 1, 0), (0, 2**32 - 1))},
    "lchown symlink 2**32-2": owner_case(2**32 - 2, 2**32 - 2, symlink=True),
    **{f"{make} {mode:o}": mode_case(mode, make)
       for make in ("chmod", "mkdir", "create") for mode in (0o7777, 0o177777, 0)},
    **{f"mknod {mode:o}": mode_case(mode, "mknod")
       for mode in (stat.S_IFIFO | 0o7777, stat.S_IFSOCK | 0o7777, stat.S_IFREG | 0o7777,
                    0o170000 | 0o644, stat.S_IFDIR | 0o755, 0o644)},
    **{f"{how} {size}": size_case(size, how)
       for how in ("truncate", "ftruncate")
       for size in (0, 1 << 40, EXT4_MAX_FILE_SIZE, EXT4_MAX_FILE_SIZE + 1, I64_MAX, -1)},
    "truncate -2**63": size_case(-(1 << 63), "truncate"),
    **{f"{what} at {offset}": offset_case(offset, what)
       for what in ("pwrite", "pread", "lseek", "lseek from end")
       for offset in (I64_MAX, I64_MAX - 1, I64_MAX - 4095, EXT4_MAX_FILE_SIZE - 1,
                      EXT4_MAX_FILE_SIZE, 1 << 40)},
    **{f"copy_file_range {a} {b} {n}": copy_range_case(a, b, n)
       for a, b, n in ((0, I64_MAX - 5, 10), (0, I64_MAX, 1), (I64_MAX - 1, 0, 10),
                       (0, EXT4_MAX_FILE_SIZE - 2, 10))},
    **{f"name {name}": name_case(value) for name, value in ODD_NAMES.items()},
    **{f"symlink target {name}": symlink_case(target) for name, target in {
        "4095 bytes": b"t" * 4095, "4096 bytes": b"t" * 4096, "1 byte": b"t",
        "empty": b"", "odd bytes": bytes(range(1, 256)).replace(b"/", b""),
        "255-byte components": b"/".join([b"c" * 255] * 15)}.items()},
    **{f"xattr {label}": xattr_case(name, value) for label, (name, value) in {
        "name of 255 bytes": ("user." + "n" * 250, b"v"),
        "name of 256 bytes": ("user." + "n" * 251, b"v"),
        "empty value": ("user.e", b""),
        "value of 3000 bytes": ("user.v", b"v" * 3000),
        "value of 65537 bytes": ("user.v", b"v" * 65537),
        "odd name bytes": ("user.\x01\x7f\udcff", b"v"),
        "trusted namespace": ("trusted.t", b"v"),
        "security namespace": ("security.s", b"v"),
        "system namespace": ("system.nothing", b"v"),
        "no namespace": ("nothing", b"v"),
        "bare prefix": ("user.", b"v")}.items()},
    "xattr value of 65536 bytes": xattr_case("user.v", b"v" * 65536),
    "xattr on a directory": xattr_case("user.d", b"d", where="dir"),
    "xattr many long names": many_xattr_names_case,
    **{f"mknod {kind} rdev {dev:#x}": device_case(mode_kind, dev)
       for kind, mode_kind in (("char", stat.S_IFCHR), ("block", stat.S_IFBLK))
       for dev in (0, os.makedev(4095, (1 << 20) - 1), 0xFFFFFFFF, (1 << 64) - 1,
                   os.makedev(1, 3))},
    **{f"rename flags {flags:#x}{' onto a file' if exists else ''}":
       rename_flags_case(flags, exists)
       for flags in (0, RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_NOREPLACE | RENAME_EXCHANGE,
                     RENAME_WHITEOUT, 8, 1 << 31)
       for exists in (False, True)},
}

ONLY_EXT4 = "ext4 with 4 KiB blocks stops at 16 TiB - 4 KiB (EFBIG); razorfs files reach 2**63 - 1"
XATTR_BLOCK = ("ext4 keeps a file's xattrs in one 4 KiB block (ENOSPC past it); razorfs takes "
               "values up to 64 KiB and names up to listxattr's 64 KiB")
WHITEOUT = "RENAME_WHITEOUT: pyfuse3 has no whiteout, razorfs answers EINVAL (README)"

# case -> (why, what razorfs answers instead): documented differences from ext4 (README).
DIFFERENCES = {
    "truncate 17592186040321": (ONLY_EXT4, (("ok", None), 17592186040321)),
    "ftruncate 17592186040321": (ONLY_EXT4, (("ok", None), 17592186040321)),
    "truncate 9223372036854775807": (ONLY_EXT4, (("ok", None), I64_MAX)),
    "ftruncate 9223372036854775807": (ONLY_EXT4, (("ok", None), I64_MAX)),
    "pwrite at 9223372036854775806": (ONLY_EXT4, (("ok", 1), I64_MAX)),
    "pwrite at 9223372036854771712": (ONLY_EXT4, (("ok", 1), I64_MAX - 4095 + 1)),
    "pwrite at 17592186040320": (ONLY_EXT4, (("ok", 1), EXT4_MAX_FILE_SIZE + 1)),
    "copy_file_range 0 17592186040318 10": (ONLY_EXT4, (("ok", 10), EXT4_MAX_FILE_SIZE + 8)),
    "copy_file_range 0 9223372036854775802 10": (ONLY_EXT4, (("ok", 5), I64_MAX)),
    **{f"lseek at {offset}": (ONLY_EXT4, (("ok", offset), 3))
       for offset in (I64_MAX, I64_MAX - 1, I64_MAX - 4095)},
    **{f"lseek from end at {offset}": (ONLY_EXT4, (("ok", offset + 3), 3))
       for offset in (I64_MAX - 4095, EXT4_MAX_FILE_SIZE - 1, EXT4_MAX_FILE_SIZE)},
    "xattr value of 65536 bytes": (XATTR_BLOCK, (("ok", None), ("ok", b"v" * 65536),
                                                 ("ok", ["user.v"]))),
}
DIFFERENCES.update({
    f"rename flags {RENAME_WHITEOUT:#x}": (WHITEOUT, (("err", "EINVAL"), ["a"])),
    f"rename flags {RENAME_WHITEOUT:#x} onto a file": (WHITEOUT, (("err", "EINVAL"), ["a", "b"])),
})


def test_every_field_at_its_limits_as_on_ext4(make_mount, tmp_path):
    mount = make_mount()
    ext4 = tmp_path / "ext4"
    ext4.mkdir()
    mismatches, eio = [], []
    for index, (name, case) in enumerate(CASES.items()):
        results = []
        for root in (ext4, mount.path):
            where = root / f"c{index}"
            where.mkdir()
            results.append(case(where))
        ours, theirs = results[1], results[0]
        expected = theirs
        if name in DIFFERENCES:
            expected = DIFFERENCES[name][1]
            if theirs == expected:
                mismatches.append(f"{name}: ext4 now answers as razorfs: {theirs!r}")
        if "EIO" in repr(ours):
            eio.append(name)
        if ours != expected:
            mismatches.append(f"{name}:\n    razorfs {ours!r}\n    expected {expected!r}")
    assert not eio, f"EIO from razorfs: {eio}"
    assert not mismatches, "differences from ext4:\n  " + "\n  ".join(mismatches)

    # What was stored reads back the same after a crash (WAL replay) and after a remount
    # (checkpoint).
    stored = {path: kept(path) for path in sorted(mount.path.rglob("*"))}
    mount.sync_crash_and_mount()
    assert {path: kept(path) for path in sorted(mount.path.rglob("*"))} == stored
    mount.remount()
    assert {path: kept(path) for path in sorted(mount.path.rglob("*"))} == stored
