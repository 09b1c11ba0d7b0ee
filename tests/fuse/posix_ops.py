"""Seeded random POSIX operations, run identically on two directory trees (differential tests).

An operation is a dict: ``kind`` plus its arguments. Paths are relative to a side's root and
drawn from a tiny namespace (five names, one of them not UTF-8, new entries at depth <= 4) so
that collisions and errors are common; rarely a 255- or 256-byte name. Regular files,
directories, symlinks, hard links, FIFOs and sockets all occur.
Symlink targets only ever point downwards (no ``..``, never absolute), so following one can
never leave the side's root and reach something that differs between the two sides. File
descriptors live in numbered slots, the same slot on both sides, and stay open across
unlinks and renames until a ``close`` op or a reopen of the slot.

``run(side, op)`` returns a comparable outcome: ``("ok", value)`` or ``("err", "ENOENT")``.
Only what must agree between two POSIX filesystems is compared: no inode numbers, no
timestamp values (except right after an explicit utime), no directory st_size (ext4 reports
blocks), no st_blocks, no st_dev. Which timestamps an op changes is compared though:
``Stamps`` holds the inodes an op touches (its paths, what a symlink among them leads to, their
parent directories, its descriptors) and says afterwards which of mtime and ctime moved.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import random
import stat
import struct
import time

BS = 4096
NAMES = ("a", "b", "c", "d", "e f\n\udcff")  # and a name that is not UTF-8
LONG_NAMES = ("n" * 255, "n" * 256)  # the longest allowed, and ENAMETOOLONG
MAX_DEPTH = 4
SLOTS = 6
XATTRS = ("user.a", "user.b", "user.c")
EMPTY_XATTR_NAME = "user."       # Linux: EINVAL (a namespace prefix and nothing after it)
FOREIGN_XATTR_NAME = "foo.bar"    # Linux: EOPNOTSUPP (no such namespace)
MODES = (0o644, 0o600, 0o755, 0o000, 0o4755, 0o2775, 0o1777, 0o6711, 0o444)
IDS = (0, 1000, 65534)

# POSIX ACLs: the xattr format of include/uapi/linux/posix_acl_xattr.h (version, then entries of
# tag, permissions, id), checked by the kernel before any filesystem sees one
ACL_ACCESS, ACL_DEFAULT = "system.posix_acl_access", "system.posix_acl_default"
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
ACL_TAGS = {USER_OBJ: "u::", USER: "u:", GROUP_OBJ: "g::", GROUP: "g:", MASK: "m::",
            OTHER: "o::"}
ACL_USERS = (0, 1000, 1001)
ACL_GROUPS = (1000, 1001, 1234)

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), old)


SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61}[os.uname().machine]
_DIRENT64_HEAD = struct.Struct("=QqHB")  # d_ino, d_off, d_reclen, d_type; then the name


def getdents(fd: int, buffer_size: int = 32768) -> list[tuple[bytes, int, int]]:
    """One getdents64(2) call on directory ``fd``, as the kernel answers it (dot entries
    included, which os.listdir and os.scandir leave out): (name, d_ino, d_off) each."""
    buffer = ctypes.create_string_buffer(buffer_size)
    length = _libc.syscall(SYS_GETDENTS64, fd, buffer, buffer_size)
    if length < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    raw, entries, offset = buffer.raw[:length], [], 0
    while offset < length:
        ino, off, reclen, _ = _DIRENT64_HEAD.unpack_from(raw, offset)
        name = raw[offset + _DIRENT64_HEAD.size : offset + reclen].split(b"\0", 1)[0]
        entries.append((name, ino, off))
        offset += reclen
    return entries


def all_dents(path, buffer_size: int = 32768) -> list[tuple[bytes, int, int]]:
    """Every entry of directory ``path``, by getdents64 calls until the end."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        entries = []
        while chunk := getdents(fd, buffer_size):
            entries += chunk
        return entries
    finally:
        os.close(fd)


