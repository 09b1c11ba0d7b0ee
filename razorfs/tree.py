"""The metadata state machine: inodes, directory entries, extent maps, xattrs.

``TreeState.apply`` is the only code that changes metadata. The tree manager calls it for each
operation it decides; recovery calls it for each operation it replays from the WAL. So a replay
reproduces exactly the state that was served before the crash. Nothing here does I/O or knows
about trio.
"""

from __future__ import annotations

import hashlib
import stat
import sys
from array import array
from bisect import bisect_left, bisect_right, insort

import msgpack

from razorfs.actors import messages as m
from razorfs.storage.formats import BLOCK_SIZE

ROOT_INO = 1
_BIG_ENDIAN = sys.byteorder == "big"  # checkpoints store extent maps little-endian
_CRC_MASK = 0xFFFFFFFF


class ReplayError(Exception):
    """A redo operation that does not fit the state: the log or checkpoint is inconsistent."""


def name_cookie(name: bytes) -> int:
    """A name's readdir position: 62 bits of its hash (never 0, fits a signed off_t)."""
    return (int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "little") >> 2) + 1


class Directory:
    """Entries of one directory, with readdir cookies that stay valid while it changes.

    A name's cookie is its hash (like ext4's htree order), so it does not depend on when the
    name was inserted: an entry replaced by a rename, or removed and created again, keeps its
    place, and a readdir that resumes after a cookie never returns a name twice. ``order``
    holds the cookies sorted, so resuming is one bisect. Two names with the same hash (about
    one chance in 2**31 for a directory of a million names) take the next free cookie.
    """

    __slots__ = ("names", "cookies", "by_cookie", "order")

    def __init__(self) -> None:
        self.names: dict[bytes, int] = {}
        self.cookies: dict[bytes, int] = {}
        self.by_cookie: dict[int, bytes] = {}
        self.order: list[int] = []

    def put(self, name: bytes, ino: int) -> None:
        if name not in self.names:
            cookie = name_cookie(name)
            while cookie in self.by_cookie:
                cookie += 1
            self.cookies[name] = cookie
            self.by_cookie[cookie] = name
            insort(self.order, cookie)
        self.names[name] = ino

    def drop(self, name: bytes) -> None:
        del self.names[name]
        cookie = self.cookies.pop(name)
        del self.by_cookie[cookie]
        del self.order[bisect_left(self.order, cookie)]

    def after(self, cookie: int):
        """(cookie, name, ino) of entries with a cookie greater than ``cookie``."""
        order = self.order
        for position in range(bisect_right(order, cookie), len(order)):
            current = order[position]
            name = self.by_cookie[current]
            yield current, name, self.names[name]


