"""pyfuse3 Operations: each kernel request becomes one actor transaction (or a direct query).

This module only adapts: metadata changes are one ``ask`` to the tree manager, read-only requests
are answered by ``TreeQueries``, file data goes through ``datapath.DataPath``, the Linux set-id
rules are ``setid``'s, and every handler passes through the one error edge (``errors``).
"""

from __future__ import annotations

import errno
import math
import os
import stat
from dataclasses import dataclass

import pyfuse3
import trio

from razorfs.actors import messages as m
from razorfs.actors.system import Handles
from razorfs.errors import FsError, NoSuchEntry
from razorfs.fuse.datapath import DataPath
from razorfs.fuse.errors import fuse_edge
from razorfs.fuse.pagecache import DirectIoCoherence
from razorfs.fuse.setid import in_group_or_capable, setgid_dropped, setid_bits_dropped
from razorfs.metrics import RequestMetrics
from razorfs.state import acl
from razorfs.state.tree import DOTDOT_COOKIE, Attr, clamp_time_ns
from razorfs.storage.formats import BLOCK_SIZE

READDIR_BATCH = 256
# A small write within this long (seconds) of an fsync is logged with its data: whoever
# fsyncs is likely to again, and a logged write's commit needs one flush instead of two.
FSYNC_RECENT = 2.0
# How long the kernel may keep a name, an absence or attributes: every change comes through this
# mount, and the kernel drops or refreshes what a change touches, so answers stay true (as
# libfuse's passthrough_hp does). The daemon's own atime moves are the exception: invalidated.
ATTR_TIMEOUT = 86400.0


@dataclass
class OpenFile:
    ino: int
    flags: int
    direct: bool = False  # opened with O_DIRECT


