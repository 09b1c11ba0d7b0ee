"""Tree manager semantics, through the actors: names, links, renames, xattrs, readdir, truncate."""

import errno
import stat

import pyfuse3

from razorfs.actors import messages as m
from razorfs.actors.block_allocator import BlockAllocator
from razorfs.storage.formats import BLOCK_SIZE

from .harness import DIR, FILE, ROOT, mounted, pattern, raises

NOREPLACE, EXCHANGE = pyfuse3.RENAME_NOREPLACE, pyfuse3.RENAME_EXCHANGE
RESERVED_BYTES = BlockAllocator.RESERVED_BYTES


def rename(fs, old_parent, old, new_parent, new, flags=0):
    return fs.call(m.Rename(old_parent, old, new_parent, new, flags))


def remove(fs, parent, name, directory=False):
    return fs.call(m.Remove(parent, name, directory))


async def test_create_lookup_getattr(fs):
    created = await fs.create(b"a")
    assert stat.S_ISREG(created.mode) and created.nlink == 1 and created.size == 0
    assert created.ino != ROOT
    assert await fs.lookup(ROOT, b"a") == created
    assert await fs.getattr(created.ino) == created
    assert (await fs.lookup(ROOT, b".")).ino == (await fs.lookup(ROOT, b"..")).ino == ROOT
    link = await fs.create(b"l", mode=stat.S_IFLNK | 0o777, target=b"a/b/c")
    assert link.size == 5 and fs.queries.readlink(link.ino) == b"a/b/c"
    with raises(errno.EINVAL):
        fs.queries.readlink(created.ino)


async def test_dot_looks_up_any_inode_by_number_until_it_is_removed(fs):
    """What the kernel asks to open a file handle whose inode it forgot: "." of the inode's
    number, a file's too (ENOTDIR before issue 18), and ".." of a directory's."""
    d = await fs.mkdir(b"d")
    f = await fs.create(b"f", d.ino)
    assert fs.queries.lookup(f.ino, b".") == f
    assert fs.queries.lookup(d.ino, b".").ino == d.ino
    assert fs.queries.lookup(d.ino, b"..").ino == ROOT
    await remove(fs, d.ino, b"f")  # still held by the kernel's reference from the create
    with raises(errno.ENOENT):
        fs.queries.lookup(f.ino, b".")
    await remove(fs, ROOT, b"d", directory=True)
    with raises(errno.ENOENT):
        fs.queries.lookup(d.ino, b".")


async def test_mkdir_rmdir_rename_keep_directory_link_counts(fs):
    d = await fs.mkdir(b"d")
    assert d.nlink == 2 and (await fs.getattr(ROOT)).nlink == 3
    e = await fs.mkdir(b"e", d.ino)
    await fs.create(b"f", d.ino)  # files do not count
    assert (await fs.getattr(d.ino)).nlink == 3
    assert (await fs.lookup(e.ino, b"..")).ino == d.ino
    await rename(fs, d.ino, b"e", ROOT, b"e2")  # a directory moves up: both parents change
    assert [(await fs.getattr(i)).nlink for i in (ROOT, d.ino)] == [4, 2]
    assert (await fs.lookup(e.ino, b"..")).ino == ROOT
    await remove(fs, ROOT, b"e2", directory=True)
    assert (await fs.getattr(ROOT)).nlink == 3
    await remove(fs, d.ino, b"f")
    await remove(fs, ROOT, b"d", directory=True)
    assert (await fs.getattr(ROOT)).nlink == 2


