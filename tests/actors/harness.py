"""The real actors (recovery coordinator → allocator, WAL writer, tree manager) on a SimDisk.

``mounted(disk)`` recovers ``disk`` and yields an ``Fs``: the ``Handles`` plus the coordinator's
mailbox, with helpers that drive the actors the way ``razorfs.fuse.operations`` does (the data
path is Allocate → BlockStore.write → CommitWrite; reads are MapBlocks → read_blocks). Leaving
the block closes every mailbox: final checkpoint and clean shutdown. A power cut is
``disk.crash(...)``: a copy of what would survive, to mount in turn.
"""

from __future__ import annotations

import errno
import stat
from contextlib import asynccontextmanager, contextmanager
from typing import NamedTuple

import pytest
import trio

from razorfs.actors import messages as m
from razorfs.actors.mailbox import Mailbox, open_mailbox
from razorfs.actors.messages import Attr
from razorfs.actors.recovery import Handles, RecoveryCoordinator, Tuning
from razorfs.datadir import format_storage
from razorfs.errors import FsError
from razorfs.fuse.operations import read_blocks
from razorfs.storage.formats import BLOCK_SIZE
from razorfs.storage.interface import Storage
from razorfs.storage.simdisk import SimDisk
from razorfs.tree import ROOT_INO

ROOT = ROOT_INO
FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


class WalStats(NamedTuple):
    durable_lsn: int
    batches: int
    records: int
    fsyncs: int
    bytes_since_trim: int
    failed: str | None


class Space(NamedTuple):
    used: int
    free: int
    pending: int


def formatted(disk: SimDisk | None = None) -> SimDisk:
    disk = disk or SimDisk()
    format_storage(disk)
    return disk


@contextmanager
def raises(code: int):
    """Expect an FsError carrying errno ``code``."""
    with pytest.raises(FsError) as info:
        yield info
    assert info.value.errno == code, (
        f"expected {errno.errorcode.get(code, code)}, got {info.value}")