def negative_entry() -> pyfuse3.EntryAttributes:
    """The answer to a lookup of a name that does not exist, which the kernel caches like a
    positive one (a plain ENOENT it would ask again for). Safe because every change of a name
    comes through this mount, and the kernel drops the cached absence when one is made."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = 0
    entry.entry_timeout = ATTR_TIMEOUT
    return entry


def entry_attributes(attr: Attr, generation: int = 0) -> pyfuse3.EntryAttributes:
    """``generation`` matters in entry replies only (lookup, creations, readdirplus): the
    kernel keeps it as the inode's, for file handles."""
    entry = pyfuse3.EntryAttributes()
    (entry.st_ino, entry.st_mode, entry.st_nlink, entry.st_uid, entry.st_gid, entry.st_rdev,
     entry.st_size, entry.st_blocks, entry.st_atime_ns, entry.st_mtime_ns,
     entry.st_ctime_ns) = attr
    entry.st_blksize = BLOCK_SIZE
    entry.generation = generation
    entry.entry_timeout = ATTR_TIMEOUT
    entry.attr_timeout = ATTR_TIMEOUT
    return entry


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    # Off: the kernel would send cached writes back in its own order, after later metadata
    # changes, so a crash could keep a later change without an earlier write (G3; measured and
    # rejected, docs/PERFORMANCE.md).
    enable_writeback_cache = False
    enable_acl = True  # the kernel enforces the ACLs we store (FUSE_POSIX_ACL)

    def __init__(self, handles: Handles, *, sync_writes: bool = False, noatime: bool = False,
                 read_only: bool = False, reraise_unexpected: bool = False) -> None:
        super().__init__()
        self._tree = handles.tree
        self._queries = handles.queries
        self._wal = handles.wal
        self._allocator = handles.allocator
        self._data = DataPath(handles)
        self._wal_status = handles.wal_status
        self._generations = handles.recovered.generations
        self._sync_writes = sync_writes
        self.noatime = noatime
        self.read_only = read_only  # a mount (or remount) with -o ro: every change is EROFS
        self.reraise_unexpected = reraise_unexpected
        self.metrics = RequestMetrics()
        self._open_files: dict[int, OpenFile] = {}
        self._page_cache = DirectIoCoherence()
        self._next_fh = 1
        self._last_fsync = -math.inf
        self.initialized = trio.Event()  # set once the kernel's FUSE INIT is answered

    def init(self) -> None:
        self.initialized.set()

    async def remount(self, *, read_only: bool, noatime: bool) -> None:
        """Switch read-only and the atime policy of a live mount. Going read-only commits
        everything first; the kernel refused the remount while a file was open for writing
        or a change was under way (EBUSY), so no change is in flight here."""
        self.noatime = noatime
        if read_only and not self.read_only:
            self.read_only = True
            await self._sync_all()
        self.read_only = read_only

    async def close_mailboxes(self) -> None:
        await self._data.close()
        for mailbox in (self._tree, self._wal, self._allocator):
            await mailbox.aclose()

    # ---- helpers ----

    async def _settle(self, lsn: int) -> None:
        """In --durability=sync, a change is durable before its syscall returns (G2)."""
        if self._sync_writes and lsn and (lsn > self._wal_status.durable_lsn
                                          or self._wal_status.failed):
            await self._wal.ask(m.WaitDurable(lsn))

    async def _change(self, message):
        self._refuse_changes()
        reply = await self._tree.ask(message)
        await self._settle(reply.lsn)
        return reply

    async def _make(self, message) -> pyfuse3.EntryAttributes:
        return self._entry((await self._change(message)).attr)

    def _entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        return entry_attributes(attr, self._generations.of(attr.ino))

    async def _sync_all(self) -> None:
        lsn = self._queries.sync_point()
        if lsn > self._wal_status.durable_lsn or self._wal_status.failed:
            await self._wal.ask(m.WaitDurable(lsn))

    def _new_fh(self, ino: int, flags: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        direct = bool(flags & os.O_DIRECT)
        self._open_files[fh] = OpenFile(ino, flags, direct)
        if direct:
            self._page_cache.opened(ino)
        return fh

    def _open_file(self, fh: int) -> OpenFile:
        try:
            return self._open_files[fh]
        except KeyError:
            raise FsError(errno.EBADF, f"unknown file handle {fh}") from None

    def _forget_cached_attributes(self, ino: int) -> None:
        """Tell the kernel that ``ino``'s attributes changed behind its back (an atime moved by
        a read), so that its cache does not keep the old ones for ATTR_TIMEOUT."""
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel holds nothing of it any more
                raise

    def _refuse_changes(self) -> None:
        if self.read_only:
            raise FsError(errno.EROFS, "read-only mount")
        if self._wal_status.failed:
            raise FsError(errno.EROFS, f"read-only (failsafe): {self._wal_status.failed}")

    # ---- metadata ----

    @fuse_edge
    async def lookup(self, parent_inode, name, ctx=None):
        try:
            return self._entry(self._queries.lookup(parent_inode, name))
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
            # the kernel passes any 64-bit seconds: kept as ext4 keeps them (and encodable)
            atime_ns=clamp_time_ns(attr.st_atime_ns) if fields.update_atime else None,
            mtime_ns=clamp_time_ns(attr.st_mtime_ns) if fields.update_mtime else None,
        )
        times_only = (fields.update_atime or fields.update_mtime) and not (
            fields.update_mode or fields.update_uid or fields.update_gid or fields.update_size)
        if not times_only:  # utimensat keeps set-id bits
            current = self._queries.getattr(inode)
            mode = current.mode if message.mode is None else message.mode
            if setgid_dropped(mode, current.gid, ctx.uid, ctx.gid, ctx.pid):
                message = message._replace(mode=mode & ~stat.S_ISGID)
        if not fields.update_size:
            return entry_attributes((await self._change(message)).attr)
        return entry_attributes(await self._truncate(message._replace(size=attr.st_size)))

    async def _truncate(self, message: m.SetAttr) -> Attr:
        """SetAttr with a size; return the new attributes."""
        self._refuse_changes()
        reply = await self._data.truncate(message)
        await self._settle(reply.lsn)
        return reply.attr

    @fuse_edge
    async def readlink(self, inode, ctx):
        return self._queries.readlink(inode)

    @fuse_edge
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return await self._make(m.MakeNode(parent_inode, name, mode, rdev, ctx.uid, ctx.gid,
                                           umask=ctx.umask))

    @fuse_edge
    async def mkdir(self, parent_inode, name, mode, ctx):
        return await self._make(m.MakeNode(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode),
                                           0, ctx.uid, ctx.gid, umask=ctx.umask))

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
        space = await self._allocator.ask(m.SpaceStats())
        inodes = (await self._tree.ask(m.TreeStats())).inodes
        stats = pyfuse3.StatvfsData()
        stats.f_bsize = stats.f_frsize = BLOCK_SIZE
        stats.f_blocks = space.used + space.pending + space.free + space.disk_free
        stats.f_bfree = stats.f_bavail = space.free + space.disk_free
        stats.f_ffree = stats.f_favail = 1 << 32
        stats.f_files = inodes + stats.f_ffree
        stats.f_namemax = 255
        return stats

    # ---- xattrs ----

    @fuse_edge
    async def getxattr(self, inode, name, ctx):
        return self._queries.getxattr(inode, name)

    @fuse_edge
    async def setxattr(self, inode, name, value, ctx):
        keep_setgid = name != acl.ACCESS or in_group_or_capable(
            self._queries.getattr(inode).gid, ctx.uid, ctx.gid, ctx.pid)
        await self._change(m.SetXattr(inode, name, value, keep_setgid))

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
                                            0, ctx.uid, ctx.gid, umask=ctx.umask))
        return pyfuse3.FileInfo(fh=self._new_fh(entry.st_ino, flags)), entry

    @fuse_edge
    async def read(self, fh, off, size):
        ino = self._open_file(fh).ino
        if size <= 0:
            return b""
        self._page_cache.caching(ino)
        first = off // BLOCK_SIZE
        count = (off + size - 1) // BLOCK_SIZE - first + 1
        file_size, data = await self._data.read(ino, first, count)
        end = min(off + size, file_size)
        if off >= end:
            return b""
        start = off - first * BLOCK_SIZE
        self.metrics.bytes_read += end - off
        if not (self.noatime or self.read_only) and self._queries.atime_due(ino):
            await self._tree.ask(m.Accessed(ino))  # applied before the kernel's cache is dropped
            self._forget_cached_attributes(ino)
        # A view, not bytes: pyfuse3 replies from any contiguous buffer, and a copy of a big
        # read is a visible share of a cached sequential read.
        return memoryview(data)[start : start + end - off]

    @fuse_edge
    async def write(self, fh, off, buf):
        open_file = self._open_file(fh)
        ino = open_file.ino
        if not buf:
            return 0
        self._refuse_changes()
        if not open_file.direct:
            self._page_cache.caching(ino)  # write-through: the kernel keeps what was written
        log_data = bool(self._sync_writes or open_file.flags & os.O_DSYNC
                        or trio.current_time() - self._last_fsync < FSYNC_RECENT)
        reply = await self._data.write(ino, off, buf, log_data=log_data)
        if open_file.direct:
            await self._page_cache.direct_write_applied(ino)
        await self._settle(reply.lsn)
        self.metrics.bytes_written += len(buf)
        return len(buf)

    @fuse_edge
    async def flush(self, fh):
        # Nothing to do at close: writes are in the block store when they return, and byte
        # range locks are the kernel's. ENOSYS tells the kernel so once, and it stops sending
        # a FLUSH at every close (one request of the six or seven a small file costs).
        raise FsError(errno.ENOSYS, "flush is not needed")

    @fuse_edge
    async def release(self, fh):
        open_file = self._open_files.pop(fh, None)
        if open_file is not None and open_file.direct:
            self._page_cache.released(open_file.ino)

    @fuse_edge
    async def fsync(self, fh, datasync):
        self._open_file(fh)
        self._last_fsync = trio.current_time()
        await self._sync_all()

    # ---- directories ----

    @fuse_edge
    async def opendir(self, inode, ctx):
        self._queries.directory(inode)
        return self._new_fh(inode, os.O_RDONLY)

    @fuse_edge
    async def readdir(self, fh, start_id, token):
        ino = self._open_file(fh).ino
        if start_id < DOTDOT_COOKIE:
            for name, cookie, attr in self._queries.dot_entries(ino)[start_id:]:
                if not pyfuse3.readdir_reply(token, name, self._entry(attr), cookie):
                    return
        after = max(start_id, DOTDOT_COOKIE)
        while True:
            entries = self._queries.readdir(ino, after, READDIR_BATCH)
            for index, (name, cookie, attr) in enumerate(entries):
                if not pyfuse3.readdir_reply(token, name, self._entry(attr), cookie):
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
        self._last_fsync = trio.current_time()
        await self._sync_all()
