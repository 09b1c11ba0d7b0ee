"""File data: copy-on-write block writes, verified block reads, truncates.

File data never travels through an actor. A write takes fresh blocks from the block lease,
writes them to the block store (from a worker thread unless small), then commits the new mapping
with ``CommitWrite``; the WAL writer fsyncs the block store before it writes any record that
points into it (ordered mode). Committed blocks are never overwritten, so a crash can only damage
blocks no committed state points to. A read maps the range (``TreeQueries``) and verifies every
block's CRC.

Writes and truncates of one inode are serialised by a per-inode lock, because a write covering
part of a block must read that block's current bytes and write them back merged.
"""

from __future__ import annotations

import errno
import functools
from contextlib import asynccontextmanager

import structlog
import trio

from razorfs.actors import messages as m
from razorfs.actors.system import Handles
from razorfs.errors import FsError
from razorfs.storage.formats import BLOCK_SIZE, block_crcs

log = structlog.get_logger("razorfs.fuse")

# Writes this small only copy into the page cache: a worker-thread round trip would cost more
# than the pwrite itself. Larger ones (and reads that miss the page cache) run in a worker thread.
INLINE_WRITE_BYTES = 64 << 10
INLINE_READ_BLOCKS = (1 << 20) // BLOCK_SIZE
# Writes up to this many bytes of whole blocks may be logged: their bytes go into the WAL record
# (PutData), and the commit that makes them durable needs no flush of the block store first.
LOGGED_WRITE_BYTES = 16 << 10


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
                    m.Allocate(max(count, self.LEASE_BLOCKS)))).extents
            except FsError as exc:
                if exc.errno != errno.ENOSPC or count >= self.LEASE_BLOCKS:
                    raise
                got = (await self._allocator.ask(m.Allocate(count))).extents  # nearly full disk
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

    @property
    def count(self) -> int:
        """Blocks held and not yet taken."""
        return self._count

    async def give_back(self) -> None:
        if self._extents:
            await self._allocator.tell(m.Release(tuple(v for e in self._extents for v in e)))
            self._extents, self._count = [], 0


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


class DataPath:
    """Reads, writes and truncates of file data for the FUSE layer (one per mount)."""

    def __init__(self, handles: Handles) -> None:
        self._tree = handles.tree
        self._queries = handles.queries
        self._allocator = handles.allocator
        self._blocks = handles.blocks
        self._lease = BlockLease(handles.allocator)
        self._inode_locks: dict[int, list] = {}

    @property
    def leased_blocks(self) -> int:
        """Blocks allocated ahead of need that no file maps yet."""
        return self._lease.count

    async def close(self) -> None:
        await self._lease.give_back()

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

    async def read(self, ino: int, first: int, count: int) -> tuple[int, bytes | bytearray]:
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

    async def write(self, ino: int, off: int, buf: bytes, *, log_data: bool = False) -> m.Changed:
        """Write ``buf`` at ``off`` copy-on-write and commit it; the reply carries the ticket.
        ``log_data``: a write someone will likely wait for; if small, its blocks' bytes go into
        the WAL record too (one flush fewer when it is made durable)."""
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
            logged = log_data and len(buffer) <= LOGGED_WRITE_BYTES
            extents, triples = await self._write_blocks(first, buffer, logged=logged)
            try:
                return await self._tree.ask(m.CommitWrite(ino, off, len(buf), triples,
                                                          bytes(buffer) if logged else b""))
            except BaseException:
                await self._allocator.tell(m.Release(extents))
                raise

    async def truncate(self, message: m.SetAttr) -> m.Changed:
        """``message`` (a SetAttr with a size) with the new last block's tail zeroed."""
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
                    _, data = await self.read(inode, tail_lblk, 1)
                    block = bytearray(data)
                    block[size % BLOCK_SIZE :] = bytes(BLOCK_SIZE - size % BLOCK_SIZE)
                    extents, tail = await self._write_blocks(tail_lblk, block)
            try:
                return await self._tree.ask(message._replace(tail=tail))
            except BaseException:
                if extents:
                    await self._allocator.tell(m.Release(extents))
                raise

    async def _merge_partial(self, ino: int, first: int, last: int, head: bool,
                             tail: bool) -> bytearray:
        """A buffer for blocks first..last holding the current bytes of the partially
        overwritten first and last blocks (the rest is overwritten anyway)."""
        buffer = bytearray((last - first + 1) * BLOCK_SIZE)
        if head:
            _, block = await self.read(ino, first, 1)
            buffer[:BLOCK_SIZE] = block
        if tail and (last != first or not head):
            _, block = await self.read(ino, last, 1)
            buffer[-BLOCK_SIZE:] = block
        return buffer

    async def _write_blocks(self, first: int, buffer: bytes | bytearray, *,
                            logged: bool = False) -> tuple:
        """Write whole blocks to freshly allocated space; return the extents and the flat
        (lblk, pblk, crc) triples. ``logged``: the WAL record will carry them too."""
        count = len(buffer) // BLOCK_SIZE
        extents = await self._lease.take(count)
        try:
            if len(buffer) <= INLINE_WRITE_BYTES:
                crcs = self._blocks.write(extents, buffer, logged=logged)
            else:
                crcs = await trio.to_thread.run_sync(
                    functools.partial(self._blocks.write, extents, buffer, logged=logged))
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
