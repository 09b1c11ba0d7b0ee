"""``mount.fuse.razorfs`` and ``umount.fuse.razorfs``: let mount(8), umount(8), /etc/fstab and
systemd's .mount units mount razorfs.

mount(8) runs ``/sbin/mount.fuse.razorfs DATA_DIR MOUNTPOINT [-o OPTIONS] [-s -f -n -v]`` for
``mount -t fuse.razorfs``, for fstab lines of that type and for ``mount -o remount,...`` of such
a mount; umount(8) runs ``/sbin/umount.fuse.razorfs MOUNTPOINT [-l -f -n -r -v]``. Link both
there (see README). Every option of mount(8) and fuse(8) is accepted with its meaning or as a
documented no-op (README, "mount(8) and /etc/fstab"); only an unknown option is refused:

- razorfs's own: ``durability=fsync|sync``, ``commit_interval=SECONDS``,
  ``metrics=ADDRESS:PORT``, ``log_level=LEVEL``, ``replica=s3://BUCKET/PREFIX``,
  ``replica_retention=DURATION``; ``sync`` and ``dirsync`` mean
  ``durability=sync`` (every change, directory changes included, durable before it returns);
- ``ro``/``rw``, ``noatime`` (else relatime), ``allow_other``; kernel flags passed to the
  mount as they are: ``nosuid``/``suid``, ``nodev``/``dev``, ``noexec``/``exec``;
- no-ops: ``atime``, ``relatime``, ``norelatime``, ``strictatime``, ``nostrictatime``,
  ``nodiratime``, ``diratime``, ``lazytime``, ``nolazytime``, ``async``; those only mount(8),
  systemd or the FUSE mount machinery read (``x-systemd.*``, ``_netdev``, ``nofail``,
  ``noauto``, ``user_id=``...).

``remount`` switches a live mount between ``ro`` and ``rw`` (the daemon commits everything and
refuses changes while read-only) and between ``noatime`` and relatime, and applies the kernel
flags; the other options take effect at the next mount.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass, field

from razorfs import cli
from razorfs.daemon import KERNEL_MOUNT_FLAGS
from razorfs.errors import UsageError
from razorfs.mounts import mount_at

EXIT_MOUNT_FAILED = 32  # mount(8)'s status for "mount failure"

_VALUES = {"durability": "--durability", "commit_interval": "--commit-interval",
           "metrics": "--metrics", "log_level": "--log-level", "replica": "--replica",
           "replica_retention": "--replica-retention"}
# Meaning razorfs has without being asked, or cannot have (README's known differences).
_NO_OPS = {"atime", "relatime", "norelatime", "strictatime", "nostrictatime", "nodiratime",
           "diratime", "lazytime", "nolazytime", "default_permissions"}
# Read by mount(8), systemd or the FUSE mount machinery, not by the filesystem.
_NOT_OURS = {"defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group",
             "nofail", "_netdev", "remount"}
_NOT_OURS_WITH_VALUE = {"user_id", "group_id", "comment"}

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_SYNCHRONOUS, _MS_REMOUNT, _MS_DIRSYNC, _MS_NOSYMFOLLOW = 16, 32, 128, 256
_MS_NOATIME, _MS_NODIRATIME = 1024, 2048
_MS_RELATIME, _MS_STRICTATIME, _MS_LAZYTIME = 1 << 21, 1 << 24, 1 << 25
# option → (kernel flag, set or clear): what a remount applies to the mount's flags
_KERNEL_FLAGS = {
    "ro": (_MS_RDONLY, True), "rw": (_MS_RDONLY, False),
    "nosuid": (_MS_NOSUID, True), "suid": (_MS_NOSUID, False),
    "nodev": (_MS_NODEV, True), "dev": (_MS_NODEV, False),
    "noexec": (_MS_NOEXEC, True), "exec": (_MS_NOEXEC, False),
    "sync": (_MS_SYNCHRONOUS, True), "async": (_MS_SYNCHRONOUS, False),
    "dirsync": (_MS_DIRSYNC, True),
    "nosymfollow": (_MS_NOSYMFOLLOW, True), "symfollow": (_MS_NOSYMFOLLOW, False),
    "nodiratime": (_MS_NODIRATIME, True), "diratime": (_MS_NODIRATIME, False),
    "lazytime": (_MS_LAZYTIME, True), "nolazytime": (_MS_LAZYTIME, False),
}
_ATIME_FLAGS = {"noatime": _MS_NOATIME, "relatime": _MS_RELATIME,
                "strictatime": _MS_STRICTATIME, "atime": 0, "norelatime": 0,
                "nostrictatime": _MS_RELATIME}


@dataclass
class MountRequest:
    """An option string read the way mount(8) means it: where two options contradict each
    other (``ro`` and ``rw``, ``sync`` and ``durability=fsync``...), the last one wins."""

    options: list[str]
    remount: bool = False
    allow_other: bool = False
    read_only: bool = False
    noatime: bool = False
    durability: str | None = None
    values: dict[str, str] = field(default_factory=dict)
    kernel_flags: list[str] = field(default_factory=list)


def parse(options: str) -> MountRequest:
    request = MountRequest([option for option in options.split(",") if option])
    for option in request.options:
        name, has_value, value = option.partition("=")
        if has_value and name == "durability" and value:
            request.durability = value
        elif has_value and name in _VALUES and value:
            request.values[name] = value
        elif has_value and (name in _NOT_OURS_WITH_VALUE or name.startswith("x-")):
            continue
        elif has_value:
            _unknown(option)
        elif name in ("ro", "rw"):
            request.read_only = name == "ro"
        elif name in ("sync", "dirsync"):
            request.durability = "sync"
        elif name == "async":
            request.durability = None
        elif name == "noatime":
            request.noatime = True
        elif name in _ATIME_FLAGS:
            request.noatime = False
        elif name == "allow_other":
            request.allow_other = True
        elif name in KERNEL_MOUNT_FLAGS:
            opposite = name[2:] if name.startswith("no") else f"no{name}"
            request.kernel_flags = [kept for kept in request.kernel_flags
                                    if kept not in (name, opposite)] + [name]
        elif name in _NO_OPS or name in _NOT_OURS or name.startswith("x-"):
            request.remount |= name == "remount"
        else:
            _unknown(option)
    return request


def _unknown(option: str):
    raise SystemExit(f"mount.fuse.razorfs: unknown option {option!r}")


def translate(data_dir: str, mountpoint: str, options: str) -> list[str]:
    """``razorfs mount`` arguments for a mount(8) option string."""
    return mount_arguments(data_dir, mountpoint, parse(options))


def mount_arguments(data_dir: str, mountpoint: str, request: MountRequest) -> list[str]:
    arguments = ["mount", data_dir, mountpoint]
    if request.allow_other:
        arguments.append("--allow-other")
    if request.read_only:
        arguments.append("--read-only")
    if request.durability is not None:
        arguments += ["--durability", request.durability]
    if request.noatime:
        arguments.append("--noatime")
    for name, value in request.values.items():
        arguments += [_VALUES[name], value]
    if request.kernel_flags:
        arguments += ["--mount-flags", ",".join(request.kernel_flags)]
    return arguments


def remount_flags(current: str, request: MountRequest) -> int:
    """mount(2) flags for a remount: the mount's current flags (its mountinfo options), then
    the request's options in order. Starting from the current flags keeps nosuid and nodev
    when the helper is run by hand with just ``-o remount,ro``."""
    flags = 0
    for option in current.split(",") + request.options:
        if option in _KERNEL_FLAGS:
            bit, enabled = _KERNEL_FLAGS[option]
            flags = flags | bit if enabled else flags & ~bit
        elif option in _ATIME_FLAGS:
            flags = (flags & ~(_MS_NOATIME | _MS_RELATIME | _MS_STRICTATIME)) | _ATIME_FLAGS[option]
    return flags | _MS_REMOUNT


def _mount_options(mountpoint: str) -> tuple[str, str]:
    """(source, per-mount options) of the razorfs mounted at ``mountpoint``; its source is its
    data directory, percent-encoded."""
    entry = mount_at(mountpoint)
    if entry is None or entry.fstype != "fuse.razorfs":
        raise UsageError(f"{mountpoint}: no razorfs is mounted there")
    return entry.source, entry.options


def remount(mountpoint: str, request: MountRequest) -> int:
    """The kernel's flags and the daemon's state switched together. To read-only: the kernel
    first (it refuses with EBUSY while a file is open for writing), then the daemon commits
    everything and refuses changes. To read-write: the daemon first, then the kernel."""
    from razorfs.control import ControlError, query

    try:
        source, current = _mount_options(mountpoint)
        data_dir = urllib.parse.unquote(source)
        flags = remount_flags(current, request)
        if request.read_only:
            _kernel_remount(source, mountpoint, flags)
        query(data_dir, "remount", read_only=request.read_only, noatime=request.noatime)
        if not request.read_only:
            _kernel_remount(source, mountpoint, flags)
    except (UsageError, ControlError, OSError) as exc:
        print(f"mount.fuse.razorfs: remount of {mountpoint} failed: {exc}", file=sys.stderr)
        return EXIT_MOUNT_FAILED
    return 0


def _kernel_remount(source: str, mountpoint: str, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    # FUSE ignores the data of a remount made through mount(2); flags are what it applies.
    if libc.mount(os.fsencode(source), os.fsencode(mountpoint), None,
                  ctypes.c_ulong(flags), None) != 0:
        error = ctypes.get_errno()
        reason = os.strerror(error)
        if flags & _MS_RDONLY and error == 16:  # EBUSY
            reason += " (a file is open for writing there)"
        raise OSError(error, reason)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mount.fuse.razorfs")
    parser.add_argument("data_dir")
    parser.add_argument("mountpoint")
    parser.add_argument("-o", dest="options", default="")
    parser.add_argument("-t", dest="fstype", default="fuse.razorfs")
    for flag in ("-s", "-f", "-n", "-v"):
        parser.add_argument(flag, action="store_true")
    args = parser.parse_args(argv)
    request = parse(args.options)
    if request.remount:
        return remount(args.mountpoint, request)
    return cli.main(mount_arguments(args.data_dir, args.mountpoint, request))


def umount_main(argv: list[str] | None = None) -> int:
    """umount(8)'s helper: unmount and return once the daemon has committed and exited (as
    `razorfs umount`), so that `systemctl stop` of a .mount unit waits for the final commit.
    ``-l`` detaches at once and leaves the daemon to finish when the last file is closed."""
    parser = argparse.ArgumentParser(prog="umount.fuse.razorfs")
    parser.add_argument("mountpoint")
    parser.add_argument("-t", dest="fstype", default="fuse.razorfs")
    parser.add_argument("-N", dest="namespace")
    for flag in ("-f", "-n", "-r", "-v", "-l"):
        parser.add_argument(flag, action="store_true")
    args = parser.parse_args(argv)
    if args.namespace:
        raise SystemExit("umount.fuse.razorfs: --namespace is not supported")
    if args.l:
        return subprocess.run(["fusermount3", "-u", "-z", args.mountpoint]).returncode
    return cli.main(["umount", args.mountpoint])


if __name__ == "__main__":
    sys.exit(main())
