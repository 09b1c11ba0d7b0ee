"""The metadata state machine: inodes, directory entries, extent maps, xattrs.

``TreeState.apply`` is the only code that changes metadata. The tree manager calls it for each
operation it decides; recovery calls it for each operation it replays from the WAL. So a replay
reproduces exactly the state that was served before the crash. Nothing here does I/O or knows
about trio.
"""

from __future__ import annotations

import gc
import hashlib
import io
import itertools
import operator
import stat
import struct
import sys
from array import array
from bisect import bisect_left, bisect_right
from contextlib import contextmanager
from types import MappingProxyType

import msgpack

from razorfs.actors import messages as m
from razorfs.storage.formats import BLOCK_SIZE

ROOT_INO = 1
_BIG_ENDIAN = sys.byteorder == "big"  # checkpoints store extent maps little-endian
_CRC_MASK = 0xFFFFFFFF
_ONE_BLOCK = struct.Struct("<QQ")  # a one-block extent map in a checkpoint: lblk, packed
# The extent map of every empty regular file (most files of a big tree), instead of an empty
# dict each; read-only, so that a write meant for one file fails instead of reaching them all.
_NO_EXTENTS = MappingProxyType({})


@contextmanager
def collector_paused():
    """Building or serialising a big state makes millions of container objects, and the cyclic
    garbage collector, triggered every few hundred allocations, would traverse the growing
    tree again and again (a third of the time of loading a checkpoint). Nothing built here
    forms garbage cycles, so the collector waits until the end."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class ReplayError(Exception):
    """A redo operation that does not fit the state: the log or checkpoint is inconsistent."""


def name_cookie(name: bytes) -> int:
    """A name's readdir position: 62 bits of its hash (never 0, fits a signed off_t)."""
    return (int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "little") >> 2) + 1


