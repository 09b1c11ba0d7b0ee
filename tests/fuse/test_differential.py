"""Differential testing: the same seeded random POSIX operations on razorfs and on ext4.

Every op's return value or errno is compared, then the attributes of the paths and file
descriptor it touched, then which of mtime and ctime it changed of the inodes it touched and of
their parent directories (``posix_ops.Stamps``); the whole trees (content, modes, link counts,
hard-link groups, symlinks, user xattrs) are compared every ``FULL_CHECK_EVERY`` ops, after an
fsync + kill -9 + recovery half-way through, at the end, and after an unmount and remount of
razorfs. The generator and executor are in ``posix_ops.py``.

    RAZORFS_SEED=N        replay one seed (RAZORFS_OPS=K: only its first K ops)
    RAZORFS_LONG=1        many more seeds and ops
"""

from __future__ import annotations

import json
import os
import random
import stat
import time

import pytest
from posix_ops import (
    EMPTY_XATTR_NAME,
    FOREIGN_XATTR_NAME,
    Generator,
    Side,
    Stamps,
    all_dents,
    assert_same_trees,
    describe,
    fine_grained_ctime,
    getdents,
    post_state,
)

LONG = bool(os.environ.get("RAZORFS_LONG"))
DEFAULT_OPS = 5000 if LONG else 1000
OPS_PER_SEED = int(os.environ.get("RAZORFS_OPS", DEFAULT_OPS))
CRASH_AFTER = DEFAULT_OPS // 2  # fsync + kill -9 + recovery after this op (not moved by
                                # RAZORFS_OPS, so that a replay crashes at the same point)
SEEDS = ([int(os.environ["RAZORFS_SEED"])] if os.environ.get("RAZORFS_SEED")
         else range(1, 11) if LONG else range(1, 5))
FULL_CHECK_EVERY = 100
SYNC_EVERY = 4  # every 4th seed mounts with --durability sync (each change waits for its commit)


def write_to_fifo(op: dict, ref: Side) -> bool:
    """A write into a FIFO (its slot's file on the ext4 side)."""
    return op["kind"] == "write" and stat.S_ISFIFO(os.fstat(ref.fds[op["slot"]]).st_mode)


# Ops the generator draws again instead of running, as (predicate(op, reference side), reason):
# a difference from ext4 found and confirmed but not fixed yet, each also shown on its own by a
# strict xfail test (here or in test_timestamps.py) so that a fix is noticed. The op-level ones
# found before were fixed and are regression tests below (readdir repeating a name, xattr name
# validation) or in test_timestamps.py (a setxattr of the same value moved ctime). Access times are not compared op by op (see
# test_relatime_read_moves_atime).
KNOWN_DIFFERENCES: list = [
    (write_to_fifo, ("LIMITATION of FUSE: a write into a FIFO leaves its mtime and ctime "
                     "(test_timestamps.py 'write into a FIFO')")),
]


def known_difference(op: dict, ref: Side) -> bool:
    return any(matches(op, ref) for matches, _ in KNOWN_DIFFERENCES)


def crash_and_recover(mount, ours: Side, ref: Side, context: str) -> None:
    """fsync (razorfs: everything done before it is durable, G1), SIGKILL the daemon, mount
    again: recovery must rebuild exactly the tree that was served."""
    ours.close_all()
    ref.close_all()
    mount.sync_crash_and_mount()
    assert_same_trees(ours, ref, context)


def run_op(side: Side, op: dict, wait: bool = False) -> tuple:
    """The op's outcome, the attributes of what it touched, which timestamps it changed."""
    stamps = Stamps(side, op, wait)
    try:
        result = side.run(op)
    except BaseException:
        stamps.close()
        raise
    return result, post_state(side, op), stamps.changes()


