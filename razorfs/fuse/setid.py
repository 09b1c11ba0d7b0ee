"""The Linux rules for clearing set-user-ID and set-group-ID bits that the kernel's FUSE client
leaves to the filesystem, decided with the caller's credentials as the kernel gives them."""

from __future__ import annotations

import stat


def supplementary_groups(pid: int) -> set[int]:
    """The caller's supplementary groups, from procfs (memory, not disk: no thread needed).
    A caller that is gone counts as in no group, so a setgid bit is dropped rather than kept."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        return set()
    return set()


def setid_bits_dropped(mode: int, file_gid: int, uid: int, gid: int, pid: int) -> int:
    """The set-id bits Linux clears when this caller truncates the file
    (setattr_should_drop_suidgid): S_ISUID always, S_ISGID if the group may execute or the
    caller is outside the file's group; nothing for root (CAP_FSETID). Needed for
    open(O_TRUNC), which the kernel leaves wholly to OPEN (atomic_o_trunc) with no SETATTR."""
    if uid == 0 or not stat.S_ISREG(mode):
        return 0
    dropped = mode & stat.S_ISUID
    if (mode & (stat.S_ISGID | stat.S_IXGRP) == stat.S_ISGID | stat.S_IXGRP
            or setgid_dropped(mode, file_gid, uid, gid, pid)):
        dropped |= stat.S_ISGID
    return dropped


def setgid_dropped(mode: int, file_gid: int, uid: int, gid: int, pid: int) -> bool:
    """Whether Linux drops S_ISGID here (setattr_should_drop_sgid) in the one case the kernel's
    FUSE client leaves to us: a regular file, setgid without group execute, a caller outside
    the file's group and not root (CAP_FSETID, approximated by uid 0). The client asks with
    the caller's credentials by a SETATTR: before a write (one setting nothing if there is no
    S_ISUID to kill as well), for a chown (one setting nothing for chown(f, -1, -1)) and for a
    truncate. A chmod never needs it: the kernel strips S_ISGID from a non-member's chmod."""
    if (uid == 0 or not stat.S_ISREG(mode)
            or mode & (stat.S_ISGID | stat.S_IXGRP) != stat.S_ISGID):
        return False
    return not in_group_or_capable(file_gid, uid, gid, pid)


def in_group_or_capable(file_gid: int, uid: int, gid: int, pid: int) -> bool:
    """Whether the caller is in the file's group or privileged (CAP_FSETID, approximated by uid
    0): Linux keeps S_ISGID when such a caller's access ACL changes the mode
    (posix_acl_update_mode), which the kernel's FUSE client leaves to us."""
    return uid == 0 or gid == file_gid or file_gid in supplementary_groups(pid)
