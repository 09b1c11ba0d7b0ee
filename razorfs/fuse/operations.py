"""pyfuse3 Operations: each kernel request becomes one actor transaction.

Metadata requests are one ``ask`` to the tree manager. File data never travels through actors:
a write allocates fresh blocks (allocator), writes them to the block store from a worker thread
(copy-on-write: committed blocks are never overwritten), then commits the new mapping to the tree
manager, whose WAL record is written only after the block store is fsynced (ordered mode). A
read asks for the mapping and reads and verifies the blocks from a worker thread.

Writes and truncates of one inode are serialised by a per-inode lock held here, because a write
covering part of a block must read that block's current bytes and write them back merged.
"""

from __future__ import annotations

import errno
import os
import stat
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pyfuse3
import structlog
import trio

from razorfs.actors import messages as m
from razorfs.actors.block_allocator import BlockAllocator
from razorfs.actors.recovery import Handles
from razorfs.errors import FsError, NoSuchEntry
from razorfs.fuse.errors import fuse_edge
from razorfs.metrics import RequestMetrics
from razorfs.storage.formats import BLOCK_SIZE, block_crcs

log = structlog.get_logger("razorfs.fuse")

READDIR_BATCH = 256
# Writes this small only copy into the page cache: a worker-thread round trip would cost more
# than the pwrite itself. Larger ones (and every fsync and read) run in a worker thread.
INLINE_WRITE_BYTES = 64 << 10
ATTR_TIMEOUT = 1.0
INLINE_READ_BLOCKS = (1 << 20) // BLOCK_SIZE


class ChecksumMismatch(Exception):
    def __init__(self, lblk: int, pblk: int) -> None:
        super().__init__(lblk, pblk)
        self.lblk = lblk
        self.pblk = pblk


class BlockLease:
    """Blocks taken from the allocator ahead of need, LEASE_BLOCKS at a time: a write takes its
    blocks here instead of asking the allocator each time (one actor round trip less per write,
    and sequential writes get contiguous runs). The allocator counts leased blocks as used; a
    crash returns them for free, since recovery rebuilds free space from the extent maps."""

    LEASE_BLOCKS = 256

    def __init__(self, allocator) -> None:
        self._allocator = allocator
        self._extents: list[list[int]] = []  # [start, length], taken from the front
        self._count = 0

    async def take(self, count: int) -> tuple:
        """Flat (start, length, ...) extents covering ``count`` blocks."""
        while self._count < count:
            try:
                got = (await self._allocator.ask(
                    m.Allocate(max(count, self.LEASE_BLOCKS)))).value
            except FsError as exc:
                if exc.errno != errno.ENOSPC or count >= self.LEASE_BLOCKS:
                    raise
                got = (await self._allocator.ask(m.Allocate(count))).value  # nearly full disk
            for i in range(0, len(got), 2):
                self._extents.append([got[i], got[i + 1]])
            self._count += sum(got[1::2])
        taken = []
        while count:
            extent = self._extents[0]
            length = min(count, extent[1])
            taken += (extent[0], length)
            extent[0] += length
            extent[1] -= length
            if not extent[1]:
                self._extents.pop(0)
            count -= length
            self._count -= length
        return tuple(taken)

    async def give_back(self) -> None:
        if self._extents:
            await self._allocator.tell(m.Release(tuple(v for e in self._extents for v in e)))
            self._extents, self._count = [], 0


@dataclass
class OpenFile:
    ino: int
    flags: int