async def test_errors_carry_the_linux_errno(fs):
    f = await fs.create(b"f")
    d = await fs.mkdir(b"d")
    await fs.create(b"inner", d.ino)
    await fs.mkdir(b"empty")
    cases = [
        (errno.ENOENT, lambda: fs.queries.lookup(ROOT, b"missing")),
        (errno.ENOENT, lambda: fs.queries.getattr(999)),
        (errno.ENOENT, m.Remove(ROOT, b"missing", False)),
        (errno.ENOENT, m.Rename(ROOT, b"missing", ROOT, b"x", 0)),
        (errno.EEXIST, m.MakeNode(ROOT, b"f", FILE, 0, 0, 0)),
        (errno.EEXIST, m.MakeNode(ROOT, b"d", DIR, 0, 0, 0)),
        (errno.EEXIST, m.Link(f.ino, ROOT, b"d")),
        (errno.ENOTEMPTY, m.Remove(ROOT, b"d", True)),
        (errno.ENOTEMPTY, m.Rename(ROOT, b"empty", ROOT, b"d", 0)),
        (errno.ENOTDIR, m.MakeNode(f.ino, b"x", FILE, 0, 0, 0)),
        (errno.ENOTDIR, lambda: fs.queries.lookup(f.ino, b"x")),
        (errno.ENOTDIR, m.Remove(ROOT, b"f", True)),
        (errno.ENOTDIR, m.Rename(ROOT, b"empty", ROOT, b"f", 0)),
        (errno.EISDIR, m.Remove(ROOT, b"d", False)),
        (errno.EISDIR, m.Rename(ROOT, b"f", ROOT, b"empty", 0)),
        (errno.EISDIR, m.SetAttr(d.ino, size=0)),
        (errno.EISDIR, lambda: fs.queries.map_blocks(d.ino, 0, 1)),
        (errno.EPERM, m.Link(d.ino, ROOT, b"dlink")),
        (errno.ENAMETOOLONG, m.MakeNode(ROOT, b"n" * 256, FILE, 0, 0, 0)),
        (errno.ENAMETOOLONG, lambda: fs.queries.lookup(ROOT, b"n" * 256)),
        (errno.ENAMETOOLONG, m.Rename(ROOT, b"f", ROOT, b"n" * 256, 0)),
        (errno.ENAMETOOLONG, m.Link(f.ino, ROOT, b"n" * 256)),
        (errno.EINVAL, m.MakeNode(ROOT, b"a/b", FILE, 0, 0, 0)),
        (errno.EINVAL, m.Rename(ROOT, b"f", ROOT, b"g", EXCHANGE | NOREPLACE)),
    ]
    before = await fs.dump()
    for code, request in cases:
        with raises(code):
            if callable(request):  # a direct query
                request()
            else:
                await fs.call(request)
    assert await fs.dump() == before, "a failed request changed the tree"
    assert (await fs.create(b"n" * 255)).nlink == 1


async def test_rename_replaces_the_target(fs):
    a, b = await fs.create(b"a"), await fs.create(b"b")
    await fs.write(a.ino, 0, b"AAAA")
    await rename(fs, ROOT, b"a", ROOT, b"b")
    assert await fs.lookup(ROOT, b"b") == await fs.getattr(a.ino)
    assert await fs.read(a.ino) == b"AAAA"
    with raises(errno.ENOENT):
        await fs.lookup(ROOT, b"a")
    assert (await fs.getattr(b.ino)).nlink == 0  # still looked up: kept until forgotten


async def test_rename_noreplace(fs):
    a = await fs.create(b"a")
    await fs.create(b"b")
    with raises(errno.EEXIST):
        await rename(fs, ROOT, b"a", ROOT, b"b", NOREPLACE)
    assert (await fs.lookup(ROOT, b"a")).ino == a.ino
    await rename(fs, ROOT, b"a", ROOT, b"c", NOREPLACE)
    assert (await fs.lookup(ROOT, b"c")).ino == a.ino


async def test_rename_exchange_swaps_and_fixes_link_counts(fs):
    d1, d2 = await fs.mkdir(b"d1"), await fs.mkdir(b"d2")
    sub = await fs.mkdir(b"sub", d1.ino)
    f = await fs.create(b"f", d2.ino)
    with raises(errno.ENOENT):
        await rename(fs, d1.ino, b"sub", d2.ino, b"missing", EXCHANGE)
    await rename(fs, d1.ino, b"sub", d2.ino, b"f", EXCHANGE)
    assert (await fs.lookup(d1.ino, b"sub")).ino == f.ino
    assert (await fs.lookup(d2.ino, b"f")).ino == sub.ino
    assert [(await fs.getattr(i)).nlink for i in (d1.ino, d2.ino)] == [2, 3]
    assert (await fs.lookup(sub.ino, b"..")).ino == d2.ino


async def test_directory_cannot_move_into_its_own_subtree(fs):
    d = await fs.mkdir(b"d")
    e = await fs.mkdir(b"e", d.ino)
    other = await fs.create(b"x", e.ino)
    for target_parent in (d.ino, e.ino):
        with raises(errno.EINVAL):
            await rename(fs, ROOT, b"d", target_parent, b"moved")
    with raises(errno.EINVAL):
        await rename(fs, ROOT, b"d", e.ino, b"x", EXCHANGE)
    assert (await fs.lookup(e.ino, b"x")).ino == other.ino
    assert (await fs.lookup(ROOT, b"d")).ino == d.ino


