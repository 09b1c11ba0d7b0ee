"""POSIX ACLs through the actors: values checked as the kernel checks them, the mode an access
ACL implies, chmod rewriting it, inheritance at creation, each change one WAL record that
survives a power cut and a checkpoint. (What ext4 does in each case is checked against ext4
itself by tests/fuse/test_differential_users.py; the expected values here are those.)"""

import errno
import stat
import struct

from razorfs import fsck
from razorfs.actors import messages as m
from razorfs.state import acl
from razorfs.state.acl import GROUP, GROUP_OBJ, MASK, OTHER, USER, USER_OBJ

from .harness import ROOT, mounted, raises

ACCESS, DEFAULT = acl.ACCESS, acl.DEFAULT
NO_ID = 0xFFFFFFFF


def value(*entries, version=2) -> bytes:
    """An ACL xattr value: (tag, perm) or (tag, perm, id) entries."""
    return struct.pack("<I", version) + b"".join(
        struct.pack("<HHI", tag, perm, rest[0] if rest else NO_ID) for tag, perm, *rest in entries)


MINIMAL = value((USER_OBJ, 7), (GROUP_OBJ, 5), (OTHER, 0))              # = mode 0750
NAMED = value((USER_OBJ, 6), (USER, 6, 1000), (GROUP_OBJ, 4), (MASK, 6), (OTHER, 4))  # 0664
SHARED = value((USER_OBJ, 7), (GROUP_OBJ, 5), (GROUP, 7, 1234), (MASK, 7), (OTHER, 5))


def create(fs, name, mode, parent=ROOT, umask=0o022, target=b""):
    return fs.call(m.MakeNode(parent, name, mode, 0, 1000, 1000, target, umask))


def set_acl(fs, ino, name, data, keep_setgid=True):
    return fs.call(m.SetXattr(ino, name, data, keep_setgid))


def stored(fs, ino) -> dict:
    return {n: fs.queries.getxattr(ino, n) for n in fs.queries.listxattr(ino)}


async def test_malformed_values_are_refused_and_change_nothing(fs):
    f = (await create(fs, b"f", stat.S_IFREG | 0o644)).attr
    malformed = {
        "shorter than the header": b"\x02\x00",
        "a partial entry": MINIMAL[:-3],
        "named user without a mask": value((USER_OBJ, 7), (USER, 7, 5), (GROUP_OBJ, 5),
                                           (OTHER, 0)),
        "owner after the group": value((GROUP_OBJ, 5), (USER_OBJ, 7), (OTHER, 0)),
        "two owners": value((USER_OBJ, 7), (USER_OBJ, 7), (GROUP_OBJ, 5), (OTHER, 0)),
        "no other": value((USER_OBJ, 7), (GROUP_OBJ, 5)),
        "permission bit 8": value((USER_OBJ, 0o17), (GROUP_OBJ, 5), (OTHER, 0)),
        "unknown tag": value((USER_OBJ, 7), (0x40, 7), (GROUP_OBJ, 5), (OTHER, 0)),
        "named user without an id": value((USER_OBJ, 7), (USER, 7), (GROUP_OBJ, 5),
                                          (MASK, 7), (OTHER, 0)),
    }
    lsn = fs.queries.sync_point()
    for case, data in malformed.items():
        for name in (ACCESS, DEFAULT):
            with raises(errno.EINVAL):
                await set_acl(fs, ROOT, name, data)
        with raises(errno.EINVAL):
            await set_acl(fs, f.ino, ACCESS, data)
    with raises(errno.EOPNOTSUPP):  # another version: the kernel's answer too
        await set_acl(fs, f.ino, ACCESS, value((USER_OBJ, 7), (GROUP_OBJ, 5), (OTHER, 0),
                                               version=1))
    with raises(errno.EOPNOTSUPP):
        await set_acl(fs, f.ino, b"system.posix_acl_other", MINIMAL)
    assert fs.queries.sync_point() == lsn
    assert stored(fs, f.ino) == {} and stored(fs, ROOT) == {}
    assert fs.queries.getattr(f.ino).mode == stat.S_IFREG | 0o644