def _times_shared(atime_ns: int, mtime_ns: int, ctime_ns: int) -> tuple[int, int, int]:
    """The three timestamps, equal ones as one int object (40 bytes each otherwise): a file
    created and never changed has the same three."""
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
        self.blocks: dict[int, int] | None = _NO_EXTENTS if stat.S_ISREG(mode) else None
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
        # the checkpoint being captured, if any (``begin_capture``); apply keeps it exact
        self.capture: SnapshotCapture | None = None
        self._capture_ids = itertools.count(1)
        # Attribute values repeated across millions of inodes (modes, owners, groups) as one
        # int object each: a distinct int costs 32 bytes. Bounded, as owners are: values
        # beyond are kept as they come (``_share``).
        self.shared_values: dict[int, int] = {}
        # whether ``inodes`` iterates in inode number order (numbers only grow, so it does
        # unless an inode is created below another): a capture then need not sort them
        self.numbers_in_order = True

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
                self.capture.before(op, handler in _CHANGES_PARENT)
            return handler(self, op)
        except (KeyError, AttributeError, TypeError, IndexError, ValueError) as exc:
            raise ReplayError(f"cannot apply {op!r:.200}: {exc!r}") from None

    def _put_inode(self, op: m.PutInode) -> list[int]:
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

    def _drop_inode(self, op: m.DropInode) -> list[int]:
        inode = self.inodes[op.ino]
        if inode.directory is not None and inode.directory.names:
            raise ReplayError(f"directory {op.ino} dropped while not empty")
        del self.inodes[op.ino]
        return [packed >> 32 for packed in inode.blocks.values()] if inode.blocks else []

    def _put_entry(self, op: m.PutEntry) -> list[int]:
        child = self.inodes[op.ino]
        # the child's own number object (the op's would cost 32 bytes more per entry)
        self.inodes[op.parent].directory.put(op.name, child.ino)
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
        inode = self.inodes[op.ino]
        blocks = inode.blocks
        flat = op.blocks
        if len(flat) % 3:
            raise ValueError("PutBlocks needs (lblk, pblk, crc) triples")
        if blocks is _NO_EXTENTS and flat:
            blocks = inode.blocks = {}
        freed = []
        for i in range(0, len(flat), 3):
            old = blocks.get(flat[i])
            blocks[flat[i]] = (flat[i + 1] << 32) | flat[i + 2]
            if old is not None:
                freed.append(old >> 32)
        return freed

    def _truncate_blocks(self, op: m.TruncateBlocks) -> list[int]:
        inode = self.inodes[op.ino]
        blocks = inode.blocks
        dropped = [lblk for lblk in blocks if lblk >= op.first_dropped]
        freed = [blocks.pop(lblk) >> 32 for lblk in dropped]
        if not blocks:
            inode.blocks = _NO_EXTENTS
        return freed

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
        """The checkpoint body: msgpack of (next_ino, [record of each inode, by inode number]).

        Records are packed one by one and concatenated (the same bytes as packing the whole
        list at once), in inode number order, so that ``SnapshotCapture`` can produce exactly
        these bytes in chunks."""
        pack = _packer()
        inodes = self.inodes
        with collector_paused():
            numbers = sorted(inodes)
            parts = [_body_head(pack, self.next_ino, len(numbers))]
            parts.extend([pack(_record(inodes[ino])) for ino in numbers])
            return b"".join(parts)

    def begin_capture(self, lsn: int) -> SnapshotCapture:
        """Start capturing the snapshot of the state as it is now (as of ``lsn``), to be read
        in chunks with ``SnapshotCapture.next_chunk`` while ``apply`` goes on changing the
        state. Replaces (abandons) any capture still running: one at a time."""
        self.capture = SnapshotCapture(self, lsn, next(self._capture_ids))
        return self.capture

    def end_capture(self) -> None:
        """Abandon the running capture, if any (its copies are dropped, apply stops copying)."""
        self.capture = None

    @classmethod
    def from_snapshot(cls, body: bytes) -> TreeState:
        """The state a checkpoint body holds. Written for speed (it is most of the mount time of
        a big filesystem): inodes are built without ``Inode.__init__``'s defaults, one-block
        files without an array, and each directory's cookies are computed once per entry,
        already sorted.

        Records are unpacked one at a time, not the whole body at once: the temporary objects
        of a record (its tuples, repeated values) are then freed in time for the next record to
        reuse their memory, instead of leaving holes between the objects the state keeps, which
        the process would hold for good (340 bytes per inode at a million, a third of the total).
        They are read from the body a megabyte at a time, not from a whole copy of it: once the
        checkpoint file's bytes are freed, glibc puts a block that big in its heap, and the copy
        would leave a hole there that the process keeps (60 bytes per inode at 200,000)."""
        limit = max(len(body), 1)  # no part of the body is longer than the body
        unpacker = msgpack.Unpacker(io.BytesIO(body), read_size=min(1 << 20, limit),
                                    max_buffer_size=limit, raw=False, use_list=False,
                                    strict_map_key=False)
        with collector_paused():
            try:
                if unpacker.read_array_header() != 2:
                    raise ValueError("a checkpoint body is a 2-array")
                next_ino = unpacker.unpack()
                count = unpacker.read_array_header()
            except msgpack.OutOfData:
                raise ValueError("checkpoint body truncated in its head") from None
            state, loaded = cls._from_records(next_ino, itertools.islice(unpacker, count))
            if loaded != count or unpacker.tell() != len(body):
                raise ValueError(f"checkpoint body of {count} records: {loaded} read, then "
                                 f"{len(body) - unpacker.tell()} bytes left")
            state.inodes[ROOT_INO].parent = ROOT_INO
            numbers = list(state.inodes)  # records are by number since issue 5; check
            state.numbers_in_order = numbers == sorted(numbers)
            return state

    @classmethod
    def _from_records(cls, next_ino: int, records) -> tuple[TreeState, int]:
        """The state, and how many records there were."""
        state = cls()
        inodes = state.inodes
        new_inode = Inode.__new__
        directories = []
        one_block = _ONE_BLOCK.unpack
        # as _share does, without its bound: for the load only (and a C call per value)
        shared = state.shared_values.setdefault
        # The number object of each entry read so far, for the record of its inode to use: two
        # objects of one number would cost 32 bytes, and the record's, dropped right away, leaves
        # no hole between kept objects as the entry's would later. A directory's record usually
        # comes before its children's (it was created first, numbers only grow); when not, the
        # child keeps its own object.
        entry_numbers: dict[int, int] = {}
        loaded = 0
        for ino, mode, nlink, uid, gid, rdev, size, atime, mtime, ctime, content, xattrs in records:
            loaded += 1
            ino = entry_numbers.pop(ino, ino)
            inode = new_inode(Inode)
            inode.ino, inode.mode, inode.nlink = ino, shared(mode, mode), nlink
            inode.uid, inode.gid = shared(uid, uid), shared(gid, gid)
            inode.rdev, inode.size = rdev, size
            # _times_shared, inline: a call per record costs 0.1 s at a million inodes
            if mtime == atime:
                mtime = atime
            if ctime == mtime:
                ctime = mtime
            elif ctime == atime:
                ctime = atime
            inode.atime_ns, inode.mtime_ns, inode.ctime_ns = atime, mtime, ctime
            inode.xattrs = dict(xattrs) if xattrs else None
            inode.parent = inode.lookups = 0
            inode.target = b""
            inode.directory = inode.blocks = None
            kind = stat.S_IFMT(mode)
            if kind == stat.S_IFDIR:
                inode.directory = Directory()
                inode.directory.fill(content)
                directories.append(inode)
                children = inode.directory.names.values()
                entry_numbers.update(zip(children, children))
            elif kind == stat.S_IFREG:
                if len(content) == _ONE_BLOCK.size:
                    lblk, packed = one_block(content)
                    inode.blocks = {lblk: packed}
                elif content:
                    flat = array("Q")
                    flat.frombytes(content)
                    if _BIG_ENDIAN:
                        flat.byteswap()
                    inode.blocks = dict(zip(flat[0::2], flat[1::2]))
                else:
                    inode.blocks = _NO_EXTENTS
            else:
                inode.target = content
            inodes[ino] = inode
        for inode in directories:
            for child in inode.directory.names.values():
                child_inode = inodes.get(child)  # fsck reports dangling entries
                if child_inode is not None and child_inode.directory is not None:
                    child_inode.parent = inode.ino
        state.next_ino = next_ino
        return state, loaded

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