def supplementary_groups(pid: int) -> set[int]:
    """The caller's supplementary groups, from procfs (memory, not disk: no thread needed).
    A caller that is gone counts as in no group, so a setgid bit is dropped rather than kept."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        return set()
    return set()


def setid_bits_dropped(mode: int, file_gid: int, uid: int, gid: int, pid: int) -> int:
    """The set-id bits Linux clears when this caller truncates the file
    (setattr_should_drop_suidgid): S_ISUID always, S_ISGID if the group may execute or the
    caller is outside the file's group; nothing for root (CAP_FSETID). Needed for
    open(O_TRUNC), which the kernel leaves wholly to OPEN (atomic_o_trunc) with no SETATTR."""
    if uid == 0 or not stat.S_ISREG(mode):
        return 0
    dropped = mode & stat.S_ISUID
    if (mode & (stat.S_ISGID | stat.S_IXGRP) == stat.S_ISGID | stat.S_IXGRP
            or setgid_dropped(mode, file_gid, uid, gid, pid)):
        dropped |= stat.S_ISGID
    return dropped


def setgid_dropped(mode: int, file_gid: int, uid: int, gid: int, pid: int) -> bool:
    """Whether Linux drops S_ISGID here (setattr_should_drop_sgid) in the one case the kernel's
    FUSE client leaves to us: a regular file, setgid without group execute, a caller outside
    the file's group and not root (CAP_FSETID, approximated by uid 0). The client asks with
    the caller's credentials by a SETATTR: before a write (one setting nothing if there is no
    S_ISUID to kill as well), for a chown (one setting nothing for chown(f, -1, -1)) and for a
    truncate. A chmod never needs it: the kernel strips S_ISGID from a non-member's chmod."""
    if (uid == 0 or not stat.S_ISREG(mode)
            or mode & (stat.S_ISGID | stat.S_IXGRP) != stat.S_ISGID):
        return False
    return gid != file_gid and file_gid not in supplementary_groups(pid)


