"""Block allocator actor: owns the free space of the block store.

Blocks unmapped by a transaction stay reserved until that transaction is durable: until then the
durable state (checkpoint + log) may still point at them, and overwriting them would let a crash
expose another file's bytes. The durable LSN is read from the WAL writer's published
``WalStatus`` whenever a message arrives, rather than told after each commit: blocks only need
to be free by the time someone allocates or asks how much is free, and both are messages. The
free map is never stored: recovery rebuilds it from the extent maps, so it cannot disagree with
them.
"""

from __future__ import annotations

import errno
from collections import deque
from bisect import bisect_left, insort

import structlog
import trio

from razorfs.actors import messages as m
from razorfs.actors.mailbox import dispatch
from razorfs.actors.wal_writer import WalStatus
from razorfs.errors import FsError
from razorfs.storage.formats import BLOCK_SIZE
from razorfs.storage.interface import Storage

log = structlog.get_logger("razorfs.allocator")


class FreeSpace:
    """Free extents below the high-water mark, kept sorted and merged."""

    def __init__(self, high_water: int = 0) -> None:
        self.high_water = high_water
        self._starts: list[int] = []
        self._lengths: dict[int, int] = {}
        self.free_count = 0

    @classmethod
    def from_used(cls, used, high_water: int) -> FreeSpace:
        used_sorted = sorted(set(used))
        top = max(high_water, used_sorted[-1] + 1 if used_sorted else 0)
        space = cls(top)
        cursor = 0
        for block in used_sorted:
            if block > cursor:
                space._add(cursor, block - cursor)
            cursor = block + 1
        if top > cursor:
            space._add(cursor, top - cursor)
        return space

    def _add(self, start: int, length: int) -> None:
        insort(self._starts, start)
        self._lengths[start] = length
        self.free_count += length

    def _remove(self, start: int) -> int:
        del self._starts[bisect_left(self._starts, start)]
        length = self._lengths.pop(start)
        self.free_count -= length
        return length

    def allocate(self, count: int) -> list[tuple[int, int]]:
        """``count`` blocks as extents: one free run that fits, else grow the store, else
        gather smaller runs (only when the disk cannot grow is fragmentation accepted)."""
        for start in self._starts:
            if self._lengths[start] >= count:
                self._take(start, count)
                return [(start, count)]
        start = self.high_water
        self.high_water += count
        return [(start, count)]

    def allocate_fragmented(self, count: int) -> list[tuple[int, int]]:
        extents = []
        while count and self._starts:
            start = self._starts[0]
            taken = min(count, self._lengths[start])
            self._take(start, taken)
            extents.append((start, taken))
            count -= taken
        if count:
            extents.append((self.high_water, count))
            self.high_water += count
        return extents

    def _take(self, start: int, count: int) -> None:
        length = self._remove(start)
        if length > count:
            self._add(start + count, length - count)

    def free(self, start: int, length: int) -> None:
        if start + length > self.high_water:
            raise ValueError(f"free of blocks {start}+{length} beyond the store's end")
        position = bisect_left(self._starts, start)
        following = self._starts[position] if position < len(self._starts) else None
        previous = self._starts[position - 1] if position > 0 else None
        if (following is not None and following < start + length) or (
                previous is not None and previous + self._lengths[previous] > start):
            raise ValueError(f"double free of blocks {start}+{length}")
        if following == start + length:
            length += self._remove(following)
        if previous is not None and previous + self._lengths[previous] == start:
            start, length = previous, self._lengths[previous] + length
            self._remove(previous)
        self._add(start, length)

    def trim_top(self) -> None:
        """Lower the high-water mark below a free run that ends at it: blocks above the store's
        written end are then not counted as free space inside the store."""
        if self._starts:
            last = self._starts[-1]
            if last + self._lengths[last] == self.high_water:
                self._remove(last)
                self.high_water = last

    def extents(self) -> list[tuple[int, int]]:
        return [(start, self._lengths[start]) for start in self._starts]


def runs(blocks) -> list[tuple[int, int]]:
    """Group block numbers into (start, length) runs."""
    result: list[tuple[int, int]] = []
    for block in sorted(blocks):
        if result and result[-1][0] + result[-1][1] == block:
            result[-1] = (result[-1][0], result[-1][1] + 1)
        else:
            result.append((block, 1))
    return result


class BlockAllocator:
    # Space kept free on the disk under the data directory for WAL segments and checkpoints,
    # so that a full disk fails data writes with ENOSPC instead of failing the log.
    RESERVED_BYTES = 64 << 20

    def __init__(self, inbox: trio.MemoryReceiveChannel, storage: Storage,
                 free_space: FreeSpace, wal_status: WalStatus, replica_hold=None) -> None:
        self._inbox = inbox
        self._storage = storage
        self._space = free_space
        self._wal_status = wal_status
        self._replica_hold = replica_hold  # blocks freed after its LSN are not yet shipped
        self._pending: deque[tuple[int, tuple]] = deque()  # (lsn, blocks) waiting for durability
        self._pending_count = 0
        self._handlers = {
            m.Allocate: self._allocate,
            m.Release: self._release,
            m.FreeAfter: self._free_after,
            m.SpaceStats: self._stats,
        }

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with self._inbox:
            async for envelope in self._inbox:
                self._free_durable()
                await dispatch(envelope, self._handlers, "allocator")

    async def _allocate(self, message: m.Allocate) -> m.Extents:
        count = message.count
        disk_full = (self._storage.space().available
                     < count * BLOCK_SIZE + self.RESERVED_BYTES)
        if disk_full:
            if self._space.free_count < count:
                raise FsError(errno.ENOSPC, "no space left for data blocks")
            extents = self._space.allocate_fragmented(count)
        else:
            extents = self._space.allocate(count)
        return m.Extents(tuple(value for extent in extents for value in extent))

    async def _release(self, message: m.Release) -> None:
        for i in range(0, len(message.extents), 2):
            self._space.free(message.extents[i], message.extents[i + 1])
        # never committed, so mostly a lease given back from the top of the store
        self._space.trim_top()

    def _reusable_lsn(self) -> int:
        """Blocks freed by transactions up to this LSN may be reused: the freeing is durable
        and, with a replica, shipped (its upload reads the old blocks)."""
        durable = self._wal_status.durable_lsn
        return durable if self._replica_hold is None else min(durable, self._replica_hold.lsn)

    async def _free_after(self, message: m.FreeAfter) -> None:
        if message.lsn <= self._reusable_lsn():
            self._free_blocks(message.blocks)
        else:
            self._pending.append((message.lsn, message.blocks))
            self._pending_count += len(message.blocks)

    def _free_durable(self) -> None:
        reusable_lsn = self._reusable_lsn()
        while self._pending and self._pending[0][0] <= reusable_lsn:
            _, blocks = self._pending.popleft()
            self._pending_count -= len(blocks)
            self._free_blocks(blocks)

    def _free_blocks(self, blocks) -> None:
        for start, length in runs(blocks):
            self._space.free(start, length)

    async def _stats(self, message: m.SpaceStats) -> m.SpaceStatus:
        free = self._space.free_count
        disk_free = max(0, self._storage.space().available - self.RESERVED_BYTES) // BLOCK_SIZE
        return m.SpaceStatus(self._space.high_water - free - self._pending_count, free,
                             self._pending_count, disk_free)