_CHANGES_PARENT = (TreeState._put_entry, TreeState._drop_entry)


# ---- checkpoint bodies, whole or in chunks ----
#
# A record is the msgpack array (ino, mode, nlink, uid, gid, rdev, size, atime_ns, mtime_ns,
# ctime_ns, content, xattrs); content is a directory's [(name, ino), ...] in cookie order, a
# file's extent map as little-endian uint64 pairs (lblk, (pblk << 32) | crc) in bytes, or a
# symlink's target. ``lookups`` (kernel references) and ``parent`` (derived from the entries)
# are not part of it.

_RECORD_HEAD = b"\x9c"  # msgpack fixarray of 12 items


def _packer():
    """A packer for one thread (a msgpack Packer keeps a buffer: never share one)."""
    return msgpack.Packer(use_bin_type=True).pack


def _array_header(count: int) -> bytes:
    if count < 16:
        return bytes((0x90 | count,))
    if count < 1 << 16:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


def _bin_header(length: int) -> bytes:
    if length < 1 << 8:
        return b"\xc4" + bytes((length,))
    if length < 1 << 16:
        return b"\xc5" + length.to_bytes(2, "big")
    return b"\xc6" + length.to_bytes(4, "big")


def _body_head(pack, next_ino: int, count: int) -> bytes:
    """What precedes the records: a 2-array (next_ino, records) and the records' array."""
    return b"\x92" + pack(next_ino) + _array_header(count)


def _entries(directory: Directory) -> list[tuple[bytes, int]]:
    names = directory.names_in_order
    return list(zip(names, map(directory.names.__getitem__, names)))


def _extents(pairs) -> bytes:
    """An extent map's content: ``pairs`` is an iterable of (lblk, packed) pairs."""
    flat = array("Q", itertools.chain.from_iterable(pairs))
    if _BIG_ENDIAN:
        flat.byteswap()
    return flat.tobytes()


def _cost(inode: Inode) -> int:
    """The work of serialising ``inode``, in small records (measured: an entry costs about
    half a record, mostly dict lookups in random order; an extent a sixteenth)."""
    if inode.directory is not None:
        return 1 + len(inode.directory.order) // SnapshotCapture.ENTRIES_PER_UNIT
    if inode.blocks is not None:
        return 1 + len(inode.blocks) // SnapshotCapture.EXTENTS_PER_UNIT
    return 1


def _attributes(inode: Inode) -> tuple:
    return (inode.ino, inode.mode, inode.nlink, inode.uid, inode.gid, inode.rdev, inode.size,
            inode.atime_ns, inode.mtime_ns, inode.ctime_ns)


def _record(inode: Inode) -> tuple:
    if inode.directory is not None:
        content = _entries(inode.directory)
    elif inode.blocks is not None:
        blocks = inode.blocks
        content = (_ONE_BLOCK.pack(*next(iter(blocks.items()))) if len(blocks) == 1
                   else _extents(blocks.items()))
    else:
        content = inode.target
    return (*_attributes(inode), content, inode.xattrs)


