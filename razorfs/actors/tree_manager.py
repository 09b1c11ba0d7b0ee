"""Tree manager actor: owns the metadata and runs each FUSE request as one transaction.

A modifying request is validated against the state (raising FsError with the errno Linux would
give), turned into redo operations, applied with ``TreeState.apply`` and handed to the WAL writer
as one record with the next LSN. The reply carries that LSN as a commit ticket; the tree manager
never waits for an fsync, so a slow disk never holds up other requests (whoever needs durability
waits on the WAL writer with the ticket).
"""

from __future__ import annotations

import errno
import stat
import time
from typing import Callable

import pyfuse3
import structlog
import trio

from razorfs.actors import messages as m
from razorfs.actors.mailbox import Mailbox, dispatch
from razorfs.actors.wal_writer import WalStatus
from razorfs.errors import FsError, NoSuchEntry
from razorfs.state import acl, redo, snapshot
from razorfs.state.tree import (
    DOT_COOKIE, DOTDOT_COOKIE, ROOT_INO, Attr, Inode, TreeState, clamp_time_ns)
from razorfs.storage.formats import BLOCK_SIZE

log = structlog.get_logger("razorfs.tree")

NAME_MAX = 255
SYMLINK_MAX = 4095
XATTR_NAME_MAX = 255
XATTR_VALUE_MAX = 65536
XATTR_TOTAL_MAX = 1 << 20
MAX_FILE_SIZE = (1 << 63) - 1
RELATIME_PERIOD_NS = 24 * 3600 * 10**9
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
# What listxattr can return at most (the kernel's XATTR_LIST_MAX): names beyond it could be set
# but never listed again.
XATTR_LIST_MAX = 65536


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG, f"name of {len(name)} bytes (limit {NAME_MAX})")
    if not name or b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL, "invalid name")


