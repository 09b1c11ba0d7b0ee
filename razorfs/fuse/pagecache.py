"""The kernel's page cache of a file kept coherent with direct I/O on the same file.

Files are opened with keep_cache: a re-read, even through a new descriptor, is served from the
page cache without a request, which is right because every change comes through this mount.
Buffered writes update the cache themselves (write-through), and a direct write invalidates the
cached range before it starts and, when it is synchronous, after it ends. An asynchronous direct
write (io_submit, io_uring) is not invalidated after it ends (fs/fuse/file.c: the kernel's
post-write invalidation is skipped for a queued kiocb, and fuse_aio_complete does none): a
buffered read of the range while it was in flight cached the old bytes, and kept them.

So after a write through a descriptor opened with O_DIRECT has been applied, the daemon drops
the file's cached pages itself (``pyfuse3.invalidate_inode``: pyfuse3 offers the whole file or
the attributes only, not a range) before it answers the write. The kernel waits for every READ
in flight on those pages, so the call runs in a worker thread while the trio loop answers them.
Only pages that can be stale matter: those read, or written through the cache, while a direct
descriptor of the file was open (pages cached before it opened are invalidated by the kernel
before the direct write starts). Files no direct descriptor has open cost a dict lookup per
read; a direct write pays the invalidation only when such a page may exist.

Not covered: O_DIRECT switched on with fcntl(F_SETFL) on a descriptor opened without it (the
daemon never learns of it: FUSE sends no flags with a WRITE that tell a direct one apart).
"""

from __future__ import annotations

import errno

import pyfuse3
import trio


class DirectIoCoherence:
    def __init__(self) -> None:
        self._direct_opens: dict[int, int] = {}  # inode -> descriptors opened with O_DIRECT
        self._maybe_stale: set[int] = set()  # of those: a page may have been cached since

    def opened(self, ino: int) -> None:
        self._direct_opens[ino] = self._direct_opens.get(ino, 0) + 1

    def released(self, ino: int) -> None:
        left = self._direct_opens[ino] - 1
        if left:
            self._direct_opens[ino] = left
        else:
            del self._direct_opens[ino]
            self._maybe_stale.discard(ino)

    def caching(self, ino: int) -> None:
        """A READ (or a buffered write) of ``ino`` began: the kernel caches its pages.
        Called before the request maps any block."""
        if ino in self._direct_opens:
            self._maybe_stale.add(ino)

    async def direct_write_applied(self, ino: int) -> None:
        """A direct write of ``ino`` has been applied: drop the pages it may have made stale."""
        if ino not in self._maybe_stale:
            return
        self._maybe_stale.discard(ino)  # a READ from now on maps the new blocks
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel holds no such inode any more
                raise