async def test_an_access_acl_sets_the_mode_and_is_kept_only_when_needed(fs):
    f = (await create(fs, b"f", stat.S_IFREG | 0o644, umask=0)).attr
    await set_acl(fs, f.ino, ACCESS, MINIMAL)
    assert fs.queries.getattr(f.ino).mode == stat.S_IFREG | 0o750
    assert stored(fs, f.ino) == {}  # the mode says it all
    written = NAMED[:8] + b"\x07\x00\x00\x00" + NAMED[12:]  # an id on USER_OBJ: ignored
    await set_acl(fs, f.ino, ACCESS, written)
    assert fs.queries.getattr(f.ino).mode == stat.S_IFREG | 0o664
    assert stored(fs, f.ino) == {ACCESS: NAMED}  # as the kernel writes it back
    lsn = fs.queries.sync_point()
    assert (await set_acl(fs, f.ino, ACCESS, NAMED)).lsn == 0  # the same again: no change
    assert fs.queries.sync_point() == lsn
    await set_acl(fs, f.ino, ACCESS, b"")  # an empty value removes it, mode as it is
    assert stored(fs, f.ino) == {} and fs.queries.getattr(f.ino).mode == stat.S_IFREG | 0o664
    await fs.call(m.RemoveXattr(f.ino, ACCESS))  # not there: succeeds, as on ext4
    await fs.call(m.RemoveXattr(f.ino, DEFAULT))
    await fs.call(m.SetAttr(f.ino, mode=0o2664))
    await set_acl(fs, f.ino, ACCESS, NAMED)  # by the file's group: S_ISGID kept
    assert fs.queries.getattr(f.ino).mode == stat.S_IFREG | 0o2664
    await set_acl(fs, f.ino, ACCESS, NAMED, keep_setgid=False)  # same ACL, outsider: dropped
    assert fs.queries.getattr(f.ino).mode == stat.S_IFREG | 0o664


async def test_only_directories_take_a_default_acl_and_symlinks_none(fs):
    f = (await create(fs, b"f", stat.S_IFREG | 0o644)).attr
    link = (await create(fs, b"l", stat.S_IFLNK | 0o777, target=b"f")).attr
    with raises(errno.EACCES):
        await set_acl(fs, f.ino, DEFAULT, MINIMAL)
    await set_acl(fs, f.ino, DEFAULT, b"")  # removing what cannot be there: fine
    for request in (m.SetXattr(link.ino, ACCESS, MINIMAL), m.RemoveXattr(link.ino, ACCESS)):
        with raises(errno.EOPNOTSUPP):
            await fs.call(request)
    await set_acl(fs, ROOT, DEFAULT, MINIMAL)  # a default ACL is kept even if minimal
    assert stored(fs, ROOT) == {DEFAULT: MINIMAL}
    assert stat.S_IMODE(fs.queries.getattr(ROOT).mode) == 0o755  # and leaves the mode


async def test_chmod_rewrites_the_access_acl(fs):
    f = (await create(fs, b"f", stat.S_IFREG | 0o644)).attr
    await set_acl(fs, f.ino, ACCESS, NAMED)
    await fs.call(m.SetAttr(f.ino, mode=0o4701))
    assert fs.queries.getattr(f.ino).mode == stat.S_IFREG | 0o4701
    # owner and other take the new bits, the mask the group's; named entries stay
    assert stored(fs, f.ino) == {ACCESS: value((USER_OBJ, 7), (USER, 6, 1000), (GROUP_OBJ, 4),
                                               (MASK, 0), (OTHER, 1))}
    after_chmod = stored(fs, f.ino)
    await fs.call(m.SetAttr(f.ino, uid=5))  # no mode: the ACL as it is
    assert stored(fs, f.ino) == after_chmod