async def test_link_and_unlink_count_names(fs):
    f = await fs.create(b"f")
    await fs.write(f.ino, 0, b"shared")
    d = await fs.mkdir(b"d")
    assert (await fs.call(m.Link(f.ino, d.ino, b"g"))).attr.nlink == 2
    assert (await fs.getattr(d.ino)).nlink == 2  # a file link is not a subdirectory
    await remove(fs, ROOT, b"f")
    g = await fs.lookup(d.ino, b"g")
    assert g.ino == f.ino and g.nlink == 1
    assert await fs.read(g.ino) == b"shared"
    await remove(fs, d.ino, b"g")
    assert (await fs.getattr(f.ino)).nlink == 0
    with raises(errno.ENOENT):
        await fs.call(m.Link(f.ino, ROOT, b"revived"))


async def test_unlinked_file_lives_until_forgotten(fs):
    f = await fs.create(b"f")  # one lookup, as the kernel holds after create
    await fs.write(f.ino, 0, pattern(1, 3 * BLOCK_SIZE))
    await fs.lookup(ROOT, b"f")  # two
    await remove(fs, ROOT, b"f")
    await fs.sync()
    assert (await fs.getattr(f.ino)).nlink == 0
    assert await fs.read(f.ino) == pattern(1, 3 * BLOCK_SIZE)
    assert (await fs.space()).used == 3
    await fs.call(m.Forget((f.ino, 1)))
    assert (await fs.getattr(f.ino)).size == 3 * BLOCK_SIZE
    reply = await fs.call(m.Forget((f.ino, 1)))
    with raises(errno.ENOENT):
        await fs.getattr(f.ino)
    await fs.wait_durable(reply.lsn)
    assert (await fs.space()).used == 0


async def test_forget_naming_an_inode_twice(fs):
    # The kernel batches forgets (FUSE_BATCH_FORGET); an inode evicted, looked up again and
    # evicted again before the batch is sent appears twice in one batch.
    f = await fs.create(b"f")
    await remove(fs, ROOT, b"f")
    await fs.call(m.Forget((f.ino, 1, f.ino, 1)))
    with raises(errno.ENOENT):
        await fs.getattr(f.ino)
    await fs.create(b"still writable")


async def test_xattrs(fs):
    f = await fs.create(b"f")
    ino = f.ino
    with raises(pyfuse3.ENOATTR):
        fs.queries.getxattr(ino, b"user.a")
    await fs.call(m.SetXattr(ino, b"user.a", b"1"))
    await fs.call(m.SetXattr(ino, b"trusted.b", b""))
    await fs.call(m.SetXattr(ino, b"user.a", b"2"))  # replace
    assert fs.queries.getxattr(ino, b"user.a") == b"2"
    assert fs.queries.getxattr(ino, b"trusted.b") == b""
    assert sorted(fs.queries.listxattr(ino)) == [b"trusted.b", b"user.a"]
    await fs.call(m.RemoveXattr(ino, b"user.a"))
    assert fs.queries.listxattr(ino) == (b"trusted.b",)
    for code, message in [
        (pyfuse3.ENOATTR, m.RemoveXattr(ino, b"user.a")),
        (pyfuse3.ENOATTR, lambda: fs.queries.getxattr(ino, b"user.a")),
        (errno.ERANGE, m.SetXattr(ino, b"user." + b"x" * 251, b"v")),
        (errno.E2BIG, m.SetXattr(ino, b"user.big", bytes(65537))),
        (errno.EOPNOTSUPP, m.SetXattr(ino, b"other.a", b"v")),
        (errno.EOPNOTSUPP, m.RemoveXattr(ino, b"nonamespace")),
        (errno.ENOENT, m.SetXattr(999, b"user.a", b"v")),
    ]:
        with raises(code):
            if callable(message):  # a direct query
                message()
            else:
                await fs.call(message)
    await fs.call(m.SetXattr(ino, b"user." + b"x" * 250, bytes(65536)))  # both limits inclusive
    assert fs.queries.listxattr(ino) == (b"trusted.b", b"user." + b"x" * 250)