def _frozen_copy(inode: Inode) -> Inode:
    """What a record of ``inode`` needs, copied so that the original can change; only for
    serialising: ``parent`` and ``lookups`` are not kept. A directory's entries are not copied
    (a million-entry directory would take too long): the copy shares the live ``Directory``,
    and ``SnapshotCapture`` keeps the prior state of each entry changed instead."""
    copy = Inode.__new__(Inode)
    for name in _PUT_FIELDS:
        setattr(copy, name, getattr(inode, name))
    copy.target = inode.target
    copy.parent = copy.lookups = 0
    copy.xattrs = None if inode.xattrs is None else dict(inode.xattrs)
    blocks = inode.blocks
    # the shared empty map cannot change: no copy (an empty dict of the file's own can)
    copy.blocks = blocks if blocks is None or blocks is _NO_EXTENTS else dict(blocks)
    copy.directory = inode.directory
    return copy


class SnapshotCapture:
    """The checkpoint body as of one LSN, produced in chunks while the state keeps changing.

    At the start it takes only the inode numbers existing then, sorted (``to_snapshot``'s
    record order), and ``next_ino``. Records are then produced in that order, a chunk at a
    time; ``low`` is the number of the first record not completely produced, ``end`` the first
    number that did not exist at the start (numbers only grow: inodes created later are not in
    the capture). Copy-on-write keeps the result exact: before ``TreeState.apply`` changes an
    inode numbered from ``low`` to ``end``, ``before`` keeps what the op is about to change:

    * attributes, xattrs, extent map, symlink target: a copy of the inode (``saved``), once;
    * a directory's entries: the prior (ino, cookie) of each name changed, or None when the name
      did not exist (``prior``), once per name; the entries as of the start are then the live
      ones whose name has no prior, plus the priors, in cookie order. This costs per change, not
      per entry: copying a directory of a million entries would hold everything up.

    An inode dropped since was copied first, so the concatenated chunks are exactly
    ``to_snapshot()`` of the state at the start. A record with many entries or extents (more
    than a chunk's worth) is produced in pieces across chunks; until it is complete its inode
    counts as not yet serialised (it is ``low``), so changes in between are kept as above and
    the remaining pieces come from the state as of the start.
    """

    ENTRIES_PER_UNIT = 2  # directory entries costing about one small record
    EXTENTS_PER_UNIT = 16  # extents costing about one small record

    def __init__(self, state: TreeState, lsn: int, ident: int) -> None:
        self.lsn = lsn
        self.ident = ident
        self._state = state
        self._pack = _packer()
        # An array, not a list: a list of a million ints would be walked by every young
        # collection for as long as the capture lasts. Sorted only if need be (it takes twice
        # as long as the copy).
        numbers = array("Q", state.inodes)
        if not state.numbers_in_order:
            with collector_paused():
                numbers = array("Q", sorted(numbers))
        self._numbers = numbers
        self._position = 0
        self.end = state.next_ino
        self.low = numbers[0] if numbers else self.end
        self.saved: dict[int, Inode] = {}
        self.prior: dict[int, dict[bytes, tuple[int, int] | None]] = {}
        self._head: bytes | None = _body_head(self._pack, state.next_ino, len(numbers))
        self._pieces = None  # generator of the record being produced in pieces
        self._budget = 1000

    @property
    def done(self) -> bool:
        return self._position >= len(self._numbers)

    def before(self, op, changes_entry: bool) -> None:
        """Keep what ``op`` (about to be applied) changes, if the capture still needs it."""
        if changes_entry:
            if self.low <= op.parent < self.end:
                directory = self._state.inodes.get(op.parent)
                if directory is not None and directory.directory is not None:
                    prior = self.prior.setdefault(op.parent, {})
                    if op.name not in prior:
                        ino = directory.directory.names.get(op.name)
                        prior[op.name] = (None if ino is None
                                          else (ino, directory.directory.cookie(op.name)))
        elif self.low <= op.ino < self.end and op.ino not in self.saved:
            inode = self._state.inodes.get(op.ino)
            if inode is not None:
                self.saved[op.ino] = _frozen_copy(inode)

    def next_chunk(self, budget: int) -> tuple[bool, bytes]:
        """About ``budget`` units of work (a small record is one unit, so are
        ``ENTRIES_PER_UNIT`` entries or ``EXTENTS_PER_UNIT`` extents): (whether this was the
        last chunk, its bytes). Once the last chunk is out, the capture detaches itself."""
        budget = self._budget = max(1, budget)
        parts = []
        if self._head is not None:
            parts.append(self._head)
            self._head = None
        numbers, saved, prior = self._numbers, self.saved, self.prior
        inodes, pack = self._state.inodes, self._pack
        spent = 0
        while spent < budget and self._position < len(numbers):
            if self._pieces is None:
                ino = numbers[self._position]
                inode = saved.get(ino) or inodes[ino]
                cost = _cost(inode)
                if cost <= budget and ino not in prior:
                    parts.append(pack(_record(inode)))
                    spent += cost
                    self._advance()
                    continue
                self._pieces = self._record_pieces(ino)
            piece = next(self._pieces, None)
            if piece is None:
                self._pieces = None
                self._advance()
            else:
                parts.append(piece[0])
                spent += piece[1]
        if self.done and self._state.capture is self:
            self._state.capture = None
        return self.done, b"".join(parts)

    def _advance(self) -> None:
        ino = self._numbers[self._position]
        self.saved.pop(ino, None)
        self.prior.pop(ino, None)
        self._position += 1
        self.low = self._numbers[self._position] if not self.done else self.end

    def _source(self, ino: int) -> Inode:
        """The inode as of the capture's LSN (entries aside): its copy if it changed since."""
        return self.saved.get(ino) or self._state.inodes[ino]

    def _record_pieces(self, ino: int):
        """(bytes, cost) of one record, a slice of its entries or extents at a time."""
        pack = self._pack
        inode = self._source(ino)
        head = _RECORD_HEAD + pack(_attributes(inode))[1:]  # fixarray 10 → 12: content, xattrs
        if inode.directory is not None:
            yield head + _array_header(self._entry_count(ino, inode.directory)), 1
            after = 0  # cookies are >= 1
            while after is not None:
                entries, after = self._entries_after(ino, inode.directory, after)
                yield (pack(entries)[len(_array_header(len(entries))):],
                       1 + len(entries) // self.ENTRIES_PER_UNIT)
        else:
            # A dict has no positions to resume at: iterate it, and when it changes (it was
            # copied first) resume on the copy, which has the same order, after as many.
            blocks = inode.blocks
            total = len(blocks)
            yield head + _bin_header(16 * total), 1
            pairs, done = iter(blocks.items()), 0
            while done < total:
                current = self._source(ino).blocks
                if current is not blocks:
                    blocks = current
                    pairs = itertools.islice(iter(blocks.items()), done, None)
                count = min(self._budget * self.EXTENTS_PER_UNIT, total - done)
                yield _extents(itertools.islice(pairs, count)), 1 + count // self.EXTENTS_PER_UNIT
                done += count
        yield pack(self._source(ino).xattrs), 1

    def _entry_count(self, ino: int, directory: Directory) -> int:
        prior = self.prior.get(ino)
        if not prior:
            return len(directory.names)
        names = directory.names
        return (len(names) - sum(name in names for name in prior)
                + sum(entry is not None for entry in prior.values()))

    def _entries_after(self, ino: int, directory: Directory, after: int) -> tuple[list, int]:
        """(entries, cursor): the (name, ino) entries of the directory as of the capture whose
        cookie is greater than ``after`` and at most ``cursor``, in cookie order, about a slice
        of them; ``cursor`` is None when no entry is left after these."""
        order, prior = directory.order, self.prior.get(ino)
        start = bisect_right(order, after)
        # a changed directory costs about twice as much per entry: half the slice
        cookies = order[start:start + self._budget * self.ENTRIES_PER_UNIT // (1 + bool(prior))]
        more = start + len(cookies) < len(order)
        names = directory.names_in_order[start:start + len(cookies)]
        children = directory.names
        if not prior:
            return list(zip(names, map(children.__getitem__, names))), cookies[-1] if more else None
        upper = cookies[-1] if more else 1 << 64
        restored = [(entry[1], name, entry[0]) for name, entry in prior.items()
                    if entry is not None and after < entry[1] <= upper]
        if not restored:
            return ([(name, children[name]) for name in names if name not in prior],
                    upper if more else None)
        entries = [(cookie, name, children[name])
                   for cookie, name in zip(cookies, names) if name not in prior]
        entries.extend(restored)
        entries.sort()  # two sorted runs: one merge pass
        return [(name, child) for _, name, child in entries], (upper if more else None)
