"""fsck finds damaged trees and --repair fixes what can be fixed, on a simulated disk."""

from __future__ import annotations

import stat

from razorfs.state import redo, snapshot
from razorfs import fsck
from razorfs.state.recovery import load
from razorfs.storage.checkpoints import write_checkpoint
from razorfs.datadir import format_storage
from razorfs.storage.blockstore import BlockStore
from razorfs.storage.formats import BLOCK_SIZE
from razorfs.storage.simdisk import SimDisk
from razorfs.state.tree import ROOT_INO

FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


def broken_disk() -> SimDisk:
    """A filesystem whose newest checkpoint holds four kinds of damage."""
    disk = SimDisk()
    superblock = format_storage(disk)
    state = load(disk).state
    blocks = BlockStore(disk)
    crcs = blocks.write((0, 2), bytes(range(256)) * (2 * BLOCK_SIZE // 256))
    blocks.close()
    for op in (
        redo.PutInode(2, FILE, 1, 0, 0, 0, 10, 1, 1, 1),      # no name points to it
        redo.PutInode(3, FILE, 5, 0, 0, 0, 100, 1, 1, 1),     # nlink 5, one name
        redo.PutEntry(ROOT_INO, b"wrong-nlink", 3),
        redo.PutBlocks(3, (0, 0, crcs[0], 1, 1, crcs[1])),   # block 1 lies past the 100-byte end
        redo.PutInode(4, DIR, 2, 0, 0, 0, 0, 1, 1, 1),
        redo.PutEntry(ROOT_INO, b"dir", 4),
        redo.PutInode(ROOT_INO, DIR, 3, 0, 0, 0, 0, 1, 1, 1),
    ):
        state.apply(op)
    state.inodes[4].directory.put(b"dangling", 99)  # an entry to a missing inode
    write_checkpoint(disk, superblock.uuid, 0, snapshot.encode(state))
    return disk


def test_check_names_every_problem_with_inode_and_path():
    report = fsck.check(broken_disk())
    text = "\n".join(report.problems)
    assert "inode 2: not reachable from the root" in text
    assert "inode 3 (/wrong-nlink): link count 5, expected 1" in text
    assert "inode 3 (/wrong-nlink) offset 4096: block mapped past the end" in text
    assert "/dir/dangling: entry points to missing inode 99" in text
    assert len(report.problems) == 4


def test_repair_fixes_the_tree_and_leaves_it_clean():
    disk = broken_disk()
    report = fsck.repair(disk)
    assert report.repairs and "applied 7 fix(es)" in report.repairs[-1]
    assert fsck.check(disk).clean
    state = load(disk).state
    found = state.inodes[state.inodes[ROOT_INO].directory.names[b"lost+found"]]
    assert found.directory.names == {b"#2": 2}
    assert state.inodes[3].nlink == 1 and list(state.inodes[3].blocks) == [0]
    assert b"dangling" not in state.inodes[4].directory.names


def test_damaged_data_block_is_reported_not_repaired():
    disk = SimDisk()
    superblock = format_storage(disk)
    state = load(disk).state
    blocks = BlockStore(disk)
    (checksum,) = blocks.write((0, 1), b"a" * BLOCK_SIZE)
    blocks.close()
    for op in (redo.PutInode(2, FILE, 1, 0, 0, 0, BLOCK_SIZE, 1, 1, 1),
               redo.PutEntry(ROOT_INO, b"f", 2), redo.PutBlocks(2, (0, 0, checksum))):
        state.apply(op)
    write_checkpoint(disk, superblock.uuid, 0, snapshot.encode(state))
    with disk.open("blocks") as store:
        store.pwrite(17, b"b")
    report = fsck.repair(disk)
    assert report.problems == ["inode 2 (/f) offset 0: data block 0 checksum mismatch: not "
                               "repairable (reads of it answer EIO)"]
    assert not fsck.check(disk).clean
    assert fsck.check(disk, verify_data=False).clean
