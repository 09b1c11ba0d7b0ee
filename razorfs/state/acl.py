"""POSIX ACLs: the ``system.posix_acl_access`` / ``system.posix_acl_default`` values, and the
rules that tie them to the mode, as Linux applies them for ext4 (fs/posix_acl.c).

An ACL is stored as the xattr value the kernel exchanges with filesystems
(include/uapi/linux/posix_acl_xattr.h): a little-endian u32 version (2), then one 8-byte entry
per ACL entry, u16 tag, u16 permissions (rwx = 4|2|1), u32 id (a uid or gid for the named
entries, 0xFFFFFFFF for the others). The kernel checks a value before it reaches the daemon and
enforces stored ACLs itself; what it leaves to the filesystem (fs/fuse/acl.c, dir.c) is here:
the mode an access ACL implies, chmod rewriting the ACL, and inheritance at creation.
"""

from __future__ import annotations

import errno
import struct

from razorfs.errors import FsError

ACCESS = b"system.posix_acl_access"
DEFAULT = b"system.posix_acl_default"
NAMES = (ACCESS, DEFAULT)

VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF
RWX = 0o7
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")

Entries = tuple  # ((tag, perm, id), ...) in the order stored


def decode(value: bytes) -> Entries | None:
    """The ACL held by ``value``, checked as the kernel checks it (posix_acl_from_xattr, then
    posix_acl_valid): EOPNOTSUPP for another version, EINVAL for anything malformed. None for
    an empty value or a header without entries: no ACL, which removes one."""
    if not value:
        return None
    if len(value) < _HEADER.size:
        raise FsError(errno.EINVAL, "ACL shorter than its header")
    if _HEADER.unpack_from(value)[0] != VERSION:
        raise FsError(errno.EOPNOTSUPP, "unknown ACL version")
    if (len(value) - _HEADER.size) % _ENTRY.size:
        raise FsError(errno.EINVAL, "ACL length is not a whole number of entries")
    entries = tuple(
        (tag, perm, ident if tag in (USER, GROUP) else UNDEFINED_ID)
        for tag, perm, ident in _ENTRY.iter_unpack(value[_HEADER.size:]))
    if not entries:
        return None
    _check(entries)
    return entries


def _check(entries: Entries) -> None:
    """posix_acl_valid: one USER_OBJ, named users, one GROUP_OBJ, named groups, a MASK (needed
    when there are named entries), one OTHER, in that order; permissions rwx at most."""
    state, needs_mask = USER_OBJ, False
    for tag, perm, ident in entries:
        if perm & ~RWX:
            raise FsError(errno.EINVAL, f"ACL permissions {perm:#o} out of range")
        if tag in (USER, GROUP) and ident == UNDEFINED_ID:
            raise FsError(errno.EINVAL, "ACL entry names no valid id")
        if tag == USER_OBJ and state == USER_OBJ:
            state = USER
        elif tag == USER and state == USER:
            needs_mask = True
        elif tag == GROUP_OBJ and state == USER:
            state = GROUP
        elif tag == GROUP and state == GROUP:
            needs_mask = True
        elif tag == MASK and state == GROUP:
            state = OTHER
        elif tag == OTHER and (state == OTHER or (state == GROUP and not needs_mask)):
            state = 0
        else:
            raise FsError(errno.EINVAL, f"ACL entry with tag {tag:#x} out of place")
    if state != 0:
        raise FsError(errno.EINVAL, "ACL incomplete")


def encode(entries: Entries) -> bytes:
    return _HEADER.pack(VERSION) + b"".join(_ENTRY.pack(*entry) for entry in entries)


def mode_of(entries: Entries, mode: int) -> tuple[int, bool]:
    """posix_acl_equiv_mode: ``mode`` with its permission bits as the access ACL ``entries``
    grant them (the group bits are the MASK if there is one), and whether the ACL says no more
    than those bits (then it is not stored: the mode alone holds it)."""
    perms, equivalent = 0, True
    for tag, perm, _ in entries:
        if tag == USER_OBJ:
            perms |= perm << 6
        elif tag == GROUP_OBJ:
            perms |= perm << 3
        elif tag == OTHER:
            perms |= perm
        elif tag == MASK:
            perms = (perms & ~0o070) | perm << 3
            equivalent = False
        else:
            equivalent = False
    return (mode & ~0o777) | perms, equivalent


def chmod(entries: Entries, mode: int) -> Entries:
    """posix_acl_chmod: the access ACL after a chmod to ``mode``: owner and other entries take
    the new bits, and so does the MASK (the owning group's entry if there is no mask)."""
    group_tag = MASK if any(tag == MASK for tag, _, _ in entries) else GROUP_OBJ
    bits = {USER_OBJ: mode >> 6 & RWX, group_tag: mode >> 3 & RWX, OTHER: mode & RWX}
    return tuple((tag, bits.get(tag, perm), ident) for tag, perm, ident in entries)


def inherit(default: Entries, mode: int) -> tuple[int, Entries | None]:
    """posix_acl_create for a new inode (not a symlink) in a directory with the default ACL
    ``default``: its mode (the requested ``mode`` less what the ACL does not grant; the umask is
    not applied) and its access ACL (None when the mode holds it all)."""
    entries = []
    group_obj = mask = None
    equivalent = True
    for tag, perm, ident in default:
        if tag == USER_OBJ:
            perm &= mode >> 6 & RWX
            mode &= perm << 6 | ~0o700
        elif tag == OTHER:
            perm &= mode & RWX
            mode &= perm | ~0o007
        elif tag == GROUP_OBJ:
            group_obj = len(entries)
        elif tag == MASK:
            mask = len(entries)
            equivalent = False
        else:
            equivalent = False
        entries.append([tag, perm, ident])
    group = entries[mask if mask is not None else group_obj]
    group[1] &= mode >> 3 & RWX
    mode &= group[1] << 3 | ~0o070
    return mode, None if equivalent else tuple(map(tuple, entries))
