"""The checkpoint body codec, and its incremental capture while the tree keeps changing.

The body is msgpack of (next_ino, [record of each inode, by inode number]). A record is the
msgpack array (ino, mode, nlink, uid, gid, rdev, size, atime_ns, mtime_ns, ctime_ns, content,
xattrs); content is a directory's [(name, ino), ...] in cookie order, a file's extent map as
little-endian uint64 pairs (lblk, (pblk << 32) | crc) in bytes, or a symlink's target.
``lookups`` (kernel references) and ``parent`` (derived from the entries) are not part of it.
The file around the body (header, CRCs) is ``razorfs.storage.formats``'s.
"""

from __future__ import annotations

import io
import itertools
import stat
import struct
import sys
from array import array
from bisect import bisect_right

import msgpack

from razorfs.state.tree import (
    NO_EXTENTS, PUT_FIELDS, ROOT_INO, Directory, Inode, TreeState, collector_paused)

_BIG_ENDIAN = sys.byteorder == "big"  # checkpoints store extent maps little-endian
_ONE_BLOCK = struct.Struct("<QQ")  # a one-block extent map: lblk, packed

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
    """The work of serialising ``inode``, in small records (an entry costs about half a record,
    mostly dict lookups in random order; an extent a sixteenth)."""
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
    for name in PUT_FIELDS:
        setattr(copy, name, getattr(inode, name))
    copy.target = inode.target
    copy.parent = copy.lookups = 0
    copy.xattrs = None if inode.xattrs is None else dict(inode.xattrs)
    blocks = inode.blocks
    # the shared empty map cannot change: no copy (an empty dict of the file's own can)
    copy.blocks = blocks if blocks is None or blocks is NO_EXTENTS else dict(blocks)
    copy.directory = inode.directory
    return copy


def encode(state: TreeState) -> bytes:
    """The checkpoint body of ``state``. Records are packed one by one and concatenated (the same
    bytes as packing the whole list at once), in inode number order, so that ``SnapshotCapture``
    can produce exactly these bytes in chunks."""
    pack = _packer()
    inodes = state.inodes
    with collector_paused():
        numbers = sorted(inodes)
        parts = [_body_head(pack, state.next_ino, len(numbers))]
        parts.extend([pack(_record(inodes[ino])) for ino in numbers])
        return b"".join(parts)


def decode(body: bytes) -> TreeState:
    """The state a checkpoint body holds. Written for speed (it is most of the mount time of
    a big filesystem): inodes are built without ``Inode.__init__``'s defaults, one-block files
    without an array, and each directory's cookies are computed once per entry, already sorted.

    Records are unpacked one at a time, read a megabyte at a time: the temporary objects of one
    record are freed in time for the next to reuse their memory, instead of leaving holes
    between the objects the state keeps, which the process would hold for good."""
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
        state, loaded = _from_records(next_ino, itertools.islice(unpacker, count))
        if loaded != count or unpacker.tell() != len(body):
            raise ValueError(f"checkpoint body of {count} records: {loaded} read, then "
                             f"{len(body) - unpacker.tell()} bytes left")
        state.inodes[ROOT_INO].parent = ROOT_INO
        numbers = list(state.inodes)  # older checkpoints were not in number order
        state.numbers_in_order = numbers == sorted(numbers)
        return state


def _from_records(next_ino: int, records) -> tuple[TreeState, int]:
    """The state, and how many records there were."""
    state = TreeState()
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
        # _times_shared, inline: a call per record is a visible share of a big mount
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
                inode.blocks = NO_EXTENTS
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


def begin_capture(state: TreeState, lsn: int) -> SnapshotCapture:
    """Start capturing the body of ``state`` as it is now (as of ``lsn``), to be read in chunks
    with ``SnapshotCapture.next_chunk`` while ``apply`` goes on changing the state. Replaces
    (abandons) any capture still running: one at a time."""
    state.capture = SnapshotCapture(state, lsn, next(state.capture_ids))
    return state.capture


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