def kind_of(mode: int) -> str:
    return "d" if stat.S_ISDIR(mode) else "l" if stat.S_ISLNK(mode) else \
        "f" if stat.S_ISREG(mode) else oct(stat.S_IFMT(mode))


def attrs(st: os.stat_result) -> tuple:
    """The stat fields two POSIX filesystems must agree on."""
    kind = kind_of(st.st_mode)
    return (kind, oct(stat.S_IMODE(st.st_mode)), None if kind == "d" else st.st_size,
            st.st_nlink, st.st_uid, st.st_gid)


def user_xattrs(target) -> list[str]:
    """User xattrs and ACLs (the names both filesystems list; ext4 may have others)."""
    return sorted(name for name in os.listxattr(target)
                  if name.startswith(("user.", "system.posix_acl_")))


def acl_value(entries, version: int = 2) -> bytes:
    """An ACL xattr value from (tag, perm) and (tag, perm, id) entries."""
    return struct.pack("<I", version) + b"".join(
        struct.pack("<HHI", tag, perm, rest[0] if rest else 0xFFFFFFFF)
        for tag, perm, *rest in entries)


def acl_text(value: bytes) -> str:
    """An ACL value as getfacl would show it, compactly ("u::rw-,u:1000:r--,g::r--,...")."""
    if len(value) < 4 or (len(value) - 4) % 8:
        return f"<{len(value)} bytes>"
    shown = []
    for tag, perm, ident in struct.iter_unpack("<HHI", value[4:]):
        name = ACL_TAGS.get(tag, f"{tag:#x}:")
        shown.append(f"{name}{ident if tag in (USER, GROUP) else ''}"
                     f"{':' if tag in (USER, GROUP) else ''}"
                     + "".join(c if perm & b else "-" for c, b in zip("rwx", (4, 2, 1))))
    return ",".join(shown)


def acls(target) -> tuple:
    """The access and default ACL of ``target`` (getfacl's view), or the errno reading each."""
    return tuple(outcome(lambda name=name: acl_text(os.getxattr(target, name)))
                 for name in (ACL_ACCESS, ACL_DEFAULT))


def outcome(func) -> tuple:
    try:
        return ("ok", func())
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno, exc.errno))


def describe(op: dict) -> str:
    """An op, with data shown as length and digest."""
    shown = {k: (f"<{len(v)} bytes {hashlib.sha1(v).hexdigest()[:8]}>"
                 if isinstance(v, bytes) and len(v) > 16 else v) for k, v in op.items()}
    return " ".join(f"{k}={v!r}" for k, v in shown.items())


