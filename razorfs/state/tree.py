"""The metadata state machine: inodes, directory entries, extent maps, xattrs.

``TreeState.apply`` is the only code that changes metadata. The tree manager calls it for each
operation it decides; recovery calls it for each operation it replays from the WAL. So a replay
reproduces exactly the state that was served before the crash. Nothing here does I/O or knows
about trio. The checkpoint codec and the incremental capture are in ``snapshot``.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import operator
import stat
from array import array
from bisect import bisect_left, bisect_right
from contextlib import contextmanager
from types import MappingProxyType
from typing import NamedTuple

from razorfs.state import redo
from razorfs.storage.formats import BLOCK_SIZE

ROOT_INO = 1
CRC_MASK = 0xFFFFFFFF
# The extent map of every empty regular file (most files of a big tree), instead of an empty
# dict each; read-only, so that a write meant for one file fails instead of reaching them all.
NO_EXTENTS = MappingProxyType({})

# ext4's timestamp range (256-byte inodes, its default): seconds from -2**31 to 2**34 - 2**31 - 1.
# A time outside is kept as the nearest bound without nanoseconds, as the kernel's
# timestamp_truncate does for ext4.
TIME_MIN_S = -(1 << 31)
TIME_MAX_S = (1 << 34) - (1 << 31) - 1
_TIME_LOW_NS = (TIME_MIN_S + 1) * 10**9  # from here up to _TIME_HIGH_NS a time stays as it is
_TIME_HIGH_NS = TIME_MAX_S * 10**9


def clamp_time_ns(ns: int) -> int:
    """``ns`` (a time in ns since the epoch, any size) as ext4 stores it."""
    if _TIME_LOW_NS <= ns < _TIME_HIGH_NS:
        return ns
    return TIME_MIN_S * 10**9 if ns < _TIME_LOW_NS else TIME_MAX_S * 10**9


@contextmanager
def collector_paused():
    """Building or serialising a big state makes millions of container objects, and the cyclic
    collector would traverse the growing tree again and again; nothing built here forms garbage
    cycles, so the collector waits until the end."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Attr(NamedTuple):
    """Attributes of an inode as they are answered (and travel in actor replies)."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int  # 512-byte units actually allocated
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


class ReplayError(Exception):
    """A redo operation that does not fit the state: the log or checkpoint is inconsistent."""


# readdir positions: "." and ".." come first, at cookies of their own that no name takes
DOT_COOKIE, DOTDOT_COOKIE = 1, 2
FIRST_NAME_COOKIE = 3


def name_cookie(name: bytes) -> int:
    """A name's readdir position: 62 bits of its hash, from FIRST_NAME_COOKIE on (fits a
    signed off_t)."""
    return ((int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "little") >> 2)
            + FIRST_NAME_COOKIE)


def _times_shared(atime_ns: int, mtime_ns: int, ctime_ns: int) -> tuple[int, int, int]:
    """The three timestamps, equal ones as one int object: a file created and never changed
    has the same three."""
    if mtime_ns == atime_ns:
        mtime_ns = atime_ns
    if ctime_ns == mtime_ns:
        ctime_ns = mtime_ns
    elif ctime_ns == atime_ns:
        ctime_ns = atime_ns
    return atime_ns, mtime_ns, ctime_ns


class Directory:
    """Entries of one directory, with readdir cookies that stay valid while it changes.

    A name's cookie is its hash (like ext4's htree order), so it does not depend on when the
    name was inserted: an entry replaced by a rename, or removed and created again, keeps its
    place, and a readdir that resumes after a cookie never returns a name twice. ``order``
    holds the cookies sorted, so resuming is one bisect, and ``names_in_order`` the name of
    each. Two names with the same hash (about one chance in 2**31 for a directory of a million
    names) take the next free cookie; ``displaced`` keeps the cookie of such names, every other
    name's cookie is recomputed when needed: a per-entry dict of cookies would cost more than
    the rest of the entry.

    ``hash_name`` is ``name_cookie`` but for tests, which give a hash with few values to make
    names collide.
    """

    __slots__ = ("names", "order", "names_in_order", "displaced", "hash_name")

    def __init__(self, hash_name=None) -> None:
        self.hash_name = hash_name or name_cookie
        self.names: dict[bytes, int] = {}
        # raw 64-bit cookies: an int object each would cost 36 bytes more per entry
        self.order = array("Q")
        self.names_in_order: list[bytes] = []
        self.displaced: dict[bytes, int] | None = None

    def cookie(self, name: bytes) -> int:
        """The cookie of ``name``, an entry of this directory."""
        if self.displaced is not None and name in self.displaced:
            return self.displaced[name]
        return self.hash_name(name)

    def put(self, name: bytes, ino: int) -> None:
        if name not in self.names:
            order = self.order
            cookie = self.hash_name(name)
            position = bisect_left(order, cookie)
            if position < len(order) and order[position] == cookie:
                # taken: the next free one (taken cookies are consecutive in ``order``)
                while position < len(order) and order[position] == cookie:
                    cookie += 1
                    position += 1
                if self.displaced is None:
                    self.displaced = {}
                self.displaced[name] = cookie
            order.insert(position, cookie)
            # a slice assignment moves the tail with memmove, list.insert item by item (twice
            # as long in a directory of 100,000 names)
            self.names_in_order[position:position] = (name,)
        self.names[name] = ino

    def fill(self, entries) -> None:
        """Add (name, ino) ``entries`` to an empty directory, as ``put`` of each in turn would.
        A checkpoint lists them in cookie order, so unless two names collide their hashes
        are the cookies already sorted: then no bisect or insert per entry (loading a
        checkpoint)."""
        names = self.names
        names.update(entries)
        if len(names) == len(entries):
            in_order = list(names)
            order = array("Q", map(self.hash_name, in_order))
            if all(map(operator.lt, order, itertools.islice(order, 1, None))):
                self.order, self.names_in_order = order, in_order
                return
        names.clear()
        for name, ino in entries:
            self.put(name, ino)

    def drop(self, name: bytes) -> None:
        del self.names[name]
        if self.displaced is not None and name in self.displaced:
            cookie = self.displaced.pop(name)
            if not self.displaced:
                self.displaced = None
        else:
            cookie = self.hash_name(name)
        position = bisect_left(self.order, cookie)
        del self.order[position]
        del self.names_in_order[position]

    def after(self, cookie: int):
        """(cookie, name, ino) of entries with a cookie greater than ``cookie``."""
        order, names_in_order = self.order, self.names_in_order
        for position in range(bisect_right(order, cookie), len(order)):
            name = names_in_order[position]
            yield order[position], name, self.names[name]


class Inode:
    __slots__ = ("ino", "mode", "nlink", "uid", "gid", "rdev", "size", "atime_ns", "mtime_ns",
                 "ctime_ns", "blocks", "directory", "target", "xattrs", "parent", "lookups")

    def __init__(self, ino: int, mode: int) -> None:
        self.ino = ino
        self.mode = mode
        self.nlink = self.uid = self.gid = self.rdev = self.size = 0
        self.atime_ns = self.mtime_ns = self.ctime_ns = 0
        # lblk -> (pblk << 32) | crc32c of the block
        self.blocks: dict[int, int] | None = NO_EXTENTS if stat.S_ISREG(mode) else None
        self.directory = Directory() if stat.S_ISDIR(mode) else None
        self.target = b""
        self.xattrs: dict[bytes, bytes] | None = None
        self.parent = 0
        # kernel references (FUSE lookup count): not persistent, zero after every mount
        self.lookups = 0

    @property
    def is_dir(self) -> bool:
        return self.directory is not None

    def attr(self) -> Attr:
        allocated = len(self.blocks) * (BLOCK_SIZE // 512) if self.blocks is not None else 0
        return Attr(self.ino, self.mode, self.nlink, self.uid, self.gid, self.rdev, self.size,
                    allocated, self.atime_ns, self.mtime_ns, self.ctime_ns)

    def put_op(self, **changes) -> redo.PutInode:
        """A PutInode carrying this inode's attributes with ``changes`` applied."""
        fields = {name: getattr(self, name) for name in PUT_FIELDS}
        fields.update(changes)
        return redo.PutInode(**fields)