def run_seed(seed: int, count: int, mount, ours: Side, ref: Side) -> None:
    generator = Generator(random.Random(seed), ref, skip=lambda op: known_difference(op, ref))
    # razorfs stamps with the daemon's fine-grained clock; ext4 may use a coarse one (kernels
    # before 6.13): then a change right after another can keep its ctime, unless we wait.
    wait = not fine_grained_ctime(ref.root)
    history: list[str] = []
    for index in range(count):
        op = generator.next()
        history.append(f"#{index} {describe(op)}")
        got = run_op(ours, op)
        expected = run_op(ref, op, wait)
        if got != expected:
            recent = "\n    ".join(history[-12:])
            raise AssertionError(
                f"seed {seed} op #{index} differs (replay: {'RAZORFS_LONG=1 ' if LONG else ''}"
                f"RAZORFS_SEED={seed} RAZORFS_OPS={index + 1})\n  op:     {describe(op)}\n"
                f"  razorfs: {got!r}\n  ext4:    {expected!r}\n  last ops:\n    {recent}")
        if (index + 1) % FULL_CHECK_EVERY == 0:
            assert_same_trees(ours, ref, f"seed {seed} after op #{index}")
        if index + 1 == CRASH_AFTER:
            crash_and_recover(mount, ours, ref, f"seed {seed}: fsync, kill -9, mount after op "
                                                f"#{index}")
    assert_same_trees(ours, ref, f"seed {seed} at the end")
    ours.close_all()
    ref.close_all()
    mount.remount()
    assert_same_trees(ours, ref, f"seed {seed} after unmount and remount")


@pytest.mark.timeout(600 if LONG else 150)
@pytest.mark.parametrize("seed", SEEDS)
def test_same_as_ext4(make_mount, tmp_path, seed):
    mount = make_mount(*(("--durability", "sync") if seed % SYNC_EVERY == 0 else ()))
    ref_root = tmp_path / "ext4"
    ref_root.mkdir()
    os.chmod(ref_root, stat.S_IMODE(os.stat(mount.path).st_mode))
    ours, ref = Side(mount.path), Side(ref_root)
    try:
        run_seed(seed, OPS_PER_SEED, mount, ours, ref)
    finally:
        ours.close_all()
        ref.close_all()


def test_generator_is_deterministic(tmp_path):
    """Replaying a seed needs the same ops in the same order."""
    runs = []
    for attempt in range(2):
        side = Side(tmp_path / str(attempt))
        os.mkdir(side.root)
        generator = Generator(random.Random(7), side)
        ops = []
        for _ in range(300):
            op = generator.next()
            ops.append(describe(op))
            side.run(op)
        side.close_all()
        runs.append(ops)
    assert runs[0] == runs[1]


@pytest.mark.parametrize("kind", ["setxattr", "getxattr", "removexattr"])
@pytest.mark.parametrize("name", [EMPTY_XATTR_NAME, FOREIGN_XATTR_NAME])
def test_xattr_name_validation(mount, tmp_path, kind, name):
    """Linux resolves the namespace before anything else (fs/xattr.c, xattr_resolve_name): an
    unknown namespace is EOPNOTSUPP, a bare namespace prefix EINVAL, whether or not such an
    attribute could exist. (razorfs before 48a3667: setxattr accepted 'user.', getxattr said
    ENODATA for both -- TreeManager._check_xattr_name.)"""
    op = {"kind": kind, "where": "f", "name": name}
    if kind == "setxattr":
        op.update(value=b"v", flags=0)
    outcomes = []
    for root in (tmp_path, mount.path):
        (root / "f").write_bytes(b"x")
        outcomes.append(Side(root).run(op))
    assert outcomes[0] == ("err", "EINVAL" if name == EMPTY_XATTR_NAME else "ENOTSUP")
    assert outcomes[1] == outcomes[0], f"razorfs {outcomes[1]}, ext4 {outcomes[0]}"


@pytest.mark.parametrize("change", ["rename over", "unlink and create"])
def test_readdir_never_repeats_a_name(mount, tmp_path, change):
    """A name replaced or re-created while a directory is being listed is not listed twice
    (ext4 and tmpfs never do; POSIX leaves it open). The first getdents() returns every entry;
    the second resumes at the last cookie. (razorfs before 48a3667 gave a re-inserted name a
    new, larger cookie -- razorfs/tree.py Directory.put -- so the second call returned it
    again.)"""
    listings = []
    for root in (tmp_path, mount.path):
        os.mkdir(root / "dir")
        os.mkdir(root / "other")
        for name in ("a", "b", "c", "other/x"):
            (root / "dir" / name if "/" not in name else root / name).write_bytes(b"")
        with os.scandir(root / "dir") as entries:
            seen = [next(entries).name]
            if change == "rename over":
                os.rename(root / "other" / "x", root / "dir" / seen[0])
            else:
                os.unlink(root / "dir" / seen[0])
                (root / "dir" / seen[0]).write_bytes(b"")
            seen += [entry.name for entry in entries]
        listings.append(seen)
    ext4, ours = listings
    assert sorted(ext4) == ["a", "b", "c"]
    assert sorted(ours) == ["a", "b", "c"], f"razorfs listed {ours}"


