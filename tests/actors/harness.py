"""The real actors (recovery coordinator → allocator, WAL writer, tree manager) on a SimDisk.

``mounted(disk)`` recovers ``disk`` and yields an ``Fs``: the ``Handles`` plus the coordinator's
mailbox, with helpers that drive the actors the way ``razorfs.fuse.operations`` does: changes are
asks to the tree manager, reads go through ``TreeQueries``, file data through the FUSE layer's
own ``DataPath``. Leaving the block closes every mailbox: final checkpoint and clean shutdown.
A power cut is ``disk.crash(...)``: a copy of what would survive, to mount in turn.
"""

from __future__ import annotations

import errno
import stat
from contextlib import asynccontextmanager, contextmanager
import pytest
import trio

from razorfs.actors import messages as m
from razorfs.actors.mailbox import Mailbox, open_mailbox
from razorfs.actors.recovery_coordinator import RecoveryCoordinator
from razorfs.actors.system import Handles, Tuning
from razorfs.datadir import format_storage
from razorfs.errors import FsError
from razorfs.fuse.datapath import DataPath
from razorfs.state.tree import ROOT_INO, Attr
from razorfs.storage.formats import BLOCK_SIZE
from razorfs.storage.interface import Storage
from razorfs.storage.simdisk import SimDisk

ROOT = ROOT_INO
FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


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
        self.queries = handles.queries
        self.blocks = handles.blocks
        self.recovered = handles.recovered
        self.data = DataPath(handles)

    async def close(self) -> None:
        """As at unmount: the coordinator checkpoints, then every actor stops."""
        await self.data.close()
        for mailbox in (self.tree, self.wal, self.allocator, self.coordinator):
            await mailbox.aclose()

    # ---- metadata ----

    async def call(self, message):
        return await self.tree.ask(message)

    async def create(self, name: bytes, parent: int = ROOT, mode: int = FILE,
                     target: bytes = b"") -> Attr:
        return (await self.call(m.MakeNode(parent, name, mode, 0, 0, 0, target))).attr

    async def mkdir(self, name: bytes, parent: int = ROOT) -> Attr:
        return await self.create(name, parent, DIR)

    async def lookup(self, parent: int, name: bytes) -> Attr:
        return self.queries.lookup(parent, name)

    async def getattr(self, ino: int) -> Attr:
        return self.queries.getattr(ino)

    async def resolve(self, path: str) -> int:
        ino = ROOT
        for name in filter(None, path.split("/")):
            ino = (await self.lookup(ino, name.encode())).ino
        return ino

    async def listdir(self, ino: int = ROOT, batch: int = 100) -> dict[bytes, Attr]:
        """Every entry, as readdir gives them (which counts as a lookup of each child)."""
        entries, after = {}, 0
        while True:
            chunk = self.queries.readdir(ino, after, batch)
            for name, cookie, attr in chunk:
                entries[name] = attr
                after = cookie
            if len(chunk) < batch:
                return entries

    async def xattrs(self, ino: int) -> tuple:
        return tuple(sorted((n, self.queries.getxattr(ino, n))
                            for n in self.queries.listxattr(ino)))

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
                out[path] = ("l", self.queries.readlink(attr.ino), xattrs)
            else:
                out[path] = ("f", attr.nlink, await self.read(attr.ino), xattrs)
        return out

    # ---- data path ----

    async def read(self, ino: int, offset: int = 0, size: int | None = None) -> bytes:
        file_size = self.queries.getattr(ino).size
        end = file_size if size is None else min(file_size, offset + size)
        if end <= offset:
            return b""
        first, count = offset // BLOCK_SIZE, -(-end // BLOCK_SIZE) - offset // BLOCK_SIZE
        _, data = await self.data.read(ino, first, count)
        start = offset - first * BLOCK_SIZE
        return bytes(data[start : start + end - offset])

    async def write(self, ino: int, offset: int, data: bytes, *, log_data: bool = False) -> int:
        """Copy-on-write ``data`` at ``offset`` (partial blocks merged); return the LSN.
        ``log_data``: a small write's bytes go into its WAL record too (PutData)."""
        return (await self.data.write(ino, offset, data, log_data=log_data)).lsn

    async def truncate(self, ino: int, size: int) -> int:
        """SetAttr(size), the tail of a block cut in the middle zeroed (copy-on-write)."""
        return (await self.data.truncate(m.SetAttr(ino, size=size))).lsn

    # ---- durability and statistics ----

    async def wait_durable(self, lsn: int) -> int:
        return (await self.wal.ask(m.WaitDurable(lsn))).lsn

    async def sync(self) -> int:
        """What fsync does: wait until every change so far is durable; return that LSN."""
        lsn = self.queries.sync_point()
        await self.wait_durable(lsn)
        return lsn

    async def checkpoint(self) -> int:
        return (await self.coordinator.ask(m.Checkpoint())).lsn

    async def wal_stats(self) -> m.LogStatus:
        return await self.wal.ask(m.WalStats())

    async def space(self) -> m.SpaceStatus:
        """The allocator's counts, the blocks the data path holds in its lease (mapped by
        nothing) left out of ``used``."""
        status = await self.allocator.ask(m.SpaceStats())
        return status._replace(used=status.used - self.data.leased_blocks)


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
