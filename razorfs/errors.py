"""Domain errors: each carries the errno the FUSE edge answers with."""

from __future__ import annotations

import errno
import os


class FsError(Exception):
    """A request that cannot be done, for a reason the caller must be told as an errno."""

    def __init__(self, errno_value: int, message: str = "") -> None:
        super().__init__(errno_value, message or os.strerror(errno_value))
        self.errno = errno_value
        self.message = message or os.strerror(errno_value)

    def __str__(self) -> str:
        return f"[{errno.errorcode.get(self.errno, self.errno)}] {self.message}"


class NoSuchEntry(FsError):
    """ENOENT for a name a directory does not hold (the FUSE layer lets the kernel cache it)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOENT, message)


class UsageError(Exception):
    """Bad input to a command (missing data directory, not razorfs, locked...): exit status 2."""