def test_getdents_lists_dot_entries_and_resumes_after_each(mount, tmp_path):
    """A directory of N entries lists N + 2 through getdents, "." and ".." with the inode
    numbers of the directory and its parent, as on ext4 (razorfs before issue 18 listed N),
    over many getdents calls (a small buffer: each call resumes at the last offset). A listing
    resumed at the offset (d_off) of any entry, the dot entries' included, goes on with exactly
    the entries after it."""
    for root in (tmp_path, mount.path):
        where = "razorfs" if root == mount.path else "ext4"
        for count in (0, 3, 700):
            directory = root / f"dir{count}"
            directory.mkdir()
            for i in range(count):
                (directory / f"entry-{i:04d}").write_bytes(b"")
            listing = all_dents(directory, buffer_size=512)
            names = [name for name, _, _ in listing]
            expected = [b".", b"..", *(b"entry-%04d" % i for i in range(count))]
            assert sorted(names) == sorted(expected), f"{where} listed {len(names)} entries"
            numbers = {name: ino for name, ino, _ in listing}
            assert numbers[b"."] == directory.stat().st_ino, where
            assert numbers[b".."] == root.stat().st_ino, where
            positions = range(len(listing)) if count < 10 else (0, 1, 2, 350, len(listing) - 1)
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for k in positions:
                    os.lseek(fd, listing[k][2], os.SEEK_SET)
                    rest = []
                    while chunk := getdents(fd, 512):
                        rest += [name for name, _, _ in chunk]
                    assert rest == names[k + 1 :], f"{where}: resumed after {names[k]!r}"
            finally:
                os.close(fd)


def test_listing_takes_no_reference_on_the_directory_or_its_parent(mount, cli):
    """The kernel takes a lookup reference for each entry readdirplus returns, but not for "."
    and ".." (fs/fuse/readdir.c, fuse_direntplus_link): were the daemon to count one for them,
    a listed directory would never be forgotten, and once removed never dropped."""
    def inodes() -> int:
        result = cli("stats", mount.path, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["inodes"]

    before = inodes()
    parent = mount.path / "p"
    (parent / "d").mkdir(parents=True)
    (parent / "d" / "f").write_bytes(b"f")
    for directory in (parent, parent / "d", parent / "d", parent):
        assert len(all_dents(directory)) == 3
    (parent / "d" / "f").unlink()
    (parent / "d").rmdir()
    parent.rmdir()
    deadline = time.monotonic() + 20  # forgets reach the daemon when the kernel drops inodes
    while inodes() != before:
        assert time.monotonic() < deadline, f"{inodes() - before} removed inodes never dropped"
        time.sleep(0.1)


RELATIME_MISSES = (
    "LIMITATION of FUSE (documented in README): relatime moves atime only for READ requests "
    "that reach the daemon. The kernel never updates atime of a FUSE inode itself (S_NOATIME) "
    "and sends no READ for a read served from the page cache or at end of file, so there atime "
    "stays older than mtime where Linux filesystems move it")


@pytest.mark.xfail(strict=True, reason=RELATIME_MISSES)
@pytest.mark.parametrize("read", ["cached", "at end of file"])
def test_relatime_read_moves_atime(mount, tmp_path, read):
    old = 1_600_000_000 * 10**9
    moved = []
    for root in (tmp_path, mount.path):
        path = root / "f"
        path.write_bytes(b"x" * 8192)
        path.read_bytes()                      # the page cache holds the whole file now
        os.utime(path, ns=(old, old + 10**9))  # atime older than mtime: a read must move it
        with open(path, "rb") as stream:
            stream.seek(0 if read == "cached" else 8192)
            stream.read()
        moved.append(os.stat(path).st_atime_ns != old)
    assert moved[0], "ext4 (relatime) did not move atime"
    assert moved[1], f"razorfs left atime at {old} after a read ({read})"
