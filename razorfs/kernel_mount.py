"""The FUSE mount made by the daemon itself (mount(2) as root), instead of by libfuse.

Why: only a mount whose flags carry MS_POSIXACL makes the kernel's FUSE client leave the umask to
the filesystem (fs/fuse/inode.c sets ``dont_mask`` from it; libfuse 3.14 neither passes that
flag nor asks for FUSE_DONT_MASK, and pyfuse3 cannot). Without it the kernel applies the umask
to every create before razorfs sees the mode, and a file created under a default ACL could not
get the mode ext4 gives it (the requested mode masked by the ACL, the umask ignored). libfuse
takes the mounted /dev/fuse descriptor as the mountpoint ``/dev/fd/N``. Everything else about
the mount is what libfuse does as root: nosuid, nodev, the same source and type, and a lazy
unmount at the end if the mount is still ours.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select

import structlog

log = structlog.get_logger("razorfs.mount")

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_POSIXACL = 1 << 16
MNT_DETACH = 0x2

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


def mount(mountpoint: str, source: str, *, allow_other: bool, read_only: bool
          ) -> KernelMount | None:
    """Mount razorfs at ``mountpoint``; None without the privilege to (then libfuse mounts,
    through fusermount3, and the kernel applies the umask itself)."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    options = [f"fd={fd}", "rootmode=40000", f"user_id={os.getuid()}",
               f"group_id={os.getgid()}", "default_permissions"]
    if allow_other:
        options.append("allow_other")
    flags = MS_NOSUID | MS_NODEV | MS_POSIXACL | (MS_RDONLY if read_only else 0)
    if _libc.mount(os.fsencode(source), os.fsencode(mountpoint), b"fuse.razorfs", flags,
                   ",".join(options).encode()) != 0:
        code = ctypes.get_errno()
        os.close(fd)
        if code == errno.EPERM:
            log.warning("not privileged to mount: libfuse mounts, the kernel applies the umask")
            return None
        raise OSError(code, f"mount {mountpoint}: {os.strerror(code)}")
    return KernelMount(fd, mountpoint)