class TreeQueries:
    """The tree manager's read-only face, called directly (synchronously) by the FUSE layer.

    Trio runs every task of the daemon on one thread and switches tasks only at an ``await``.
    None of these methods awaits, so each one runs atomically between two steps of the tree
    manager and sees every transaction either wholly applied or not at all: the answer an
    ``ask`` would give, without its task switches and encodings (docs/DESIGN.md, "Direct
    queries"). The one thing they change is the kernel's lookup count, bookkeeping that is never
    logged and that the kernel keeps in step with its own requests.
    """

    def __init__(self, state: TreeState, last_lsn: Callable[[], int],
                 clock: Callable[[], int] = time.time_ns) -> None:
        self._state = state
        self._last_lsn = last_lsn
        self._clock = clock

    def inode(self, ino: int) -> Inode:
        inode = self._state.inodes.get(ino)
        if inode is None:
            raise FsError(errno.ENOENT, f"no inode {ino}")
        return inode

    def directory(self, ino: int) -> Inode:
        inode = self.inode(ino)
        if not inode.is_dir:
            raise FsError(errno.ENOTDIR, f"inode {ino} is not a directory")
        return inode

    def child(self, parent: Inode, name: bytes) -> Inode:
        _check_name(name)
        ino = parent.directory.names.get(name)
        if ino is None:
            raise NoSuchEntry(f"no entry {name!r} in directory {parent.ino}")
        return self._state.inodes[ino]

    def lookup(self, parent_ino: int, name: bytes) -> Attr:
        if name == b".":
            # The kernel asks "." of any inode's number (a directory's or not) to open a file
            # handle whose inode it no longer holds; one removed since answers ESTALE.
            inode = self.inode(parent_ino)
            if inode.nlink == 0:
                raise FsError(errno.ENOENT, f"inode {parent_ino} was removed")
        elif name == b"..":
            inode = self.inode(self.directory(parent_ino).parent)
        else:
            inode = self.child(self.directory(parent_ino), name)
        inode.lookups += 1
        return inode.attr()

    def getattr(self, ino: int) -> Attr:
        return self.inode(ino).attr()

    def readlink(self, ino: int) -> bytes:
        inode = self.inode(ino)
        if not stat.S_ISLNK(inode.mode):
            raise FsError(errno.EINVAL, "not a symlink")
        return inode.target

    def readdir(self, ino: int, after: int, limit: int) -> tuple:
        """Up to ``limit`` (name, cookie, attr) with a cookie greater than ``after``; each
        counts as a kernel lookup (the caller forgets those the kernel did not take)."""
        directory = self.directory(ino).directory
        result = []
        for cookie, name, child_ino in directory.after(after):
            if len(result) >= limit:
                break
            child = self._state.inodes[child_ino]
            child.lookups += 1
            result.append((name, cookie, child.attr()))
        return tuple(result)

    def dot_entries(self, ino: int) -> tuple:
        """(name, cookie, attr) of directory ``ino``'s "." and "..". Not counted as lookups:
        the kernel takes no reference for them (fs/fuse/readdir.c, fuse_direntplus_link)."""
        directory = self.directory(ino)
        parent = self._state.inodes.get(directory.parent, directory)  # gone: removed, unlisted
        return ((b".", DOT_COOKIE, directory.attr()), (b"..", DOTDOT_COOKIE, parent.attr()))

    def getxattr(self, ino: int, name: bytes) -> bytes:
        xattrs = self.inode(ino).xattrs or {}
        check_xattr_name(name)
        if name not in xattrs:
            raise FsError(pyfuse3.ENOATTR, "no such attribute")
        return xattrs[name]

    def listxattr(self, ino: int) -> tuple:
        return tuple(self.inode(ino).xattrs or ())

    def map_blocks(self, ino: int, first: int, count: int) -> tuple[int, tuple]:
        """The file's size and its mapped blocks in [first, first + count), as flat
        (lblk, pblk, crc) triples in lblk order."""
        inode = self.inode(ino)
        if inode.blocks is None:
            raise FsError(errno.EISDIR if inode.is_dir else errno.EINVAL, "not a regular file")
        flat = []
        blocks = inode.blocks
        if count < len(blocks):
            for lblk in range(first, first + count):
                packed = blocks.get(lblk)
                if packed is not None:
                    flat.extend((lblk, packed >> 32, packed & 0xFFFFFFFF))
        else:
            end = first + count
            for lblk in sorted(b for b in blocks if first <= b < end):
                packed = blocks[lblk]
                flat.extend((lblk, packed >> 32, packed & 0xFFFFFFFF))
        return (inode.size, tuple(flat))

    def atime_due(self, ino: int) -> bool:
        """relatime, as Linux mounts by default: a read moves atime only when atime is not newer
        than the last change or is a day old, so reads rarely cost a transaction (and asking
        here first spares the rest a message)."""
        inode = self._state.inodes.get(ino)
        return inode is not None and (
            inode.atime_ns <= inode.mtime_ns or inode.atime_ns <= inode.ctime_ns
            or self._clock() - inode.atime_ns >= RELATIME_PERIOD_NS)

    def sync_point(self) -> int:
        """The LSN of the last transaction applied: what an fsync must wait for."""
        return self._last_lsn()


def check_xattr_name(name: bytes) -> None:
    if len(name) > XATTR_NAME_MAX:
        raise FsError(errno.ERANGE, "attribute name too long")
    if name in acl.NAMES:
        return
    if not name.startswith(XATTR_NAMESPACES):
        raise FsError(errno.EOPNOTSUPP, "unsupported attribute namespace")
    if name in XATTR_NAMESPACES:
        raise FsError(errno.EINVAL, "attribute name is only a namespace prefix")