class Side:
    """One directory tree and its slots of open file descriptors."""

    def __init__(self, root) -> None:
        self.root = os.fspath(root)
        self.fds: list[int | None] = [None] * SLOTS

    def p(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def target(self, where):
        """A path (str) or a slot's file descriptor (int), for the xattr ops."""
        return self.p(where) if isinstance(where, str) else self.fds[where]

    def close(self, slot: int) -> None:
        fd, self.fds[slot] = self.fds[slot], None
        if fd is not None:
            os.close(fd)  # the descriptor is released even when close reports an error

    def close_all(self) -> None:
        """Clean-up: close every slot, even on a dead mount (where close can fail)."""
        for slot in range(SLOTS):
            try:
                self.close(slot)
            except OSError:
                pass

    def walk(self) -> dict[str, str]:
        """Relative path -> kind, for every entry under the root (symlinks not followed)."""
        found = {}
        stack = [""]
        while stack:
            rel = stack.pop()
            for name in sorted(os.listdir(self.p(rel))):
                child = os.path.join(rel, name)
                found[child] = kind_of(os.lstat(self.p(child)).st_mode)
                if found[child] == "d":
                    stack.append(child)
        return found

    def snapshot(self) -> dict:
        """Everything comparable about the whole tree, plus which names are hard links."""
        tree = {}
        inodes: dict[int, list[str]] = {}
        for rel in ["", *self.walk()]:
            path = self.p(rel)
            st = os.lstat(path)
            kind = kind_of(st.st_mode)
            if kind == "d":
                content = sorted(os.listdir(path))
            else:
                inodes.setdefault(st.st_ino, []).append(rel)
                if kind == "f":
                    with open(path, "rb") as stream:
                        content = hashlib.sha1(stream.read()).hexdigest()
                else:
                    content = os.readlink(path) if kind == "l" else None
            xattrs = {name: os.getxattr(path, name)
                      for name in user_xattrs(path)} if kind in "fd" else {}
            tree[rel] = (attrs(st), content, xattrs, acls(path) if kind != "l" else None)
        tree["<hard links>"] = sorted(sorted(names) for names in inodes.values() if len(names) > 1)
        return tree

    # ---- executing one op ----

    def run(self, op: dict) -> tuple:
        return outcome(lambda: getattr(self, "op_" + op["kind"])(
            **{k: v for k, v in op.items() if k != "kind"}))

    def op_open(self, path, flags, mode, slot):
        self.close(slot)
        self.fds[slot] = os.open(self.p(path), flags, mode)
        return "opened"

    def op_close(self, slot):
        self.close(slot)

    def op_write(self, slot, data):
        return os.write(self.fds[slot], data)

    def op_pwrite(self, slot, data, offset):
        return os.pwrite(self.fds[slot], data, offset)

    def op_read(self, slot, size):
        return os.read(self.fds[slot], size)

    def op_pread(self, slot, size, offset):
        return os.pread(self.fds[slot], size, offset)

    def op_lseek(self, slot, offset, whence):
        if stat.S_ISDIR(os.fstat(self.fds[slot]).st_mode):
            return "directory"  # offsets in a directory are opaque cookies (ext4: hashes)
        return os.lseek(self.fds[slot], offset, whence)

    def op_ftruncate(self, slot, size):
        os.ftruncate(self.fds[slot], size)
        return os.fstat(self.fds[slot]).st_size

    def op_copy_range(self, slot, slot2, size, offset, offset2):
        return os.copy_file_range(self.fds[slot], self.fds[slot2], size, offset, offset2)

    def op_truncate(self, path, size):
        os.truncate(self.p(path), size)

    def op_fstat(self, slot):
        return attrs(os.fstat(self.fds[slot]))

    def op_stat(self, path):
        return attrs(os.stat(self.p(path)))

    def op_lstat(self, path):
        return attrs(os.lstat(self.p(path)))

    def op_fsync(self, slot, data_only):
        (os.fdatasync if data_only else os.fsync)(self.fds[slot])

    def op_rename(self, path, path2, flags):
        if flags:
            renameat2(self.p(path), self.p(path2), flags)
        else:
            os.rename(self.p(path), self.p(path2))

    def op_link(self, path, path2, follow):
        os.link(self.p(path), self.p(path2), follow_symlinks=follow)

    def op_unlink(self, path):
        os.unlink(self.p(path))

    def op_symlink(self, target, path):
        os.symlink(target, self.p(path))

    def op_readlink(self, path):
        return os.readlink(self.p(path))

    def op_mkdir(self, path, mode):
        os.mkdir(self.p(path), mode)

    def op_mknod(self, path, mode):
        os.mknod(self.p(path), mode)

    def op_rmdir(self, path):
        os.rmdir(self.p(path))

    def op_listdir(self, path):
        """Names as getdents gives them ("." and ".." included), and whether the dot entries
        carry the inode numbers of the directory and (below the side's root) its parent."""
        dents = all_dents(self.p(path))
        numbers = {name: ino for name, ino, _ in dents}
        here = os.stat(self.p(path)).st_ino
        parent = os.stat(self.p(os.path.dirname(path))).st_ino if path else None
        return (sorted(os.fsdecode(name) for name, _, _ in dents), numbers.get(b".") == here,
                numbers.get(b"..") == parent if path else None)

    def op_chmod(self, where, mode):
        os.chmod(self.target(where), mode)

    def op_chown(self, path, uid, gid, follow):
        os.chown(self.p(path), uid, gid, follow_symlinks=follow)

    def op_utime(self, path, ns, follow):
        os.utime(self.p(path), ns=ns, follow_symlinks=follow)
        st = os.stat(self.p(path), follow_symlinks=follow)
        return st.st_atime_ns, st.st_mtime_ns

    def op_setxattr(self, where, name, value, flags):
        os.setxattr(self.target(where), name, value, flags)

    def op_getxattr(self, where, name):
        return os.getxattr(self.target(where), name)

    def op_listxattr(self, where):
        return user_xattrs(self.target(where))

    def op_removexattr(self, where, name):
        os.removexattr(self.target(where), name)

    def op_setfacl(self, where, default, value, flags, follow=True):
        """setfacl (setxattr of an ACL, which the kernel checks: a malformed one is EINVAL)."""
        os.setxattr(self.target(where), ACL_DEFAULT if default else ACL_ACCESS, value, flags,
                    follow_symlinks=follow)

    def op_getfacl(self, where, default, follow=True):
        return acl_text(os.getxattr(self.target(where), ACL_DEFAULT if default else ACL_ACCESS,
                                    follow_symlinks=follow))

    def op_removefacl(self, where, default, follow=True):
        os.removexattr(self.target(where), ACL_DEFAULT if default else ACL_ACCESS,
                       follow_symlinks=follow)


def assert_same_trees(ours: Side, ref: Side, context: str) -> None:
    """Whole trees (``Side.snapshot``) equal, or an AssertionError listing each difference."""
    mine, theirs = ours.snapshot(), ref.snapshot()
    if mine != theirs:
        diff = {key: (mine.get(key), theirs.get(key)) for key in sorted({*mine, *theirs})
                if mine.get(key) != theirs.get(key)}
        raise AssertionError(f"{context}: trees differ (razorfs, ext4):\n" + "\n".join(
            f"  {key!r}: {pair[0]!r}\n  {' ' * len(repr(key))}  {pair[1]!r}"
            for key, pair in diff.items()))


def touched(op: dict) -> tuple[list[str], list[int]]:
    """Paths and slots whose attributes to compare after ``op``."""
    paths = [op[k] for k in ("path", "path2") if k in op]
    where = op.get("where")
    paths += [where] if isinstance(where, str) else []
    slots = [op[k] for k in ("slot", "slot2") if k in op]
    slots += [where] if isinstance(where, int) else []
    return paths, slots


def post_state(side: Side, op: dict) -> tuple:
    """lstat (and the ACLs) of the op's paths and fstat of its slot, after the op."""
    paths, slots = touched(op)
    return (tuple(outcome(lambda p=p: attrs(os.lstat(side.p(p)))) for p in paths)
            + tuple(acls(side.p(p)) for p in paths if not os.path.islink(side.p(p)))
            + tuple(outcome(lambda s=s: attrs(os.fstat(side.fds[s]))) for s in slots
                    if side.fds[s] is not None))


CLOCK_REALTIME_COARSE = 5  # linux/time.h: the clock tick filesystems stamp times with


def stamps(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_mtime_ns, st.st_ctime_ns


def fine_grained_ctime(directory) -> bool:
    """True if a change right after a stat always gets a later ctime in ``directory``
    (Linux >= 6.13 multigrain timestamps: ext4, xfs, btrfs, tmpfs), so that a change is seen
    without waiting for the coarse clock to tick between two ops."""
    path = os.path.join(directory, ".clock-probe")
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
    try:
        for mode in (0o600, 0o644) * 20:
            ctime = os.fstat(fd).st_ctime_ns
            os.fchmod(fd, mode)
            if os.fstat(fd).st_ctime_ns == ctime:
                return False
        return True
    finally:
        os.close(fd)
        os.unlink(path)


class Stamps:
    """Which of mtime and ctime an op changed, of each inode it touched: its paths (the entries
    themselves, and what they lead to if they are symlinks), their parent directories and the
    files in its slots (``touched``). Built right before the op, holding the inodes behind its
    paths with O_PATH so that they are still seen after a rename or an unlink; ``changes()``
    right after it: ((role, "m", "c", "mc" or ""), ...), a role being the op's key ("path",
    "path2 parent", "where target", "slot2", ...). ``wait``: let the coarse clock tick past
    every ctime seen first (for kernels without fine-grained ctimes)."""

    def __init__(self, side: Side, op: dict, wait: bool = False) -> None:
        self.held: dict[str, int] = {}
        self.slots: dict[str, int] = {}
        try:
            for key in ("path", "path2", "where"):
                rel = op.get(key)
                if not isinstance(rel, str):
                    continue
                self._hold(key, side.p(rel), os.O_NOFOLLOW)
                if key in self.held and stat.S_ISLNK(os.fstat(self.held[key]).st_mode):
                    self._hold(key + " target", side.p(rel), 0)
                if rel:
                    self._hold(key + " parent", side.p(os.path.dirname(rel)), 0)
            if op["kind"] not in ("open", "close"):  # those replace or drop the slot's file
                for key in ("slot", "slot2", "where"):
                    slot = op.get(key)
                    if isinstance(slot, int) and side.fds[slot] is not None:
                        self.slots[key] = side.fds[slot]
            self.before = {role: stamps(fd) for role, fd in self.fds()}
        except BaseException:
            self.close()
            raise
        if wait and self.before:
            ctime = max(ctime for _, ctime in self.before.values())
            while time.clock_gettime_ns(CLOCK_REALTIME_COARSE) <= ctime:
                time.sleep(0.0002)

    def _hold(self, role: str, path: str, flags: int) -> None:
        try:
            self.held[role] = os.open(path, os.O_PATH | flags)
        except OSError:
            pass  # nothing there (yet): nothing to compare

    def fds(self):
        return [*self.held.items(), *self.slots.items()]

    def close(self) -> None:
        held, self.held = self.held, {}
        for fd in held.values():
            os.close(fd)

    def changes(self) -> tuple:
        try:
            result = []
            for role, fd in self.fds():
                (mtime, ctime), (old_mtime, old_ctime) = stamps(fd), self.before[role]
                result.append((role, ("m" if mtime != old_mtime else "")
                               + ("c" if ctime != old_ctime else "")))
            return tuple(result)
        finally:
            self.close()


# ---- the generator ----

WEIGHTS = {
    "open": 10, "close": 3, "write": 8, "pwrite": 9, "read": 5, "pread": 6, "lseek": 2,
    "ftruncate": 3, "truncate": 3, "copy_range": 2, "fstat": 3, "stat": 3, "lstat": 2,
    "fsync": 2, "rename": 8, "rename_flags": 4, "rename_subtree": 1, "link": 4, "unlink": 5,
    "symlink": 3, "readlink": 2, "mkdir": 5, "mknod": 1, "rmdir": 4, "listdir": 4, "chmod": 3,
    "chown": 2, "utime": 1, "setxattr": 6, "getxattr": 3, "listxattr": 2, "removexattr": 2,
    "setfacl": 4, "getfacl": 2, "removefacl": 1,
}


class Generator:
    """Draws ops from ``rng``, steered by the current tree of the reference side (a real
    filesystem, so deterministic: the same seed always yields the same ops)."""

    def __init__(self, rng: random.Random, ref: Side, skip=lambda op: False) -> None:
        self.rng = rng
        self.ref = ref
        self.skip = skip  # ops showing a known difference are drawn again
        self.kinds = list(WEIGHTS)
        self.weights = list(WEIGHTS.values())

    def next(self) -> dict:
        self.tree = self.ref.walk()
        while True:
            kind = self.rng.choices(self.kinds, self.weights)[0]
            op = getattr(self, "gen_" + kind)()
            if op is not None and not self.skip(op):
                return op

    # ---- argument pools ----

    def of_kind(self, kind: str) -> list[str]:
        return [p for p, k in self.tree.items() if k == kind]

    def new_path(self) -> str:
        """A name in an existing directory: often free, so creations mostly succeed."""
        dirs = [d for d in self.of_kind("d") if d.count("/") + 1 < MAX_DEPTH]
        names = NAMES if self.rng.random() < 0.98 else LONG_NAMES
        return os.path.join(self.rng.choice(["", "", *dirs]), self.rng.choice(names))

    def path(self, prefer: str | None = None) -> str:
        rng = self.rng
        preferred = self.of_kind(prefer) if prefer else []
        roll = rng.random()
        if preferred and roll < 0.5:
            return rng.choice(preferred)
        if self.tree and roll < 0.75:
            return rng.choice(list(self.tree))
        if roll < 0.95:
            return self.new_path()
        return "/".join(rng.choice(NAMES) for _ in range(rng.randint(1, 3)))

    def creation_path(self) -> str:
        return self.new_path() if self.rng.random() < 0.7 else self.path()

    def slot(self, *, open_only: bool = True) -> int | None:
        slots = [s for s in range(SLOTS) if self.ref.fds[s] is not None]
        if not open_only:
            return self.rng.randrange(SLOTS)
        return self.rng.choice(slots) if slots else None

    def where(self):
        slot = self.slot()
        if slot is not None and self.rng.random() < 0.2:
            return slot
        return self.path(prefer=self.rng.choice("fd"))

    def xattr_name(self) -> str:
        roll = self.rng.random()
        return (self.rng.choice(XATTRS) if roll < 0.9 else EMPTY_XATTR_NAME if roll < 0.95
                else FOREIGN_XATTR_NAME)

    def size(self) -> int:
        rng = self.rng
        return rng.choice((0, 1, 7, BS - 1, BS, BS + 1, 2 * BS, 3 * BS + 5,
                           rng.randint(1, 3 * BS + 100), rng.randint(1, 300)))

    def offset(self) -> int:
        rng = self.rng
        return rng.choice((0, 1, BS - 1, BS, 2 * BS - 3, rng.randint(0, 4 * BS),
                           rng.randint(0, 16 * BS), rng.randint(0, 600)))

    def data(self) -> bytes:
        size = self.size() or 1
        if self.rng.random() < 0.3:  # zeros too: a write of zeros must not read as a hole bug
            return bytes(size)
        return self.rng.randbytes(size)

    # ---- ops ----

    def gen_open(self):
        rng = self.rng
        # O_NONBLOCK: no effect on files and directories, and FIFOs never block the test
        flags = rng.choice((os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_RDWR)) | os.O_NONBLOCK
        if rng.random() < 0.6:
            flags |= os.O_CREAT | (os.O_EXCL if rng.random() < 0.3 else 0)
        for flag, chance in ((os.O_TRUNC, 0.15), (os.O_APPEND, 0.15), (os.O_DIRECTORY, 0.04),
                             (os.O_NOFOLLOW, 0.05)):
            flags |= flag if rng.random() < chance else 0
        path = self.creation_path() if flags & os.O_CREAT else self.path(prefer="f")
        return {"kind": "open", "path": path, "flags": flags,
                "mode": rng.choice(MODES), "slot": self.slot(open_only=False)}

    def gen_close(self):
        slot = self.slot()
        return None if slot is None else {"kind": "close", "slot": slot}

    def gen_write(self):
        slot = self.slot()
        return None if slot is None else {"kind": "write", "slot": slot, "data": self.data()}

    def gen_pwrite(self):
        slot = self.slot()
        return None if slot is None else {"kind": "pwrite", "slot": slot, "data": self.data(),
                                          "offset": self.offset()}

    def gen_read(self):
        slot = self.slot()
        return None if slot is None else {"kind": "read", "slot": slot, "size": self.size()}

    def gen_pread(self):
        slot = self.slot()
        return None if slot is None else {"kind": "pread", "slot": slot,
                                          "size": self.size() + self.rng.choice((0, 5 * BS)),
                                          "offset": self.offset()}

    def gen_lseek(self):
        slot = self.slot()
        if slot is None:
            return None
        whence = self.rng.choice((os.SEEK_SET, os.SEEK_CUR, os.SEEK_END))
        offset = self.offset() if whence == os.SEEK_SET else self.rng.randint(-BS, BS)
        return {"kind": "lseek", "slot": slot, "offset": offset, "whence": whence}

    def new_size(self) -> int:
        rng = self.rng
        return rng.choice((0, 1, BS - 1, BS, BS + 1, rng.randint(0, 6 * BS),
                           rng.randint(0, 64 * BS), 1 << 20, rng.randint(0, 100)))

    def gen_ftruncate(self):
        slot = self.slot()
        return None if slot is None else {"kind": "ftruncate", "slot": slot,
                                          "size": self.new_size()}

    def gen_copy_range(self):
        slot, slot2 = self.slot(), self.slot()
        if slot is None:
            return None
        return {"kind": "copy_range", "slot": slot, "slot2": slot2, "size": self.size(),
                "offset": self.offset(), "offset2": self.offset()}

    def gen_truncate(self):
        return {"kind": "truncate", "path": self.path(prefer="f"), "size": self.new_size()}

    def gen_fstat(self):
        slot = self.slot()
        return None if slot is None else {"kind": "fstat", "slot": slot}

    def gen_stat(self):
        return {"kind": "stat", "path": self.path()}

    def gen_lstat(self):
        return {"kind": "lstat", "path": self.path(prefer="l")}

    def gen_fsync(self):
        slot = self.slot()
        return None if slot is None else {"kind": "fsync", "slot": slot,
                                          "data_only": self.rng.random() < 0.3}

    def gen_rename(self, flags: int = 0):
        rng = self.rng
        source = self.path(prefer=rng.choice("fd"))
        target = (self.creation_path() if rng.random() < 0.4
                  else self.path(prefer=rng.choice("fd")))
        return {"kind": "rename", "path": source, "path2": target, "flags": flags}

    def gen_rename_flags(self):
        return self.gen_rename(self.rng.choice((RENAME_NOREPLACE, RENAME_EXCHANGE)))

    def gen_rename_subtree(self):
        """A directory into itself or one of its descendants: EINVAL."""
        dirs = self.of_kind("d")
        if not dirs:
            return None
        source = self.rng.choice(dirs)
        inside = [d for d in dirs if d.startswith(source + "/")]
        target = os.path.join(self.rng.choice([source, *inside]), self.rng.choice(NAMES))
        flags = self.rng.choice((0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE))
        return {"kind": "rename", "path": source, "path2": target, "flags": flags}

    def gen_link(self):
        return {"kind": "link", "path": self.path(prefer=self.rng.choice("fl")),
                "path2": self.creation_path(), "follow": self.rng.random() < 0.5}

    def gen_unlink(self):
        return {"kind": "unlink", "path": self.path(prefer=self.rng.choice("fl"))}

    def gen_symlink(self):
        rng = self.rng
        target = rng.choice([*self.tree, *NAMES, "x/y"])  # relative to the link's directory
        return {"kind": "symlink", "target": target, "path": self.creation_path()}

    def gen_readlink(self):
        return {"kind": "readlink", "path": self.path(prefer="l")}

    def gen_mkdir(self):
        return {"kind": "mkdir", "path": self.creation_path(), "mode": self.rng.choice(
            (0o755, 0o755, 0o700, 0o2775, 0o1777, 0o3777, 0o555))}

    def gen_mknod(self):
        kind = self.rng.choice((stat.S_IFIFO, stat.S_IFSOCK))
        return {"kind": "mknod", "path": self.creation_path(),
                "mode": kind | self.rng.choice((0o644, 0o600))}

    def gen_rmdir(self):
        dirs = self.of_kind("d")
        empty = [d for d in dirs if not any(p.startswith(d + "/") for p in self.tree)]
        path = self.rng.choice(empty) if empty and self.rng.random() < 0.5 else self.path("d")
        return {"kind": "rmdir", "path": path}

    def gen_listdir(self):
        return {"kind": "listdir", "path": self.rng.choice(["", self.path(prefer="d")])}

    def gen_chmod(self):
        return {"kind": "chmod", "where": self.where(), "mode": self.rng.choice(MODES)}

    def gen_chown(self):
        rng = self.rng
        return {"kind": "chown", "path": self.path(), "uid": rng.choice(IDS),
                "gid": rng.choice(IDS), "follow": rng.random() < 0.7}

    def gen_utime(self):
        rng = self.rng
        ns = (rng.randint(-2**31, 2**33) * 10**9 + rng.randint(0, 10**9 - 1),  # 1901..2242
              rng.randint(-2**31, 2**33) * 10**9 + rng.choice((0, rng.randint(0, 10**9 - 1))))
        return {"kind": "utime", "path": self.path(), "ns": ns, "follow": rng.random() < 0.7}

    def gen_setxattr(self):
        rng = self.rng
        value = rng.choice((b"", rng.randbytes(rng.randint(1, 200)), b"v"))
        flags = rng.choice((0, 0, os.XATTR_CREATE, os.XATTR_REPLACE))
        return {"kind": "setxattr", "where": self.where(), "name": self.xattr_name(),
                "value": value, "flags": flags}

    def gen_getxattr(self):
        return {"kind": "getxattr", "where": self.where(), "name": self.xattr_name()}

    def gen_listxattr(self):
        return {"kind": "listxattr", "where": self.where()}

    def gen_removexattr(self):
        return {"kind": "removexattr", "where": self.where(), "name": self.xattr_name()}

    def acl_op(self, kind: str) -> dict:
        """An ACL op on a file or directory (default ACLs mostly on directories), now and then
        a path not followed (a symlink: EOPNOTSUPP)."""
        rng = self.rng
        default = rng.random() < 0.4
        where = self.where() if not default or rng.random() < 0.1 else self.path(prefer="d")
        op = {"kind": kind, "where": where, "default": default}
        if isinstance(where, str) and rng.random() < 0.1:
            op["follow"] = False
        return op

    def gen_setfacl(self):
        return {**self.acl_op("setfacl"), "value": self.acl(),
                "flags": self.rng.choice((0, 0, 0, os.XATTR_CREATE, os.XATTR_REPLACE))}

    def gen_getfacl(self):
        return self.acl_op("getfacl")

    def gen_removefacl(self):
        return self.acl_op("removefacl")

    def acl(self) -> bytes:
        """A well-formed ACL mostly (with or without named users and groups and a mask), else
        one the kernel refuses or takes as "no ACL" (empty: removes it)."""
        rng = self.rng
        roll = rng.random()
        perm = lambda: rng.randrange(8)  # noqa: E731
        if roll < 0.03:
            return rng.choice((b"", acl_value(())))  # no entries: removal
        if roll < 0.12:
            return rng.choice((
                acl_value(((USER_OBJ, 7), (GROUP_OBJ, 5), (OTHER, 0)), version=1),
                acl_value(((USER_OBJ, 7), (GROUP_OBJ, 5), (OTHER, 0)))[:-2],
                acl_value(((USER_OBJ, 7), (USER, 7, 1001), (GROUP_OBJ, 5), (OTHER, 0))),
                acl_value(((GROUP_OBJ, 5), (USER_OBJ, 7), (OTHER, 0))),
                acl_value(((USER_OBJ, 8), (GROUP_OBJ, 5), (OTHER, 0))),
                acl_value(((USER_OBJ, 7), (GROUP_OBJ, 5), (MASK, 7))),
            ))
        users = sorted(rng.sample(ACL_USERS, rng.choice((0, 0, 1, 2))))
        groups = sorted(rng.sample(ACL_GROUPS, rng.choice((0, 0, 1, 2))))
        entries = [(USER_OBJ, perm()), *((USER, perm(), u) for u in users), (GROUP_OBJ, perm()),
                   *((GROUP, perm(), g) for g in groups)]
        if users or groups or rng.random() < 0.3:
            entries.append((MASK, perm()))
        return acl_value((*entries, (OTHER, perm())))