def negative_entry() -> pyfuse3.EntryAttributes:
    """The answer to a lookup of a name that does not exist, which the kernel caches like a
    positive one (a plain ENOENT it would ask again for). Safe because every change of a name
    comes through this mount, and the kernel drops the cached absence when one is made."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = 0
    entry.entry_timeout = ATTR_TIMEOUT
    return entry


def entry_attributes(attr: tuple) -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    (entry.st_ino, entry.st_mode, entry.st_nlink, entry.st_uid, entry.st_gid, entry.st_rdev,
     entry.st_size, entry.st_blocks, entry.st_atime_ns, entry.st_mtime_ns,
     entry.st_ctime_ns) = attr
    entry.st_blksize = BLOCK_SIZE
    entry.generation = 0
    entry.entry_timeout = ATTR_TIMEOUT
    entry.attr_timeout = ATTR_TIMEOUT
    return entry


def _physical_runs(triples: tuple) -> list[tuple[int, int]]:
    """(start, end) index ranges of ``triples`` whose blocks are consecutive both in the file
    and in the block store."""
    spans = []
    i = 0
    while i < len(triples):
        run_start = i
        while (i + 3 < len(triples) and triples[i + 3] == triples[i] + 1
               and triples[i + 4] == triples[i + 1] + 1):
            i += 3
        i += 3
        spans.append((run_start, i))
    return spans


def read_blocks(read_run, first: int, count: int, triples: tuple) -> bytes | bytearray | None:
    """Blocks ``first``..``first+count-1`` of a file: mapped ones read and verified, holes zero.
    Runs of consecutive physical blocks are read with one ``read_run(pblk, count)`` call; if
    that returns None (not cached), so does this."""
    runs = []
    n = len(triples) // 3
    if (n and triples[0::3] == tuple(range(triples[0], triples[0] + n))
            and triples[1::3] == tuple(range(triples[1], triples[1] + n))):
        spans = [(0, len(triples))]  # one physical run, the usual case: found at C speed
    else:
        spans = _physical_runs(triples)
    for run_start, i in spans:
        first_lblk, first_pblk = triples[run_start], triples[run_start + 1]
        length = (i - run_start) // 3
        data = read_run(first_pblk, length)
        if data is None:
            return None
        actual = block_crcs(data)
        if actual != list(triples[run_start + 2 : i : 3]):
            k = next(k for k, value in enumerate(actual) if value != triples[run_start + 3 * k + 2])
            raise ChecksumMismatch(first_lblk + k, first_pblk + k)
        runs.append((first_lblk, data))
    if len(runs) == 1 and runs[0][0] == first and len(runs[0][1]) == count * BLOCK_SIZE:
        return runs[0][1]  # one run covering the whole range: no copy
    buffer = bytearray(count * BLOCK_SIZE)
    for first_lblk, data in runs:
        offset = (first_lblk - first) * BLOCK_SIZE
        buffer[offset : offset + len(data)] = data
    return buffer


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, handles: Handles, *, sync_writes: bool = False, noatime: bool = False,
                 reraise_unexpected: bool = False) -> None:
        super().__init__()
        self._tree = handles.tree
        self._queries = handles.queries
        self._wal = handles.wal
        self._allocator = handles.allocator
        self._lease = BlockLease(handles.allocator)
        self._blocks = handles.blocks
        self._wal_status = handles.wal_status
        self._sync_writes = sync_writes
        self._update_atime = not noatime
        self.reraise_unexpected = reraise_unexpected
        self.metrics = RequestMetrics()
        self._open_files: dict[int, OpenFile] = {}
        self._next_fh = 1
        self._inode_locks: dict[int, list] = {}
        self.initialized = trio.Event()  # set once the kernel's FUSE INIT is answered

    def init(self) -> None:
        self.initialized.set()

    async def close_mailboxes(self) -> None:
        await self._lease.give_back()
        for mailbox in (self._tree, self._wal, self._allocator):
            await mailbox.aclose()

    # ---- helpers ----

    async def _settle(self, lsn: int) -> None:
        """In --durability=sync, a change is durable before its syscall returns (G2)."""
        if self._sync_writes and lsn and (lsn > self._wal_status.durable_lsn
                                          or self._wal_status.failed):
            await self._wal.ask(m.WaitDurable(lsn))

    async def _change(self, message) -> m.Ok:
        reply = await self._tree.ask(message)
        await self._settle(reply.lsn)
        return reply

    async def _make(self, message) -> pyfuse3.EntryAttributes:
        return entry_attributes((await self._change(message)).value)

    async def _sync_all(self) -> None:
        lsn = self._queries.sync_point()
        if lsn > self._wal_status.durable_lsn or self._wal_status.failed:
            await self._wal.ask(m.WaitDurable(lsn))

    @asynccontextmanager
    async def _exclusive(self, ino: int):
        entry = self._inode_locks.get(ino)
        if entry is None:
            entry = self._inode_locks[ino] = [trio.Lock(), 0]
        entry[1] += 1
        lock = entry[0]
        try:
            try:
                lock.acquire_nowait()  # uncontended: no trip through the scheduler
            except trio.WouldBlock:
                await lock.acquire()
            try:
                yield
            finally:
                lock.release()
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._inode_locks[ino]

    def _new_fh(self, ino: int, flags: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._open_files[fh] = OpenFile(ino, flags)
        return fh

    def _open_file(self, fh: int) -> OpenFile:
        try:
            return self._open_files[fh]
        except KeyError:
            raise FsError(errno.EBADF, f"unknown file handle {fh}") from None

    async def _read_range(self, ino: int, first: int,
                          count: int) -> tuple[int, bytes | bytearray]:
        """(file size, bytes of blocks first..first+count-1), verified against checksums."""
        for attempt in (1, 2):
            size, triples = self._queries.map_blocks(ino, first, count)
            if not triples:
                return size, bytearray(count * BLOCK_SIZE)
            try:
                # Cached blocks are read right here (RWF_NOWAIT: no waiting for the disk), the
                # rest from a worker thread.
                data = None
                if count <= INLINE_READ_BLOCKS:
                    data = read_blocks(self._blocks.read_run_if_cached, first, count, triples)
                if data is None:
                    data = await trio.to_thread.run_sync(read_blocks, self._blocks.read_run,
                                                         first, count, triples)
                return size, data
            except ChecksumMismatch as exc:
                # A concurrent write may have replaced and freed the block after we mapped it:
                # map again once before calling it corruption.
                if attempt == 2:
                    log.error("data block checksum mismatch", inode=ino,
                              offset=exc.lblk * BLOCK_SIZE, block=exc.pblk)
                    raise FsError(errno.EIO, "data block checksum mismatch") from None
            except OSError as exc:
                log.error("block store read failed", inode=ino, error=str(exc))
                raise FsError(errno.EIO, f"block store read failed: {exc}") from None
        raise AssertionError("unreachable")

    async def _write_blocks(self, first: int, buffer: bytes | bytearray) -> tuple:
        """Write whole blocks to freshly allocated space; return flat (lblk, pblk, crc)."""
        count = len(buffer) // BLOCK_SIZE
        extents = await self._lease.take(count)
        try:
            if len(buffer) <= INLINE_WRITE_BYTES:
                crcs = self._blocks.write(extents, buffer)
            else:
                crcs = await trio.to_thread.run_sync(self._blocks.write, extents, buffer)
        except OSError as exc:
            await self._allocator.tell(m.Release(extents))
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise FsError(errno.ENOSPC, "no space left on the data directory's disk") from None
            await self._tree.tell(m.EnterFailsafe(f"block store write failed: {exc}"))
            raise FsError(errno.EIO, f"block store write failed: {exc}") from None
        triples = []
        lblk = first
        for i in range(0, len(extents), 2):
            for pblk in range(extents[i], extents[i] + extents[i + 1]):
                triples.extend((lblk, pblk, crcs[lblk - first]))
                lblk += 1
        return extents, tuple(triples)

    def _refuse_if_failsafe(self) -> None:
        if self._wal_status.failed:
            raise FsError(errno.EROFS, f"read-only (failsafe): {self._wal_status.failed}")

    # ---- metadata ----

    @fuse_edge
    async def lookup(self, parent_inode, name, ctx=None):
        try:
            return entry_attributes(self._queries.lookup(parent_inode, name))
        except NoSuchEntry:
            return negative_entry()

    @fuse_edge
    async def forget(self, inode_list, *unused):
        pairs = tuple(value for pair in inode_list for value in pair)
        await self._tree.tell(m.Forget(pairs))

    @fuse_edge
    async def getattr(self, inode, ctx=None):
        return entry_attributes(self._queries.getattr(inode))

    @fuse_edge
    async def setattr(self, inode, attr, fields, fh, ctx):
        message = m.SetAttr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        times_only = (fields.update_atime or fields.update_mtime) and not (
            fields.update_mode or fields.update_uid or fields.update_gid or fields.update_size)
        if not times_only:  # utimensat keeps set-id bits
            current = self._queries.getattr(inode)
            mode = current.mode if message.mode is None else message.mode
            if setgid_dropped(mode, current.gid, ctx.uid, ctx.gid, ctx.pid):
                message = message._replace(mode=mode & ~stat.S_ISGID)
        if not fields.update_size:
            return entry_attributes((await self._change(message)).value)
        return entry_attributes(await self._truncate(message._replace(size=attr.st_size)))

    async def _truncate(self, message: m.SetAttr) -> tuple:
        """SetAttr with a size, under the inode's data lock; return the new attributes."""
        self._refuse_if_failsafe()
        inode, size = message.ino, message.size
        async with self._exclusive(inode):
            tail = None
            extents = ()
            if size % BLOCK_SIZE:
                # Zero the bytes past the new end inside the last block, copy-on-write, so that
                # growing the file later never brings old bytes back.
                tail_lblk = size // BLOCK_SIZE
                current_size, triples = self._queries.map_blocks(inode, tail_lblk, 1)
                if triples and size < current_size:
                    _, data = await self._read_range(inode, tail_lblk, 1)
                    block = bytearray(data)
                    block[size % BLOCK_SIZE :] = bytes(BLOCK_SIZE - size % BLOCK_SIZE)
                    extents, tail = await self._write_blocks(tail_lblk, block)
            try:
                reply = await self._tree.ask(message._replace(tail=tail))
            except BaseException:
                if extents:
                    await self._allocator.tell(m.Release(extents))
                raise
        await self._settle(reply.lsn)
        return reply.value

    @fuse_edge
    async def readlink(self, inode, ctx):
        return self._queries.readlink(inode)

    @fuse_edge
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return await self._make(m.MakeNode(parent_inode, name, mode, rdev, ctx.uid, ctx.gid))

    @fuse_edge
    async def mkdir(self, parent_inode, name, mode, ctx):
        return await self._make(m.MakeNode(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode),
                                           0, ctx.uid, ctx.gid))

    @fuse_edge
    async def symlink(self, parent_inode, name, target, ctx):
        return await self._make(m.MakeNode(parent_inode, name, stat.S_IFLNK | 0o777, 0, ctx.uid,
                                           ctx.gid, target))

    @fuse_edge
    async def unlink(self, parent_inode, name, ctx):
        await self._change(m.Remove(parent_inode, name, False))

    @fuse_edge
    async def rmdir(self, parent_inode, name, ctx):
        await self._change(m.Remove(parent_inode, name, True))

    @fuse_edge
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self._change(m.Rename(parent_inode_old, name_old, parent_inode_new, name_new,
                                    flags))

    @fuse_edge
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return await self._make(m.Link(inode, new_parent_inode, new_name))

    @fuse_edge
    async def statfs(self, ctx):
        used, free_in_store, pending = (await self._allocator.ask(m.SpaceStats())).value
        inodes = (await self._tree.ask(m.TreeStats())).value[0]
        disk_free = await trio.to_thread.run_sync(self._blocks_space)
        stats = pyfuse3.StatvfsData()
        stats.f_bsize = stats.f_frsize = BLOCK_SIZE
        stats.f_blocks = used + pending + free_in_store + disk_free
        stats.f_bfree = stats.f_bavail = free_in_store + disk_free
        stats.f_ffree = stats.f_favail = 1 << 32
        stats.f_files = inodes + stats.f_ffree
        stats.f_namemax = 255
        return stats

    def _blocks_space(self) -> int:
        """Blocks the disk under the data directory can still give us, less the log reserve."""
        available = self._blocks.disk_space().available - BlockAllocator.RESERVED_BYTES
        return max(0, available // BLOCK_SIZE)

    # ---- xattrs ----

    @fuse_edge
    async def getxattr(self, inode, name, ctx):
        return self._queries.getxattr(inode, name)

    @fuse_edge
    async def setxattr(self, inode, name, value, ctx):
        await self._change(m.SetXattr(inode, name, value))

    @fuse_edge
    async def listxattr(self, inode, ctx):
        return list(self._queries.listxattr(inode))

    @fuse_edge
    async def removexattr(self, inode, name, ctx):
        await self._change(m.RemoveXattr(inode, name))

    @fuse_edge
    async def access(self, inode, mode, ctx):
        # default_permissions is always on: the kernel checks permissions itself.
        self._queries.getattr(inode)
        return True

    # ---- files ----

    @fuse_edge
    async def open(self, inode, flags, ctx):
        attr = self._queries.getattr(inode)
        if flags & os.O_TRUNC:
            # libfuse negotiates atomic_o_trunc: the kernel sends O_TRUNC here, not a setattr
            # (and Linux truncates on O_RDONLY|O_TRUNC too; permission was checked already).
            dropped = setid_bits_dropped(attr.mode, attr.gid, ctx.uid, ctx.gid, ctx.pid)
            await self._truncate(m.SetAttr(inode, size=0,
                                           mode=attr.mode & ~dropped if dropped else None))
        return pyfuse3.FileInfo(fh=self._new_fh(inode, flags), keep_cache=True)

    @fuse_edge
    async def create(self, parent_inode, name, mode, flags, ctx):
        entry = await self._make(m.MakeNode(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode),
                                            0, ctx.uid, ctx.gid))
        return pyfuse3.FileInfo(fh=self._new_fh(entry.st_ino, flags)), entry

    @fuse_edge
    async def read(self, fh, off, size):
        ino = self._open_file(fh).ino
        if size <= 0:
            return b""
        first = off // BLOCK_SIZE
        count = (off + size - 1) // BLOCK_SIZE - first + 1
        file_size, data = await self._read_range(ino, first, count)
        end = min(off + size, file_size)
        if off >= end:
            return b""
        start = off - first * BLOCK_SIZE
        self.metrics.bytes_read += end - off
        if self._update_atime and self._queries.atime_due(ino):
            await self._tree.tell(m.Accessed(ino))
        # A view, not bytes: pyfuse3 replies from any contiguous buffer, and copying a 1 MiB
        # bytearray into bytes was a tenth of a cached sequential read's time.
        return memoryview(data)[start : start + end - off]

    @fuse_edge
    async def write(self, fh, off, buf):
        ino = self._open_file(fh).ino
        if not buf:
            return 0
        self._refuse_if_failsafe()
        first = off // BLOCK_SIZE
        last = (off + len(buf) - 1) // BLOCK_SIZE
        start = off - first * BLOCK_SIZE
        async with self._exclusive(ino):
            head_partial = start != 0
            tail_partial = (off + len(buf)) % BLOCK_SIZE != 0
            if head_partial or tail_partial:
                buffer = await self._merge_partial(ino, first, last, head_partial, tail_partial)
                buffer[start : start + len(buf)] = buf
            else:
                buffer = buf
            extents, triples = await self._write_blocks(first, buffer)
            try:
                reply = await self._tree.ask(m.CommitWrite(ino, off, len(buf), triples))
            except BaseException:
                await self._allocator.tell(m.Release(extents))
                raise
        await self._settle(reply.lsn)
        self.metrics.bytes_written += len(buf)
        return len(buf)

    async def _merge_partial(self, ino: int, first: int, last: int, head: bool,
                             tail: bool) -> bytearray:
        """A buffer for blocks first..last holding the current bytes of the partially
        overwritten first and last blocks (the rest is overwritten anyway)."""
        buffer = bytearray((last - first + 1) * BLOCK_SIZE)
        if head:
            _, block = await self._read_range(ino, first, 1)
            buffer[:BLOCK_SIZE] = block
        if tail and (last != first or not head):
            _, block = await self._read_range(ino, last, 1)
            buffer[-BLOCK_SIZE:] = block
        return buffer

    @fuse_edge
    async def flush(self, fh):
        # Nothing to do at close: writes are in the block store when they return, and byte
        # range locks are the kernel's. ENOSYS tells the kernel so once, and it stops sending
        # a FLUSH at every close (one request of the six or seven a small file costs).
        raise FsError(errno.ENOSYS, "flush is not needed")

    @fuse_edge
    async def release(self, fh):
        self._open_files.pop(fh, None)

    @fuse_edge
    async def fsync(self, fh, datasync):
        self._open_file(fh)
        await self._sync_all()

    # ---- directories ----

    @fuse_edge
    async def opendir(self, inode, ctx):
        self._queries.directory(inode)
        return self._new_fh(inode, os.O_RDONLY)

    @fuse_edge
    async def readdir(self, fh, start_id, token):
        ino = self._open_file(fh).ino
        after = start_id
        while True:
            entries = self._queries.readdir(ino, after, READDIR_BATCH)
            for index, (name, cookie, attr) in enumerate(entries):
                if not pyfuse3.readdir_reply(token, name, entry_attributes(attr), cookie):
                    # Each returned entry counted as a lookup; the kernel took none of these.
                    rejected = tuple(v for e in entries[index:] for v in (e[2][0], 1))
                    await self._tree.tell(m.Forget(rejected))
                    return
            if len(entries) < READDIR_BATCH:
                return
            after = entries[-1][1]

    @fuse_edge
    async def releasedir(self, fh):
        self._open_files.pop(fh, None)

    @fuse_edge
    async def fsyncdir(self, fh, datasync):
        self._open_file(fh)
        await self._sync_all()
