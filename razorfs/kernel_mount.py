"""The FUSE mount made by the daemon itself (mount(2) as root), instead of by libfuse.

Why: only a mount whose flags carry MS_POSIXACL makes the kernel's FUSE client leave the umask to
the filesystem (fs/fuse/inode.c sets ``dont_mask`` from it; libfuse 3.14 neither passes that
flag nor asks for FUSE_DONT_MASK, and pyfuse3 cannot). Without it the kernel applies the umask
to every create before razorfs sees the mode, and a file created under a default ACL could not
get the mode ext4 gives it (the requested mode masked by the ACL, the umask ignored). libfuse
takes the mounted /dev/fuse descriptor as the mountpoint ``/dev/fd/N``. Everything else about
the mount is what libfuse does as root with the same options (its lib/mount.c): nosuid and nodev
unless told otherwise, the flags and kernel options it knows, the same source and type, and a
lazy unmount at the end if the mount is still ours.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
from collections.abc import Iterable

import structlog

log = structlog.get_logger("razorfs.mount")

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_POSIXACL = 1 << 16
MNT_DETACH = 0x2

# libfuse's table of options that are mount(2) flags: option -> (flag, set or cleared)
FLAG_OPTIONS = {
    "rw": (MS_RDONLY, False), "ro": (MS_RDONLY, True),
    "suid": (MS_NOSUID, False), "nosuid": (MS_NOSUID, True),
    "dev": (MS_NODEV, False), "nodev": (MS_NODEV, True),
    "exec": (MS_NOEXEC, False), "noexec": (MS_NOEXEC, True),
    "async": (MS_SYNCHRONOUS, False), "sync": (MS_SYNCHRONOUS, True),
    "atime": (MS_NOATIME, False), "noatime": (MS_NOATIME, True),
    "dirsync": (MS_DIRSYNC, True),
}
KERNEL_OPTIONS = frozenset({"allow_other", "default_permissions"})  # passed in the data

_libc = ctypes.CDLL(None, use_errno=True)


class KernelMount:
    """A FUSE mount of ``mountpoint`` served through the /dev/fuse descriptor ``fd``."""

    def __init__(self, fd: int, mountpoint: str) -> None:
        self.fd = fd
        self.mountpoint = mountpoint

    @property
    def session_path(self) -> str:
        """What libfuse is given as the mountpoint: the descriptor, already mounted."""
        return f"/dev/fd/{self.fd}"

    def connected(self) -> bool:
        """False once the mount is gone (unmounted, or its connection aborted): the descriptor
        then polls POLLERR. Asked before libfuse closes the descriptor."""
        poller = select.poll()
        poller.register(self.fd, 0)
        return not any(events & select.POLLERR for _, events in poller.poll(0))

    def abandon(self) -> None:
        """Undo a mount libfuse never took over."""
        os.close(self.fd)
        self.detach()

    def detach(self) -> None:
        """Lazy unmount (libfuse's as root), after the descriptor is closed: a synchronous one
        could wait on requests to the daemon that is doing it."""
        if _libc.umount2(os.fsencode(self.mountpoint), MNT_DETACH) != 0:
            code = ctypes.get_errno()
            if code != errno.EINVAL:  # EINVAL: not mounted there any more
                raise OSError(code, f"umount {self.mountpoint}: {os.strerror(code)}")


def mount(mountpoint: str, options: Iterable[str]) -> KernelMount | None:
    """Mount at ``mountpoint`` with libfuse's mount ``options`` (fsname=, subtype=, flags,
    allow_other, default_permissions); None without the privilege to (then libfuse mounts,
    through fusermount3, and the kernel applies the umask itself)."""
    source, fstype = "fuse", "fuse"
    flags = MS_NOSUID | MS_NODEV | MS_POSIXACL
    kernel_options = []
    for option in sorted(options):
        name, _, value = option.partition("=")
        if name == "fsname":
            source = value
        elif name == "subtype":
            fstype = f"fuse.{value}"
        elif option in FLAG_OPTIONS:
            flag, enabled = FLAG_OPTIONS[option]
            flags = flags | flag if enabled else flags & ~flag
        elif option in KERNEL_OPTIONS:
            kernel_options.append(option)
        else:
            raise ValueError(f"mount option {option!r} is not one libfuse would pass on")
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    data = [f"fd={fd}", "rootmode=40000", f"user_id={os.getuid()}", f"group_id={os.getgid()}",
            *kernel_options]
    if _libc.mount(os.fsencode(source), os.fsencode(mountpoint), os.fsencode(fstype), flags,
                   ",".join(data).encode()) != 0:
        code = ctypes.get_errno()
        os.close(fd)
        if code == errno.EPERM:
            log.warning("not privileged to mount: libfuse mounts, the kernel applies the umask")
            return None
        raise OSError(code, f"mount {mountpoint}: {os.strerror(code)}")
    return KernelMount(fd, mountpoint)