def pattern(seed: int, size: int) -> bytes:
    """Recognisable, position-dependent bytes."""
    unit = f"<{seed}>".encode()
    return (unit * (size // len(unit) + 1))[:size]


class Fs:
    def __init__(self, disk: SimDisk, handles: Handles, coordinator: Mailbox) -> None:
        self.disk = disk
        self.handles = handles
        self.coordinator = coordinator
        self.tree, self.wal, self.allocator = handles.tree, handles.wal, handles.allocator
        self.blocks = handles.blocks
        self.recovered = handles.recovered

    async def close(self) -> None:
        """As at unmount: the coordinator checkpoints, then every actor stops."""
        for mailbox in (self.tree, self.wal, self.allocator, self.coordinator):
            await mailbox.aclose()

    # ---- metadata ----

    async def call(self, message) -> m.Ok:
        return await self.tree.ask(message)

    async def create(self, name: bytes, parent: int = ROOT, mode: int = FILE,
                     target: bytes = b"") -> Attr:
        return Attr(*(await self.call(m.MakeNode(parent, name, mode, 0, 0, 0, target))).value)

    async def mkdir(self, name: bytes, parent: int = ROOT) -> Attr:
        return await self.create(name, parent, DIR)

    async def lookup(self, parent: int, name: bytes) -> Attr:
        return Attr(*(await self.call(m.Lookup(parent, name))).value)

    async def getattr(self, ino: int) -> Attr:
        return Attr(*(await self.call(m.GetAttr(ino))).value)

    async def resolve(self, path: str) -> int:
        ino = ROOT
        for name in filter(None, path.split("/")):
            ino = (await self.lookup(ino, name.encode())).ino
        return ino

    async def listdir(self, ino: int = ROOT, batch: int = 100) -> dict[bytes, Attr]:
        """Every entry via ReadDir (which counts as a lookup of each child)."""
        entries, after = {}, 0
        while True:
            chunk = (await self.call(m.ReadDir(ino, after, batch))).value
            for name, cookie, attr in chunk:
                entries[name] = Attr(*attr)
                after = cookie
            if len(chunk) < batch:
                return entries

    async def xattrs(self, ino: int) -> tuple:
        names = (await self.call(m.ListXattr(ino))).value
        return tuple(sorted([(n, (await self.call(m.GetXattr(ino, n))).value) for n in names]))

    async def dump(self, ino: int = ROOT, prefix: str = "") -> dict[str, tuple]:
        """The namespace below ``ino``: path -> ("d", nlink, xattrs), ("f", nlink, content,
        xattrs) or ("l", target, xattrs); xattrs as sorted (name, value) pairs."""
        out: dict[str, tuple] = {}
        for name, attr in (await self.listdir(ino)).items():
            path = f"{prefix}/{name.decode()}"
            xattrs = await self.xattrs(attr.ino)
            if stat.S_ISDIR(attr.mode):
                out[path] = ("d", attr.nlink, xattrs)
                out.update(await self.dump(attr.ino, path))
            elif stat.S_ISLNK(attr.mode):
                out[path] = ("l", (await self.call(m.ReadLink(attr.ino))).value, xattrs)
            else:
                out[path] = ("f", attr.nlink, await self.read(attr.ino), xattrs)
        return out

    # ---- data path ----

    async def read(self, ino: int, offset: int = 0, size: int | None = None) -> bytes:
        file_size = (await self.call(m.MapBlocks(ino, 0, 0))).value[0]
        end = file_size if size is None else min(file_size, offset + size)
        if end <= offset:
            return b""
        first, count = offset // BLOCK_SIZE, -(-end // BLOCK_SIZE) - offset // BLOCK_SIZE
        _, triples = (await self.call(m.MapBlocks(ino, first, count))).value
        data = read_blocks(self.blocks.read_run, first, count, triples)
        start = offset - first * BLOCK_SIZE
        return bytes(data[start : start + end - offset])

    async def _write_blocks(self, first: int, buffer: bytes) -> tuple[tuple, tuple]:
        """Fresh blocks holding ``buffer``: (extents, flat (lblk, pblk, crc) triples)."""
        extents = (await self.allocator.ask(m.Allocate(len(buffer) // BLOCK_SIZE))).value
        crcs = self.blocks.write(extents, buffer)  # inline: a deterministic order of disk ops
        pblks = [p for s, n in zip(extents[::2], extents[1::2]) for p in range(s, s + n)]
        return extents, tuple(v for i, p in enumerate(pblks) for v in (first + i, p, crcs[i]))

    async def write(self, ino: int, offset: int, data: bytes) -> int:
        """Copy-on-write ``data`` at ``offset`` (partial blocks merged); return the LSN."""
        first, last = offset // BLOCK_SIZE, (offset + len(data) - 1) // BLOCK_SIZE
        count = last - first + 1
        _, triples = (await self.call(m.MapBlocks(ino, first, count))).value
        buffer = bytearray(read_blocks(self.blocks.read_run, first, count, triples))
        start = offset - first * BLOCK_SIZE
        buffer[start : start + len(data)] = data
        extents, triples = await self._write_blocks(first, buffer)
        try:
            return (await self.call(m.CommitWrite(ino, offset, len(data), triples))).lsn
        except BaseException:
            await self.allocator.tell(m.Release(extents))
            raise

    async def truncate(self, ino: int, size: int) -> int:
        """SetAttr(size), zeroing the tail of a block cut in the middle (copy-on-write)."""
        tail, extents = None, ()
        if size % BLOCK_SIZE:
            lblk = size // BLOCK_SIZE
            current, triples = (await self.call(m.MapBlocks(ino, lblk, 1))).value
            if triples and size < current:
                block = bytearray(read_blocks(self.blocks.read_run, lblk, 1, triples))
                block[size % BLOCK_SIZE :] = bytes(BLOCK_SIZE - size % BLOCK_SIZE)
                extents, tail = await self._write_blocks(lblk, block)
        try:
            return (await self.call(m.SetAttr(ino, size=size, tail=tail))).lsn
        except BaseException:
            if extents:
                await self.allocator.tell(m.Release(extents))
            raise

    # ---- durability and statistics ----

    async def wait_durable(self, lsn: int) -> int:
        return (await self.wal.ask(m.WaitDurable(lsn))).value

    async def sync(self) -> int:
        """What fsync does: wait until every change so far is durable; return that LSN."""
        lsn = (await self.call(m.SyncPoint())).value
        await self.wait_durable(lsn)
        return lsn

    async def checkpoint(self) -> int:
        return (await self.coordinator.ask(m.Checkpoint())).value

    async def wal_stats(self) -> WalStats:
        return WalStats(*(await self.wal.ask(m.WalStats())).value)

    async def space(self) -> Space:
        return Space(*(await self.allocator.ask(m.SpaceStats())).value)


@asynccontextmanager
async def mounted(disk: Storage, **tuning):
    """Recover ``disk`` and run the actors on it (``tuning``: fields of ``Tuning``)."""
    coordinator, inbox = open_mailbox()
    async with trio.open_nursery() as nursery:
        handles = await nursery.start(RecoveryCoordinator(inbox, disk, Tuning(**tuning)).run)
        fs = Fs(disk, handles, coordinator)
        try:
            yield fs
        finally:
            await fs.close()