async def test_creation_inherits_the_default_acl_instead_of_the_umask(fs):
    plain = (await create(fs, b"plain", stat.S_IFDIR | 0o777, umask=0o027)).attr
    assert stat.S_IMODE(plain.mode) == 0o750 and stored(fs, plain.ino) == {}
    shared = (await create(fs, b"shared", stat.S_IFDIR | 0o777, umask=0)).attr
    await set_acl(fs, shared.ino, DEFAULT, SHARED)
    f = (await create(fs, b"f", stat.S_IFREG | 0o666, shared.ino, umask=0o077)).attr
    assert f.mode == stat.S_IFREG | 0o664  # 0666 masked by the ACL (mask rw-), not the umask
    assert stored(fs, f.ino) == {ACCESS: value((USER_OBJ, 6), (GROUP_OBJ, 5), (GROUP, 7, 1234),
                                               (MASK, 6), (OTHER, 4))}
    d = (await create(fs, b"d", stat.S_IFDIR | 0o777, shared.ino, umask=0o077)).attr
    assert d.mode == stat.S_IFDIR | 0o775
    assert stored(fs, d.ino) == {ACCESS: SHARED, DEFAULT: SHARED}  # and passes it down
    grandchild = (await create(fs, b"g", stat.S_IFIFO | 0o640, d.ino)).attr
    assert grandchild.mode == stat.S_IFIFO | 0o640
    link = (await create(fs, b"l", stat.S_IFLNK | 0o777, shared.ino, target=b"f")).attr
    assert link.mode == stat.S_IFLNK | 0o777 and stored(fs, link.ino) == {}
    await set_acl(fs, shared.ino, DEFAULT, MINIMAL)  # no mask, no named entry
    g = (await create(fs, b"g", stat.S_IFREG | 0o666, shared.ino, umask=0o077)).attr
    assert g.mode == stat.S_IFREG | 0o640 and stored(fs, g.ino) == {}  # the mode says it all


async def test_each_acl_change_is_one_record_that_survives_a_power_cut(disk):
    async with mounted(disk, commit_interval=30.0) as fs:
        shared = (await create(fs, b"shared", stat.S_IFDIR | 0o777, umask=0)).attr
        changes = [
            lambda: set_acl(fs, shared.ino, DEFAULT, SHARED),
            lambda: create(fs, b"d", stat.S_IFDIR | 0o777, shared.ino),  # inode + 2 ACLs
            lambda: create(fs, b"f", stat.S_IFREG | 0o666, shared.ino),
            lambda: fs.call(m.SetAttr(fs.queries.lookup(shared.ino, b"f").ino, mode=0o600)),
            lambda: set_acl(fs, ROOT, ACCESS, NAMED),  # mode and ACL
        ]
        for change in changes:  # one LSN: one WAL record, all of it or nothing replayed
            before = fs.queries.sync_point()
            await change()
            assert fs.queries.sync_point() == before + 1
        await fs.checkpoint()
        await set_acl(fs, shared.ino, ACCESS, MINIMAL)  # after the checkpoint: replayed
        await fs.sync()
        expected = await state(fs)
        await create(fs, b"lost", stat.S_IFREG | 0o666, shared.ino)  # never made durable
        crashed = disk.crash()
    assert fsck.check(crashed).clean
    async with mounted(crashed) as fs:
        assert fs.recovered.replayed > 0
        assert await state(fs) == expected
        assert expected["/shared/d"][1] == {ACCESS: SHARED, DEFAULT: SHARED}
    async with mounted(crashed) as fs:  # from the checkpoint taken at that recovery
        assert fs.recovered.replayed == 0
        assert await state(fs) == expected


async def state(fs, ino=ROOT, path="") -> dict:
    """Every inode below ``ino``: path -> (mode, xattrs)."""
    out = {path or "/": (fs.queries.getattr(ino).mode, stored(fs, ino))}
    for name, attr in (await fs.listdir(ino)).items():
        child = f"{path}/{name.decode()}"
        if stat.S_ISDIR(attr.mode):
            out.update(await state(fs, attr.ino, child))
        else:
            out[child] = (attr.mode, stored(fs, attr.ino))
    return out