async def test_readdir_cookies_resume_across_changes(fs):
    names = [b"n%02d" % i for i in range(10)]
    for name in names:
        await fs.create(name)
    first = fs.queries.readdir(ROOT, 0, 4)
    cookies = [e[1] for e in first]
    assert cookies == sorted(set(cookies))
    returned = {e[0] for e in first}
    pending = [n for n in names if n not in returned]
    gone, recreated = pending[0], sorted(returned)[0]
    await remove(fs, ROOT, gone)
    await remove(fs, ROOT, recreated)  # already returned: it keeps its place, not repeated
    await fs.create(recreated)
    rest = fs.queries.readdir(ROOT, cookies[-1], 100)
    assert sorted(e[0] for e in rest) == sorted(set(pending) - {gone})
    assert all(e[1] > cookies[-1] for e in rest)
    assert fs.queries.readdir(ROOT, rest[-1][1], 100) == ()
    assert {e[2][0] for e in rest} == {(await fs.lookup(ROOT, e[0])).ino for e in rest}


async def test_truncate_frees_blocks_once_durable(fs):
    f = await fs.create(b"f")
    data = pattern(7, 4 * BLOCK_SIZE)
    await fs.write(f.ino, 0, data)
    await fs.sync()
    assert (await fs.space())[:3] == (4, 0, 0)
    assert (await fs.getattr(f.ino)).blocks == 4 * BLOCK_SIZE // 512
    lsn = await fs.truncate(f.ino, BLOCK_SIZE + 100)  # keeps block 0, copies block 1's head
    attr = await fs.getattr(f.ino)
    assert attr.size == BLOCK_SIZE + 100 and attr.blocks == 2 * BLOCK_SIZE // 512
    assert (await fs.space()).pending == 3, "unmapped blocks reusable before durable"
    await fs.wait_durable(lsn)
    assert (await fs.space())[:3] == (2, 3, 0)
    assert await fs.read(f.ino) == data[: BLOCK_SIZE + 100]
    await fs.truncate(f.ino, 3 * BLOCK_SIZE)  # grows with zeros, not with the old bytes
    assert await fs.read(f.ino) == data[: BLOCK_SIZE + 100] + bytes(2 * BLOCK_SIZE - 100)
    await fs.sync()
    await fs.truncate(f.ino, 0)
    await fs.sync()
    assert (await fs.space())[:3] == (0, 5, 0)
    assert (await fs.getattr(f.ino)).blocks == 0


async def test_nearly_full_disk_refuses_data_but_not_metadata(fs):
    f = await fs.create(b"f")
    data = pattern(1, 4 * BLOCK_SIZE)
    await fs.write(f.ino, 0, data)
    await fs.sync()
    space = fs.disk.space()
    # Room for two more blocks above the space kept for the log and checkpoints.
    fs.disk.capacity = space.total - space.available + RESERVED_BYTES + 2 * BLOCK_SIZE
    # Blocks leased earlier may use up to a lease of the reserve: give them back, so that the
    # allocator decides every allocation from here.
    await fs.data.close()
    await fs.write(f.ino, 4 * BLOCK_SIZE, pattern(2, 2 * BLOCK_SIZE))
    data += pattern(2, 2 * BLOCK_SIZE)
    with raises(errno.ENOSPC):
        await fs.write(f.ino, 6 * BLOCK_SIZE, b"x")
    await fs.create(b"metadata still works")
    await fs.truncate(f.ino, BLOCK_SIZE)  # frees five blocks once durable
    await fs.sync()
    await fs.write(f.ino, BLOCK_SIZE, pattern(3, 5 * BLOCK_SIZE))  # reuses them
    assert await fs.read(f.ino) == data[:BLOCK_SIZE] + pattern(3, 5 * BLOCK_SIZE)
    assert (await fs.space()).used == 6


async def test_times_beyond_ext4s_range_are_kept_as_ext4_keeps_them(fs, disk):
    """Seconds outside [-2**31, 2**34 - 2**31 - 1] become the nearest bound, nanoseconds
    dropped (issue 18: ext4 with 256-byte inodes, measured), and read back so after replay."""
    f = await fs.create(b"f")
    cases = {(2**64 - 1, -(2**63)): (15032385535 * 10**9, -(2**31) * 10**9),
             (15032385535 * 10**9 + 7, -(2**31) * 10**9 + 7): (15032385535 * 10**9,
                                                             -(2**31) * 10**9),
             (15032385534 * 10**9 + 7, -(2**31 - 1) * 10**9 - 1): (15032385534 * 10**9 + 7,
                                                                 -(2**31) * 10**9)}
    for (atime, mtime), expected in cases.items():
        attr = (await fs.call(m.SetAttr(f.ino, atime_ns=atime, mtime_ns=mtime))).attr
        assert (attr.atime_ns, attr.mtime_ns) == expected
    await fs.sync()
    async with mounted(disk.crash()) as again:
        attr = await again.getattr(f.ino)
        assert (attr.atime_ns, attr.mtime_ns) == expected