class Inode:
    __slots__ = ("ino", "mode", "nlink", "uid", "gid", "rdev", "size", "atime_ns", "mtime_ns",
                 "ctime_ns", "blocks", "directory", "target", "xattrs", "parent", "lookups")

    def __init__(self, ino: int, mode: int) -> None:
        self.ino = ino
        self.mode = mode
        self.nlink = self.uid = self.gid = self.rdev = self.size = 0
        self.atime_ns = self.mtime_ns = self.ctime_ns = 0
        # lblk -> (pblk << 32) | crc32c of the block
        self.blocks: dict[int, int] | None = {} if stat.S_ISREG(mode) else None
        self.directory = Directory() if stat.S_ISDIR(mode) else None
        self.target = b""
        self.xattrs: dict[bytes, bytes] | None = None
        self.parent = 0
        # kernel references (FUSE lookup count): not persistent, zero after every mount
        self.lookups = 0

    @property
    def is_dir(self) -> bool:
        return self.directory is not None

    def attr(self) -> m.Attr:
        allocated = len(self.blocks) * (BLOCK_SIZE // 512) if self.blocks is not None else 0
        return m.Attr(self.ino, self.mode, self.nlink, self.uid, self.gid, self.rdev, self.size,
                allocated, self.atime_ns, self.mtime_ns, self.ctime_ns)

    def put_op(self, **changes) -> m.PutInode:
        """A PutInode carrying this inode's attributes with ``changes`` applied."""
        fields = {name: getattr(self, name) for name in _PUT_FIELDS}
        fields.update(changes)
        return m.PutInode(**fields)


_PUT_FIELDS = ("ino", "mode", "nlink", "uid", "gid", "rdev", "size", "atime_ns", "mtime_ns",
               "ctime_ns")


class TreeState:
    def __init__(self) -> None:
        self.inodes: dict[int, Inode] = {}
        self.next_ino = ROOT_INO + 1

    @classmethod
    def fresh(cls, *, uid: int, gid: int, now_ns: int, mode: int = 0o755) -> TreeState:
        state = cls()
        state.apply(m.PutInode(ROOT_INO, stat.S_IFDIR | mode, 2, uid, gid, 0, 0, now_ns, now_ns,
                               now_ns))
        state.inodes[ROOT_INO].parent = ROOT_INO
        return state

    def get(self, ino: int) -> Inode:
        inode = self.inodes.get(ino)
        if inode is None:
            raise KeyError(ino)
        return inode

    # ---- the only mutation path ----

    def apply(self, op) -> list[int]:
        """Apply one redo operation; return the physical blocks it unmapped."""
        try:
            handler = _APPLY[type(op)]
        except KeyError:
            raise ReplayError(f"{type(op).__name__} is not a redo operation") from None
        try:
            return handler(self, op)
        except (KeyError, AttributeError, TypeError, IndexError, ValueError) as exc:
            raise ReplayError(f"cannot apply {op!r:.200}: {exc!r}") from None

    def _put_inode(self, op: m.PutInode) -> list[int]:
        inode = self.inodes.get(op.ino)
        if inode is None:
            inode = self.inodes[op.ino] = Inode(op.ino, op.mode)
            self.next_ino = max(self.next_ino, op.ino + 1)
        elif stat.S_IFMT(inode.mode) != stat.S_IFMT(op.mode):
            raise ReplayError(f"inode {op.ino} cannot change type")
        for name in _PUT_FIELDS[1:]:
            setattr(inode, name, getattr(op, name))
        return []

    def _drop_inode(self, op: m.DropInode) -> list[int]:
        inode = self.inodes[op.ino]
        if inode.directory is not None and inode.directory.names:
            raise ReplayError(f"directory {op.ino} dropped while not empty")
        del self.inodes[op.ino]
        return [packed >> 32 for packed in inode.blocks.values()] if inode.blocks else []

    def _put_entry(self, op: m.PutEntry) -> list[int]:
        child = self.inodes[op.ino]
        self.inodes[op.parent].directory.put(op.name, op.ino)
        if child.is_dir:
            child.parent = op.parent
        return []

    def _drop_entry(self, op: m.DropEntry) -> list[int]:
        self.inodes[op.parent].directory.drop(op.name)
        return []

    def _put_target(self, op: m.PutTarget) -> list[int]:
        self.inodes[op.ino].target = op.target
        return []

    def _put_blocks(self, op: m.PutBlocks) -> list[int]:
        blocks = self.inodes[op.ino].blocks
        flat = op.blocks
        if len(flat) % 3:
            raise ValueError("PutBlocks needs (lblk, pblk, crc) triples")
        freed = []
        for i in range(0, len(flat), 3):
            old = blocks.get(flat[i])
            blocks[flat[i]] = (flat[i + 1] << 32) | flat[i + 2]
            if old is not None:
                freed.append(old >> 32)
        return freed

    def _truncate_blocks(self, op: m.TruncateBlocks) -> list[int]:
        blocks = self.inodes[op.ino].blocks
        dropped = [lblk for lblk in blocks if lblk >= op.first_dropped]
        return [blocks.pop(lblk) >> 32 for lblk in dropped]

    def _put_xattr(self, op: m.PutXattr) -> list[int]:
        inode = self.inodes[op.ino]
        if inode.xattrs is None:
            inode.xattrs = {}
        inode.xattrs[op.name] = op.value
        return []

    def _drop_xattr(self, op: m.DropXattr) -> list[int]:
        inode = self.inodes[op.ino]
        del inode.xattrs[op.name]
        if not inode.xattrs:
            inode.xattrs = None
        return []

    # ---- checkpoints ----

    def to_snapshot(self) -> bytes:
        records = []
        for inode in self.inodes.values():
            if inode.directory is not None:
                body = [(name, ino) for _, name, ino in inode.directory.after(0)]
            elif inode.blocks is not None:
                flat = array("Q")
                for lblk, packed in inode.blocks.items():
                    flat.append(lblk)
                    flat.append(packed)
                if _BIG_ENDIAN:
                    flat.byteswap()
                body = flat.tobytes()
            else:
                body = inode.target
            records.append((inode.ino, inode.mode, inode.nlink, inode.uid, inode.gid, inode.rdev,
                            inode.size, inode.atime_ns, inode.mtime_ns, inode.ctime_ns, body,
                            inode.xattrs))
        return msgpack.packb((self.next_ino, records), use_bin_type=True)

    @classmethod
    def from_snapshot(cls, body: bytes) -> TreeState:
        state = cls()
        next_ino, records = msgpack.unpackb(body, raw=False, use_list=False, strict_map_key=False)
        entries = []
        for record in records:
            ino, mode, *fields, content, xattrs = record
            inode = state.inodes[ino] = Inode(ino, mode)
            for name, value in zip(_PUT_FIELDS[2:], fields):
                setattr(inode, name, value)
            if inode.directory is not None:
                entries.append((inode, content))
            elif inode.blocks is not None:
                flat = array("Q")
                flat.frombytes(content)
                if _BIG_ENDIAN:
                    flat.byteswap()
                inode.blocks = dict(zip(flat[0::2], flat[1::2]))
            else:
                inode.target = content
            inode.xattrs = dict(xattrs) if xattrs else None
        for inode, content in entries:
            for name, child in content:
                inode.directory.put(name, child)
                child_inode = state.inodes.get(child)  # fsck reports dangling entries
                if child_inode is not None and child_inode.is_dir:
                    child_inode.parent = inode.ino
        state.inodes[ROOT_INO].parent = ROOT_INO
        state.next_ino = next_ino
        return state

    def used_blocks(self):
        """(pblk, ino, lblk, crc) of every mapped block."""
        for inode in self.inodes.values():
            if inode.blocks:
                for lblk, packed in inode.blocks.items():
                    yield packed >> 32, inode.ino, lblk, packed & _CRC_MASK


_APPLY = {
    m.PutInode: TreeState._put_inode,
    m.DropInode: TreeState._drop_inode,
    m.PutEntry: TreeState._put_entry,
    m.DropEntry: TreeState._drop_entry,
    m.PutTarget: TreeState._put_target,
    m.PutBlocks: TreeState._put_blocks,
    m.TruncateBlocks: TreeState._truncate_blocks,
    m.PutXattr: TreeState._put_xattr,
    m.DropXattr: TreeState._drop_xattr,
}
