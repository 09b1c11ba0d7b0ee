"""What the kernel says is mounted where (/proc/self/mountinfo), read without touching the
mountpoint itself: a stat() of a dead FUSE mount fails, and one of a live mount served by the
calling process would be a request to itself."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class MountEntry:
    device: str  # major:minor, as /sys/class/bdi names it
    options: str  # the per-mount options (rw, nosuid, relatime...)
    fstype: str
    source: str  # for razorfs, the data directory percent-encoded (daemon.mount_source)


def unescape_mount_field(field: str) -> str:
    """Undo the octal escapes (\\040 for a space...) of /proc/self/mounts and mountinfo."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def mount_at(mountpoint: str) -> MountEntry | None:
    """The topmost mount at ``mountpoint``, or None."""
    target = os.path.abspath(mountpoint)
    found = None
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if unescape_mount_field(fields[4]) == target:
                separator = fields.index("-")
                found = MountEntry(fields[2], fields[5], fields[separator + 1],
                                   unescape_mount_field(fields[separator + 2]))
    return found
