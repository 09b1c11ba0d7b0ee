"""The single error edge between pyfuse3 and razorfs.

pyfuse3 turns only ``FUSEError`` into an errno; any other exception ends its main loop and the
mount dies ("Transport endpoint is not connected"). Every handler is wrapped by ``fuse_edge``:
domain errors (``FsError``) become their errno, anything unexpected becomes EIO plus a logged
traceback. Tests construct the operations with ``reraise_unexpected=True`` so bugs fail loudly.
Each request's log lines carry its op, inode and a request id.
"""

from __future__ import annotations

import errno
import functools
import itertools
import time

import pyfuse3
import structlog

from razorfs.errors import FsError
from razorfs.log import current_request, debug_enabled

log = structlog.get_logger("razorfs.fuse")

_request_ids = itertools.count(1)


def to_fuse_error(exc: BaseException) -> pyfuse3.FUSEError | None:
    """The FUSEError for an expected exception, None for an unexpected one."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    if isinstance(exc, FsError):
        return pyfuse3.FUSEError(exc.errno)
    return None


def fuse_edge(handler):
    op = handler.__name__

    @functools.wraps(handler)
    async def edge(self, first_arg=None, *args):
        inode = first_arg if isinstance(first_arg, int) else None
        started = time.perf_counter()
        failed = True
        context = current_request.set((op, inode, next(_request_ids)))
        try:
            result = await handler(self, first_arg, *args)
            failed = False
            return result
        except Exception as exc:
            mapped = to_fuse_error(exc)
            if mapped is not None:
                raise mapped from None
            if self.reraise_unexpected:
                raise
            log.exception("unexpected error in request; answered EIO")
            self.metrics.unexpected_errors += 1
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            seconds = time.perf_counter() - started
            self.metrics.record(op, seconds, failed)
            if debug_enabled():
                log.debug("request", seconds=round(seconds, 6), failed=failed)
            current_request.reset(context)

    return edge