class TreeManager:
    def __init__(self, inbox: trio.MemoryReceiveChannel, state: TreeState, *, last_lsn: int,
                 wal: Mailbox, log: Mailbox, wal_status: WalStatus, allocator: Mailbox,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self._inbox = inbox
        self._state = state
        self._last_lsn = last_lsn
        self._wal = wal
        self._log = log  # the WAL writer's log inbox: records, taken at its next commit
        self._wal_status = wal_status
        self._allocator = allocator
        self._clock = lambda: clamp_time_ns(clock())  # a clock past 2446 stamps as ext4 would
        self._failsafe: str | None = None
        self.queries = TreeQueries(state, lambda: self._last_lsn, clock)
        self._handlers = {
            m.SetAttr: self._setattr,
            m.MakeNode: self._make_node,
            m.Remove: self._remove,
            m.Rename: self._rename,
            m.Link: self._link,
            m.SetXattr: self._setxattr,
            m.RemoveXattr: self._removexattr,
            m.CommitWrite: self._commit_write,
            m.Forget: self._forget,
            m.Accessed: self._accessed,
            m.EnterFailsafe: self._enter_failsafe,
            m.TreeStats: self._stats,
            m.BeginSnapshot: self._begin_snapshot,
            m.SnapshotChunk: self._snapshot_chunk,
            m.AbortSnapshot: self._abort_snapshot,
        }

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            async with self._inbox:
                async for envelope in self._inbox:
                    await dispatch(envelope, self._handlers, "tree")
        finally:
            # Closing our side of the WAL and allocator inboxes tells them to finish.
            await self._log.aclose()
            await self._wal.aclose()
            await self._allocator.aclose()

    # ---- helpers ----

    def _inode(self, ino: int) -> Inode:
        return self.queries.inode(ino)

    def _directory(self, ino: int) -> Inode:
        return self.queries.directory(ino)

    def _live_directory(self, ino: int) -> Inode:
        inode = self._directory(ino)
        if inode.nlink == 0:
            raise FsError(errno.ENOENT, f"directory {ino} was removed")
        return inode

    def _child(self, parent: Inode, name: bytes) -> Inode:
        return self.queries.child(parent, name)

    async def _commit(self, ops: list) -> int:
        """Apply, log and return the LSN of one transaction."""
        if self._failsafe is None and self._wal_status.failed:
            self._failsafe = self._wal_status.failed
        if self._failsafe:
            raise FsError(errno.EROFS, f"read-only (failsafe): {self._failsafe}")
        if not ops:
            return 0
        # Encoded before it is applied: a value the log cannot hold must not change the state.
        payload = redo.encode_ops(ops)
        freed: list[int] = []
        try:
            for op in ops:
                freed.extend(self._state.apply(op))
        except Exception as exc:
            # State may be half-changed and the log does not have it: stop all changes now.
            self._failsafe = f"internal error applying a transaction: {exc!r}"
            log.exception("failsafe: transaction failed to apply", ops=[type(o).__name__ for o in ops])
            raise FsError(errno.EIO, self._failsafe) from None
        self._last_lsn += 1
        record = m.Append(self._last_lsn, payload)
        if not self._log.tell_nowait(record):
            await self._wal.tell(m.TakeRecords())  # a full log inbox: the writer empties it now
            await self._log.tell(record)
        if freed:
            await self._allocator.tell(m.FreeAfter(tuple(freed), self._last_lsn))
        return self._last_lsn

    def _drop_if_unused(self, inode: Inode, nlink_after: int, ops: list) -> None:
        if nlink_after == 0 and inode.lookups == 0:
            ops.append(redo.DropInode(inode.ino))

    # ---- requests ----

    async def _accessed(self, msg: m.Accessed):
        """A read of ``msg.ino``: move its atime if relatime says so (``atime_due``)."""
        if self._failsafe or self._wal_status.failed or not self.queries.atime_due(msg.ino):
            return
        await self._commit([self._state.inodes[msg.ino].put_op(atime_ns=self._clock())])

    def _refuse_checkpoint_in_failsafe(self) -> None:
        failsafe = self._failsafe or self._wal_status.failed
        if failsafe:
            # The state in memory may hold changes the log never got: never make it durable.
            self._state.end_capture()
            raise FsError(errno.EROFS, f"no checkpoint in failsafe mode: {failsafe}")

    async def _begin_snapshot(self, msg: m.BeginSnapshot):
        """Capture the tree as of the last LSN, to be read by SnapshotChunk between other
        requests (``snapshot.begin_capture``: copy-on-write in ``apply``)."""
        self._refuse_checkpoint_in_failsafe()
        if self._state.capture is not None:
            log.warning("checkpoint capture replaced by a new one",
                        abandoned_lsn=self._state.capture.lsn)
        capture = snapshot.begin_capture(self._state, self._last_lsn)
        return m.SnapshotStarted(capture.ident, capture.lsn)

    async def _snapshot_chunk(self, msg: m.SnapshotChunk):
        capture = self._state.capture
        if capture is None or capture.ident != msg.capture:
            raise FsError(errno.ESTALE, f"checkpoint capture {msg.capture} is not running")
        self._refuse_checkpoint_in_failsafe()
        return m.SnapshotPiece(*capture.next_chunk(msg.budget))

    async def _abort_snapshot(self, msg: m.AbortSnapshot):
        capture = self._state.capture
        if capture is not None and capture.ident == msg.capture:
            self._state.end_capture()

    async def _stats(self, msg: m.TreeStats):
        return m.TreeStatus(len(self._state.inodes), self._last_lsn,
                            self._failsafe or self._wal_status.failed)

    async def _enter_failsafe(self, msg: m.EnterFailsafe):
        if not self._failsafe:
            self._failsafe = msg.reason
            log.error("failsafe: filesystem is now read-only", reason=msg.reason)

    # ---- transactions ----

    async def _setattr(self, msg: m.SetAttr):
        inode = self._inode(msg.ino)
        now = self._clock()
        changes: dict = {"ctime_ns": now}
        ops: list = []
        if msg.mode is not None:
            changes["mode"] = stat.S_IFMT(inode.mode) | stat.S_IMODE(msg.mode)
            access = (inode.xattrs or {}).get(acl.ACCESS)
            if access is not None:  # posix_acl_chmod
                changed = acl.encode(acl.chmod(acl.decode(access), msg.mode))
                if changed != access:
                    ops.append(redo.PutXattr(inode.ino, acl.ACCESS, changed))
        if msg.uid is not None:
            changes["uid"] = msg.uid
        if msg.gid is not None:
            changes["gid"] = msg.gid
        if msg.size is not None:
            if inode.is_dir:
                raise FsError(errno.EISDIR, "cannot truncate a directory")
            if inode.blocks is None:
                raise FsError(errno.EINVAL, "cannot truncate this file type")
            if msg.size > MAX_FILE_SIZE:
                raise FsError(errno.EFBIG, "file too large")
            keep = -(-msg.size // BLOCK_SIZE)
            if msg.size < inode.size and any(lblk >= keep for lblk in inode.blocks):
                ops.append(redo.TruncateBlocks(inode.ino, keep))
            if msg.tail is not None:
                ops.append(redo.PutBlocks(inode.ino, msg.tail))
            changes["size"] = msg.size
            changes["mtime_ns"] = now
        if msg.atime_ns is not None:
            changes["atime_ns"] = clamp_time_ns(msg.atime_ns)
        if msg.mtime_ns is not None:
            changes["mtime_ns"] = clamp_time_ns(msg.mtime_ns)
        ops.append(inode.put_op(**changes))
        lsn = await self._commit(ops)
        return m.Changed(inode.attr(), lsn)

    async def _make_node(self, msg: m.MakeNode):
        parent = self._live_directory(msg.parent)
        _check_name(msg.name)
        if msg.name in parent.directory.names:
            raise FsError(errno.EEXIST, f"{msg.name!r} exists")
        if len(msg.target) > SYMLINK_MAX:
            raise FsError(errno.ENAMETOOLONG, "symlink target too long")
        kind = stat.S_IFMT(msg.mode)
        if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK,
                        stat.S_IFCHR, stat.S_IFBLK):
            raise FsError(errno.EINVAL, f"unsupported file type {kind:o}")
        now = self._clock()
        ino = self._state.next_ino
        mode, gid = msg.mode, msg.gid
        if parent.mode & stat.S_ISGID:
            # setgid directories: new entries inherit the group, new directories the bit too
            gid = parent.gid
            if kind == stat.S_IFDIR:
                mode |= stat.S_ISGID
        is_dir = kind == stat.S_IFDIR
        inherited = []
        default = (parent.xattrs or {}).get(acl.DEFAULT)
        if kind != stat.S_IFLNK:  # a symlink is 0777 whatever the umask or the ACLs
            if default is None:
                mode &= ~(msg.umask & 0o777)
            else:  # posix_acl_create: the default ACL replaces the umask
                mode, access = acl.inherit(acl.decode(default), mode)
                if access is not None:
                    inherited.append(redo.PutXattr(ino, acl.ACCESS, acl.encode(access)))
                if is_dir:
                    inherited.append(redo.PutXattr(ino, acl.DEFAULT, default))
        ops = [
            redo.PutInode(ino, mode, 2 if is_dir else 1, msg.uid, gid,
                       msg.rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0,
                       len(msg.target) if kind == stat.S_IFLNK else 0, now, now, now),
            *inherited,
        ]
        if kind == stat.S_IFLNK:
            ops.append(redo.PutTarget(ino, msg.target))
        ops.append(redo.PutEntry(parent.ino, msg.name, ino))
        ops.append(parent.put_op(nlink=parent.nlink + is_dir, mtime_ns=now, ctime_ns=now))
        lsn = await self._commit(ops)
        inode = self._state.inodes[ino]
        inode.lookups += 1
        return m.Changed(inode.attr(), lsn)

    async def _remove(self, msg: m.Remove):
        parent = self._directory(msg.parent)
        if msg.name in (b".", b".."):
            raise FsError(errno.EINVAL if msg.name == b"." else errno.ENOTEMPTY, "cannot remove")
        child = self._child(parent, msg.name)
        if msg.directory:
            if not child.is_dir:
                raise FsError(errno.ENOTDIR, "not a directory")
            if child.directory.names:
                raise FsError(errno.ENOTEMPTY, "directory not empty")
        elif child.is_dir:
            raise FsError(errno.EISDIR, "is a directory")
        now = self._clock()
        nlink_after = 0 if child.is_dir else child.nlink - 1
        ops = [
            redo.DropEntry(parent.ino, msg.name),
            child.put_op(nlink=nlink_after, ctime_ns=now),
            parent.put_op(nlink=parent.nlink - child.is_dir, mtime_ns=now, ctime_ns=now),
        ]
        self._drop_if_unused(child, nlink_after, ops)
        return m.Committed(await self._commit(ops))

    def _is_inside(self, ino: int, ancestor: int) -> bool:
        while True:
            if ino == ancestor:
                return True
            if ino == ROOT_INO:
                return False
            ino = self._state.inodes[ino].parent

    async def _rename(self, msg: m.Rename):
        if msg.flags & ~(pyfuse3.RENAME_EXCHANGE | pyfuse3.RENAME_NOREPLACE) or (
                msg.flags & pyfuse3.RENAME_EXCHANGE and msg.flags & pyfuse3.RENAME_NOREPLACE):
            raise FsError(errno.EINVAL, "invalid rename flags")
        old_parent = self._directory(msg.old_parent)
        new_parent = self._live_directory(msg.new_parent)
        _check_name(msg.new_name)
        source = self._child(old_parent, msg.old_name)
        target_ino = new_parent.directory.names.get(msg.new_name)
        target = self._state.inodes[target_ino] if target_ino is not None else None
        if msg.flags & pyfuse3.RENAME_EXCHANGE:
            if target is None:
                raise FsError(errno.ENOENT, "exchange target does not exist")
            return m.Committed(await self._exchange(old_parent, msg.old_name, source,
                                                    new_parent, msg.new_name, target))
        if target is not None and msg.flags & pyfuse3.RENAME_NOREPLACE:
            raise FsError(errno.EEXIST, "target exists")
        if target is source:
            return m.Committed(0)
        if source.is_dir and self._is_inside(new_parent.ino, source.ino):
            raise FsError(errno.EINVAL, "cannot move a directory into itself")
        if target is not None:
            if source.is_dir and not target.is_dir:
                raise FsError(errno.ENOTDIR, "target is not a directory")
            if not source.is_dir and target.is_dir:
                raise FsError(errno.EISDIR, "target is a directory")
            if target.is_dir and target.directory.names:
                raise FsError(errno.ENOTEMPTY, "target directory not empty")
        now = self._clock()
        nlink_delta = {old_parent.ino: 0, new_parent.ino: 0}
        if source.is_dir:
            nlink_delta[old_parent.ino] -= 1
            nlink_delta[new_parent.ino] += 1
        ops: list = [redo.DropEntry(old_parent.ino, msg.old_name),
                     redo.PutEntry(new_parent.ino, msg.new_name, source.ino),
                     source.put_op(ctime_ns=now)]
        if target is not None:
            target_nlink = 0 if target.is_dir else target.nlink - 1
            nlink_delta[new_parent.ino] -= target.is_dir
            ops.append(target.put_op(nlink=target_nlink, ctime_ns=now))
            self._drop_if_unused(target, target_nlink, ops)
        for ino, delta in nlink_delta.items():
            parent = self._state.inodes[ino]
            ops.append(parent.put_op(nlink=parent.nlink + delta, mtime_ns=now, ctime_ns=now))
        return m.Committed(await self._commit(ops))

    async def _exchange(self, old_parent: Inode, old_name: bytes, source: Inode,
                        new_parent: Inode, new_name: bytes, target: Inode) -> int:
        if source is target:
            return 0
        if old_parent is not new_parent:
            if source.is_dir and self._is_inside(new_parent.ino, source.ino):
                raise FsError(errno.EINVAL, "cannot move a directory into itself")
            if target.is_dir and self._is_inside(old_parent.ino, target.ino):
                raise FsError(errno.EINVAL, "cannot move a directory into itself")
        now = self._clock()
        delta = int(target.is_dir) - int(source.is_dir)
        ops: list = [redo.PutEntry(old_parent.ino, old_name, target.ino),
                     redo.PutEntry(new_parent.ino, new_name, source.ino),
                     source.put_op(ctime_ns=now), target.put_op(ctime_ns=now)]
        if old_parent is new_parent:
            ops.append(old_parent.put_op(mtime_ns=now, ctime_ns=now))
        else:
            ops.append(old_parent.put_op(nlink=old_parent.nlink + delta, mtime_ns=now,
                                         ctime_ns=now))
            ops.append(new_parent.put_op(nlink=new_parent.nlink - delta, mtime_ns=now,
                                         ctime_ns=now))
        return await self._commit(ops)

    async def _link(self, msg: m.Link):
        inode = self._inode(msg.ino)
        parent = self._live_directory(msg.new_parent)
        _check_name(msg.new_name)
        if inode.is_dir:
            raise FsError(errno.EPERM, "hard links to directories are not allowed")
        if inode.nlink == 0:
            raise FsError(errno.ENOENT, "file was removed")
        if msg.new_name in parent.directory.names:
            raise FsError(errno.EEXIST, f"{msg.new_name!r} exists")
        now = self._clock()
        ops = [redo.PutEntry(parent.ino, msg.new_name, inode.ino),
               inode.put_op(nlink=inode.nlink + 1, ctime_ns=now),
               parent.put_op(mtime_ns=now, ctime_ns=now)]
        lsn = await self._commit(ops)
        inode.lookups += 1
        return m.Changed(inode.attr(), lsn)

    async def _forget(self, msg: m.Forget):
        unused = {}
        for i in range(0, len(msg.pairs), 2):
            inode = self._state.inodes.get(msg.pairs[i])
            if inode is None or inode.ino == ROOT_INO:
                continue
            inode.lookups = max(0, inode.lookups - msg.pairs[i + 1])
            if inode.nlink == 0 and inode.lookups == 0:
                # The kernel may name one inode twice in a batch: drop it once.
                unused[inode.ino] = redo.DropInode(inode.ino)
        ops = list(unused.values())
        if ops and not self._failsafe:
            return m.Committed(await self._commit(ops))
        return None

    async def _setxattr(self, msg: m.SetXattr):
        inode = self._inode(msg.ino)
        check_xattr_name(msg.name)
        if len(msg.value) > XATTR_VALUE_MAX:
            raise FsError(errno.E2BIG, "attribute value too large")
        if msg.name in acl.NAMES:
            return m.Committed(await self._commit(self._set_acl(inode, msg)))
        xattrs = inode.xattrs or {}
        if xattrs.get(msg.name) == msg.value:
            # As ext4: storing the value an attribute already has changes nothing, not even
            # ctime (but still fails on a read-only filesystem).
            return m.Committed(await self._commit([]))
        total = sum(len(k) + len(v) for k, v in xattrs.items() if k != msg.name)
        if total + len(msg.name) + len(msg.value) > XATTR_TOTAL_MAX:
            raise FsError(errno.ENOSPC, "no space left for extended attributes")
        if msg.name not in xattrs and sum(map(len, xattrs)) + len(xattrs) + len(msg.name) + 1 \
                > XATTR_LIST_MAX:
            raise FsError(errno.ENOSPC, "the attribute names would not fit in a listxattr")
        ops = [redo.PutXattr(inode.ino, msg.name, msg.value),
               inode.put_op(ctime_ns=self._clock())]
        return m.Committed(await self._commit(ops))

    def _set_acl(self, inode: Inode, msg: m.SetXattr) -> list:
        """The operations of setting (or, for an empty value, removing) an ACL, as ext4 does
        (ext4_set_acl): an access ACL sets the mode's permission bits and is kept only if the
        mode cannot say it all; setting what is already there changes nothing."""
        if stat.S_ISLNK(inode.mode):
            raise FsError(errno.EOPNOTSUPP, "symlinks have no ACLs")
        entries = acl.decode(msg.value)
        if msg.name == acl.DEFAULT and not inode.is_dir:
            if entries is not None:
                raise FsError(errno.EACCES, "only directories have a default ACL")
            return []
        current = (inode.xattrs or {}).get(msg.name)
        mode = inode.mode
        if entries is not None and msg.name == acl.ACCESS:
            mode, equivalent = acl.mode_of(entries, mode)
            if equivalent:
                entries = None
            if not msg.keep_setgid:
                mode &= ~stat.S_ISGID
        value = None if entries is None else acl.encode(entries)
        ops: list = []
        if value is not None and value != current:
            ops.append(redo.PutXattr(inode.ino, msg.name, value))
        elif value is None and current is not None:
            ops.append(redo.DropXattr(inode.ino, msg.name))
        if value is not None:
            others = sum(len(k) + len(v) for k, v in (inode.xattrs or {}).items()
                         if k != msg.name)
            if others + len(msg.name) + len(value) > XATTR_TOTAL_MAX:
                raise FsError(errno.ENOSPC, "no space left for extended attributes")
        if ops or mode != inode.mode:
            ops.append(inode.put_op(mode=mode, ctime_ns=self._clock()))
        return ops

    async def _removexattr(self, msg: m.RemoveXattr):
        inode = self._inode(msg.ino)
        check_xattr_name(msg.name)
        if msg.name in acl.NAMES:
            # As ext4: removing an ACL that is not there succeeds (and changes nothing).
            return m.Committed(await self._commit(self._set_acl(inode, m.SetXattr(
                inode.ino, msg.name, b""))))
        if msg.name not in (inode.xattrs or {}):
            raise FsError(pyfuse3.ENOATTR, "no such attribute")
        ops = [redo.DropXattr(inode.ino, msg.name), inode.put_op(ctime_ns=self._clock())]
        return m.Committed(await self._commit(ops))

    async def _commit_write(self, msg: m.CommitWrite):
        inode = self._inode(msg.ino)
        if inode.blocks is None:
            raise FsError(errno.EINVAL, "not a regular file")
        end = msg.offset + msg.length
        if end > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG, "file too large")
        now = self._clock()
        ops = [redo.PutData(inode.ino, msg.blocks, msg.data) if msg.data
               else redo.PutBlocks(inode.ino, msg.blocks),
               inode.put_op(size=max(inode.size, end), mtime_ns=now, ctime_ns=now)]
        lsn = await self._commit(ops)
        return m.Changed(inode.attr(), lsn)
