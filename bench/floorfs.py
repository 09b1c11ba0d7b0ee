"""The floor: a pyfuse3 + trio filesystem that keeps everything in memory and does nothing else.

    .venv/bin/python bench/floorfs.py MOUNTPOINT      # serves until unmounted (fusermount3 -u)

What it costs per request is what pyfuse3 and trio alone cost, the lower bound for razorfs
(issue 14: razorfs's daemon time per request kind within 2x of this). It answers the kernel as
razorfs does (same timeouts, cached negative lookups, keep_cache, no FLUSH, ENODATA for unknown
xattrs) so that both see the same requests. It counts requests per handler, named as razorfs
names them in `razorfs stats --json`; `getfattr -n user.floor.counts MOUNTPOINT` reads them.
"""

from __future__ import annotations

import collections
import errno
import functools
import json
import os
import stat
import sys
import time

import pyfuse3
import trio

TIMEOUT = 1.0  # razorfs's ATTR_TIMEOUT: the kernel revalidates as often as with razorfs
COUNTS_XATTR = b"user.floor.counts"


class Node:
    def __init__(self, ino: int, mode: int, ctx) -> None:
        self.attr = pyfuse3.EntryAttributes()
        now = time.time_ns()
        attr = self.attr
        attr.st_ino, attr.st_mode, attr.st_nlink = ino, mode, 2 if stat.S_ISDIR(mode) else 1
        attr.st_uid, attr.st_gid = (ctx.uid, ctx.gid) if ctx else (os.getuid(), os.getgid())
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = now
        attr.entry_timeout = attr.attr_timeout = TIMEOUT
        attr.st_blksize = 4096
        self.data = bytearray()
        self.children: dict[bytes, int] = {}


def counted(handler):
    @functools.wraps(handler)
    async def wrapper(self, *args):
        self.counts[handler.__name__] += 1
        return await handler(self, *args)
    return wrapper


class Floor(pyfuse3.Operations):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.nodes = {pyfuse3.ROOT_INODE: Node(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755, None)}
        self.next_ino = pyfuse3.ROOT_INODE + 1

    def _new(self, parent: int, name: bytes, mode: int, ctx) -> pyfuse3.EntryAttributes:
        if name in self.nodes[parent].children:
            raise pyfuse3.FUSEError(errno.EEXIST)
        node = self.nodes[self.next_ino] = Node(self.next_ino, mode, ctx)
        self.nodes[parent].children[name] = self.next_ino
        self.next_ino += 1
        return node.attr

    def _child(self, parent: int, name: bytes) -> int:
        try:
            return self.nodes[parent].children[name]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _remove(self, parent: int, name: bytes) -> None:
        del self.nodes[self._child(parent, name)]
        del self.nodes[parent].children[name]

    @counted
    async def lookup(self, parent, name, ctx=None):
        ino = self.nodes[parent].children.get(name)
        if ino is None:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino, negative.entry_timeout = 0, TIMEOUT
            return negative
        return self.nodes[ino].attr

    @counted
    async def getattr(self, ino, ctx=None):
        return self.nodes[ino].attr

    @counted
    async def setattr(self, ino, attr, fields, fh, ctx):
        node = self.nodes[ino]
        if fields.update_size:
            del node.data[attr.st_size:]
            node.data.extend(bytes(attr.st_size - len(node.data)))
            node.attr.st_size = attr.st_size
        for field in ("mode", "uid", "gid", "atime", "mtime"):
            if getattr(fields, f"update_{field}"):
                name = f"st_{field}_ns" if field.endswith("time") else f"st_{field}"
                setattr(node.attr, name, getattr(attr, name))
        return node.attr

    @counted
    async def getxattr(self, ino, name, ctx):
        if ino == pyfuse3.ROOT_INODE and name == COUNTS_XATTR:
            return json.dumps(self.counts).encode()
        raise pyfuse3.FUSEError(errno.ENODATA)

    @counted
    async def mkdir(self, parent, name, mode, ctx):
        return self._new(parent, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx)

    @counted
    async def create(self, parent, name, mode, flags, ctx):
        attr = self._new(parent, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        return pyfuse3.FileInfo(fh=attr.st_ino), attr

    @counted
    async def unlink(self, parent, name, ctx):
        self._remove(parent, name)

    @counted
    async def rmdir(self, parent, name, ctx):
        if self.nodes[self._child(parent, name)].children:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        self._remove(parent, name)

    @counted
    async def rename(self, parent_old, name_old, parent_new, name_new, flags, ctx):
        replaced = self.nodes[parent_new].children.get(name_new)
        if replaced is not None:
            del self.nodes[replaced]
        self.nodes[parent_new].children[name_new] = self._child(parent_old, name_old)
        del self.nodes[parent_old].children[name_old]

    @counted
    async def open(self, ino, flags, ctx):
        return pyfuse3.FileInfo(fh=ino, keep_cache=True)

    @counted
    async def read(self, fh, off, size):
        return bytes(self.nodes[fh].data[off:off + size])

    @counted
    async def write(self, fh, off, buf):
        node = self.nodes[fh]
        if off > len(node.data):
            node.data.extend(bytes(off - len(node.data)))
        node.data[off:off + len(buf)] = buf
        node.attr.st_size = len(node.data)
        return len(buf)

    @counted
    async def flush(self, fh):
        raise pyfuse3.FUSEError(errno.ENOSYS)  # as razorfs: the kernel stops sending FLUSH

    @counted
    async def fsync(self, fh, datasync):
        pass

    @counted
    async def release(self, fh):
        pass

    @counted
    async def forget(self, inode_list):
        pass  # nodes live until unlinked: the floor never frees on forget

    @counted
    async def opendir(self, ino, ctx):
        return ino

    @counted
    async def readdir(self, fh, start_id, token):
        entries = list(self.nodes[fh].children.items())
        for index, (name, ino) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self.nodes[ino].attr, index):
                break

    @counted
    async def releasedir(self, fh):
        pass


def main() -> None:
    pyfuse3.init(Floor(), sys.argv[1], set(pyfuse3.default_options) | {"fsname=floorfs"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