PUT_FIELDS = ("ino", "mode", "nlink", "uid", "gid", "rdev", "size", "atime_ns", "mtime_ns",
               "ctime_ns")


class TreeState:
    def __init__(self) -> None:
        self.inodes: dict[int, Inode] = {}
        self.next_ino = ROOT_INO + 1
        # the checkpoint being captured, if any (``snapshot.begin_capture``): apply tells it of
        # every change before making it, so that it stays exact
        self.capture = None
        self.capture_ids = itertools.count(1)
        # Attribute values repeated across many inodes (modes, owners, groups) as one int
        # object each; bounded, values beyond are kept as they come (``_share``).
        self.shared_values: dict[int, int] = {}
        # whether ``inodes`` iterates in inode number order (numbers only grow, so it does
        # unless an inode is created below another): a capture then need not sort them
        self.numbers_in_order = True

    @classmethod
    def fresh(cls, *, uid: int, gid: int, now_ns: int, mode: int = 0o755) -> TreeState:
        state = cls()
        state.apply(redo.PutInode(ROOT_INO, stat.S_IFDIR | mode, 2, uid, gid, 0, 0, now_ns,
                                  now_ns, now_ns))
        state.inodes[ROOT_INO].parent = ROOT_INO
        return state

    def get(self, ino: int) -> Inode:
        inode = self.inodes.get(ino)
        if inode is None:
            raise KeyError(ino)
        return inode

    SHARED_VALUES_MAX = 4096

    def _share(self, value: int) -> int:
        shared = self.shared_values.get(value)
        if shared is None:
            shared = value
            if len(self.shared_values) < self.SHARED_VALUES_MAX:
                self.shared_values[value] = value
        return shared

    # ---- the only mutation path ----

    def apply(self, op) -> list[int]:
        """Apply one redo operation; return the physical blocks it unmapped."""
        try:
            handler = _APPLY[type(op)]
        except KeyError:
            raise ReplayError(f"{type(op).__name__} is not a redo operation") from None
        try:
            if self.capture is not None:
                # Copy-on-write for the checkpoint being captured.
                self.capture.before(op, handler in CHANGES_PARENT)
            return handler(self, op)
        except (KeyError, AttributeError, TypeError, IndexError, ValueError) as exc:
            raise ReplayError(f"cannot apply {op!r:.200}: {exc!r}") from None

    def _put_inode(self, op: redo.PutInode) -> list[int]:
        inode = self.inodes.get(op.ino)
        if inode is None:
            if op.ino < self.next_ino and self.inodes:
                self.numbers_in_order = False
            inode = self.inodes[op.ino] = Inode(op.ino, op.mode)
            self.next_ino = max(self.next_ino, op.ino + 1)
        elif stat.S_IFMT(inode.mode) != stat.S_IFMT(op.mode):
            raise ReplayError(f"inode {op.ino} cannot change type")
        share = self._share
        inode.mode, inode.nlink, inode.uid, inode.gid = (share(op.mode), op.nlink,
                                                         share(op.uid), share(op.gid))
        inode.rdev, inode.size = op.rdev, op.size
        inode.atime_ns, inode.mtime_ns, inode.ctime_ns = _times_shared(
            op.atime_ns, op.mtime_ns, op.ctime_ns)
        return []

    def _drop_inode(self, op: redo.DropInode) -> list[int]:
        inode = self.inodes[op.ino]
        if inode.directory is not None and inode.directory.names:
            raise ReplayError(f"directory {op.ino} dropped while not empty")
        del self.inodes[op.ino]
        return [packed >> 32 for packed in inode.blocks.values()] if inode.blocks else []

    def _put_entry(self, op: redo.PutEntry) -> list[int]:
        child = self.inodes[op.ino]
        # the child's own number object (the op's would cost 32 bytes more per entry)
        self.inodes[op.parent].directory.put(op.name, child.ino)
        if child.is_dir:
            child.parent = op.parent
        return []

    def _drop_entry(self, op: redo.DropEntry) -> list[int]:
        self.inodes[op.parent].directory.drop(op.name)
        return []

    def _put_target(self, op: redo.PutTarget) -> list[int]:
        self.inodes[op.ino].target = op.target
        return []

    def _put_blocks(self, op: redo.PutBlocks) -> list[int]:
        inode = self.inodes[op.ino]
        blocks = inode.blocks
        flat = op.blocks
        if len(flat) % 3:
            raise ValueError("PutBlocks needs (lblk, pblk, crc) triples")
        if blocks is NO_EXTENTS and flat:
            blocks = inode.blocks = {}
        freed = []
        for i in range(0, len(flat), 3):
            old = blocks.get(flat[i])
            blocks[flat[i]] = (flat[i + 1] << 32) | flat[i + 2]
            if old is not None:
                freed.append(old >> 32)
        return freed

    def _truncate_blocks(self, op: redo.TruncateBlocks) -> list[int]:
        inode = self.inodes[op.ino]
        blocks = inode.blocks
        dropped = [lblk for lblk in blocks if lblk >= op.first_dropped]
        freed = [blocks.pop(lblk) >> 32 for lblk in dropped]
        if not blocks:
            inode.blocks = NO_EXTENTS
        return freed

    def _put_xattr(self, op: redo.PutXattr) -> list[int]:
        inode = self.inodes[op.ino]
        if inode.xattrs is None:
            inode.xattrs = {}
        inode.xattrs[op.name] = op.value
        return []

    def _drop_xattr(self, op: redo.DropXattr) -> list[int]:
        inode = self.inodes[op.ino]
        del inode.xattrs[op.name]
        if not inode.xattrs:
            inode.xattrs = None
        return []

    def end_capture(self) -> None:
        """Abandon the running capture, if any (its copies are dropped, apply stops copying)."""
        self.capture = None

    def used_blocks(self):
        """(pblk, ino, lblk, crc) of every mapped block."""
        for inode in self.inodes.values():
            if inode.blocks:
                for lblk, packed in inode.blocks.items():
                    yield packed >> 32, inode.ino, lblk, packed & CRC_MASK


_APPLY = {
    redo.PutInode: TreeState._put_inode,
    redo.DropInode: TreeState._drop_inode,
    redo.PutEntry: TreeState._put_entry,
    redo.DropEntry: TreeState._drop_entry,
    redo.PutTarget: TreeState._put_target,
    redo.PutBlocks: TreeState._put_blocks,
    redo.PutData: TreeState._put_blocks,  # the data is the block store's, on replay
    redo.TruncateBlocks: TreeState._truncate_blocks,
    redo.PutXattr: TreeState._put_xattr,
    redo.DropXattr: TreeState._drop_xattr,
}

CHANGES_PARENT = (TreeState._put_entry, TreeState._drop_entry)
