"""recovery.load / recover on a SimDisk: superblock, checkpoint choice, WAL replay."""

from __future__ import annotations

import stat

import pytest

from razorfs.state import redo, snapshot
from razorfs.storage import checkpoints
from razorfs.state.recovery import load, recover
from razorfs.storage.checkpoints import write_checkpoint
from razorfs.datadir import format_storage
from razorfs.storage import formats
from razorfs.storage.formats import FORMAT_VERSION, FormatError, Superblock
from razorfs.storage.simdisk import SimDisk
from razorfs.storage.wal import scan_log
from razorfs.state.tree import ROOT_INO, TreeState

T0 = 1_700_000_000_000_000_000
REG = stat.S_IFREG | 0o644


@pytest.fixture
def disk() -> SimDisk:
    return SimDisk()


@pytest.fixture
def superblock(disk: SimDisk) -> Superblock:
    return format_storage(disk, uid=1000, gid=100)


def file_ops(ino: int, name: bytes, nlink: int = 1) -> list:
    return [redo.PutInode(ino, REG, nlink, 0, 0, 0, 0, T0, T0, T0), redo.PutEntry(ROOT_INO, name, ino)]


def state_with(*files: tuple[int, bytes]) -> TreeState:
    state = TreeState.fresh(uid=1000, gid=100, now_ns=T0)
    for ino, name in files:
        for op in file_ops(ino, name):
            state.apply(op)
    return state


def flip_byte(disk: SimDisk, path: str, offset: int) -> None:
    data = bytearray(disk.read_file(path))
    data[offset] ^= 0x01
    disk.write_file_atomically(path, bytes(data))


def write_wal(disk: SimDisk, uuid: bytes, first_lsn: int, transactions: list[list],
              tail: bytes = b"") -> str:
    """One segment holding one record (one batch) per transaction, then ``tail``, then zeros."""
    data = formats.encode_segment_header(first_lsn, uuid)
    for i, ops in enumerate(transactions):
        data += formats.encode_record(first_lsn + i, i + 1, redo.encode_ops(ops))
    data += tail + bytes(1024)
    path = formats.segment_name(first_lsn)
    with disk.open(path, create=True) as f:
        f.pwrite(0, data)
        f.fsync()
    return path


def names(state: TreeState) -> set[bytes]:
    return {name for _, name, _ in state.get(ROOT_INO).directory.after(0)}


# ---- load ---------------------------------------------------------------------------------------


def test_load_of_a_fresh_filesystem_returns_the_root_only(disk, superblock) -> None:
    recovered = load(disk)
    assert recovered.superblock == superblock
    assert list(recovered.state.inodes) == [ROOT_INO]
    root = recovered.state.get(ROOT_INO)
    assert root.is_dir and root.nlink == 2 and (root.uid, root.gid) == (1000, 100)
    assert (recovered.checkpoint_lsn, recovered.last_lsn, recovered.last_batch) == (0, 0, 0)
    assert (recovered.replayed, recovered.orphans) == (0, 0)
    assert recovered.log_end is None and recovered.skipped_checkpoints == []


def test_load_uses_the_newest_valid_checkpoint(disk, superblock) -> None:
    write_checkpoint(disk, superblock.uuid, 5, snapshot.encode(state_with((2, b"five"))))
    recovered = load(disk)
    assert recovered.checkpoint_lsn == 5 and recovered.last_lsn == 5
    assert names(recovered.state) == {b"five"}


@pytest.mark.parametrize("damage", ["body-byte", "header-byte", "truncated", "other-uuid"])
def test_damaged_newest_checkpoint_falls_back_to_the_older_one(disk, superblock, damage) -> None:
    write_checkpoint(disk, superblock.uuid, 5, snapshot.encode(state_with((2, b"five"))))
    newest = formats.checkpoint_name(5)
    if damage == "body-byte":
        flip_byte(disk, newest, formats.CHECKPOINT_HEADER_SIZE + 3)
    elif damage == "header-byte":
        flip_byte(disk, newest, 16)
    elif damage == "truncated":
        disk.write_file_atomically(newest, disk.read_file(newest)[:-2])
    else:
        write_checkpoint(disk, bytes(16), 5, snapshot.encode(state_with((2, b"five"))))
    recovered = load(disk)
    assert recovered.checkpoint_lsn == 0 and names(recovered.state) == set()
    assert len(recovered.skipped_checkpoints) == 1
    assert recovered.skipped_checkpoints[0].startswith(newest + ": ")


def test_fallback_checkpoint_plus_the_log_rebuild_everything(disk, superblock) -> None:
    transactions = [file_ops(2, b"one"), file_ops(3, b"two"), file_ops(4, b"three")]
    write_wal(disk, superblock.uuid, 1, transactions)
    write_checkpoint(disk, superblock.uuid, 2, snapshot.encode(state_with((2, b"one"), (3, b"two"))))
    flip_byte(disk, formats.checkpoint_name(2), formats.CHECKPOINT_HEADER_SIZE)
    recovered = load(disk)
    assert recovered.checkpoint_lsn == 0 and recovered.replayed == 3
    assert names(recovered.state) == {b"one", b"two", b"three"}
    assert recovered.last_lsn == 3 and recovered.last_batch == 3


def test_all_checkpoints_damaged_is_refused(disk, superblock) -> None:
    write_checkpoint(disk, superblock.uuid, 5, snapshot.encode(state_with()))
    flip_byte(disk, formats.checkpoint_name(0), formats.CHECKPOINT_HEADER_SIZE)
    flip_byte(disk, formats.checkpoint_name(5), 20)
    with pytest.raises(FormatError, match="no valid checkpoint") as info:
        load(disk)
    assert formats.checkpoint_name(0) in str(info.value)
    assert formats.checkpoint_name(5) in str(info.value)


def test_no_checkpoint_at_all_is_refused(disk, superblock) -> None:
    disk.unlink(formats.checkpoint_name(0))
    with pytest.raises(FormatError, match="no valid checkpoint"):
        load(disk)


def test_unknown_superblock_version_is_refused(disk, superblock) -> None:
    newer = Superblock(FORMAT_VERSION + 1, superblock.block_size, superblock.uuid,
                       superblock.created_ns)
    disk.write_file_atomically(formats.SUPERBLOCK_PATH, newer.encode())
    with pytest.raises(FormatError, match=f"version {FORMAT_VERSION + 1} is not supported"):
        load(disk)


def test_a_version_2_directory_is_read_and_upgraded_at_recovery(disk, superblock) -> None:
    old = Superblock(2, superblock.block_size, superblock.uuid, superblock.created_ns)
    disk.write_file_atomically(formats.SUPERBLOCK_PATH, old.encode())
    write_wal(disk, superblock.uuid, 1, [file_ops(2, b"kept")])
    assert load(disk).superblock.version == 2  # load changes nothing
    recovered = recover(disk)
    assert names(recovered.state) == {b"kept"}
    assert Superblock.decode(disk.read_file(formats.SUPERBLOCK_PATH)).version == FORMAT_VERSION
    with pytest.raises(FormatError, match="version 1 is not supported"):
        Superblock.decode(Superblock(1, superblock.block_size, superblock.uuid, 1).encode())


def test_damaged_superblock_is_refused(disk, superblock) -> None:
    flip_byte(disk, formats.SUPERBLOCK_PATH, 20)
    with pytest.raises(FormatError, match="superblock checksum mismatch"):
        load(disk)


def test_missing_superblock_is_refused(disk) -> None:
    with pytest.raises(FormatError, match="not a razorfs data directory"):
        load(disk)
    format_storage(disk)
    disk.unlink(formats.SUPERBLOCK_PATH)
    with pytest.raises(FormatError, match="not a razorfs data directory"):
        load(disk)


def test_load_replays_wal_records_after_the_checkpoint(disk, superblock) -> None:
    write_wal(disk, superblock.uuid, 1, [file_ops(2, b"a"), file_ops(3, b"b"),
                                         [redo.PutXattr(3, b"user.x", b"1")]])
    write_checkpoint(disk, superblock.uuid, 1, snapshot.encode(state_with((2, b"a"))))
    recovered = load(disk)
    assert recovered.checkpoint_lsn == 1 and recovered.replayed == 2
    assert names(recovered.state) == {b"a", b"b"}
    assert recovered.state.get(3).xattrs == {b"user.x": b"1"}
    assert recovered.last_lsn == 3


def test_load_reclaims_orphans(disk, superblock) -> None:
    orphan = file_ops(2, b"gone", nlink=1) + [redo.DropEntry(ROOT_INO, b"gone"),
                                              redo.PutInode(2, REG, 0, 0, 0, 0, 0, T0, T0, T0),
                                              redo.PutBlocks(2, (0, 5, 0))]
    write_wal(disk, superblock.uuid, 1, [orphan])
    recovered = load(disk)
    assert recovered.orphans == 1 and 2 not in recovered.state.inodes


def test_unreplayable_record_is_refused_naming_it(disk, superblock) -> None:
    write_wal(disk, superblock.uuid, 1, [file_ops(2, b"a"), [redo.DropEntry(ROOT_INO, b"nope")]])
    with pytest.raises(FormatError, match="WAL record LSN 2 at offset .* cannot be replayed"):
        load(disk)


def test_load_changes_nothing_on_disk(disk, superblock) -> None:
    path = write_wal(disk, superblock.uuid, 1, [file_ops(2, b"a")], tail=b"torn!" * 8)
    before = {name: disk.read_file(f"{formats.WAL_DIR}/{name}")
              for name in disk.listdir(formats.WAL_DIR)}
    recovered = load(disk)
    assert recovered.log_end.segment == path and recovered.log_end.reason is not None
    assert {name: disk.read_file(f"{formats.WAL_DIR}/{name}")
            for name in disk.listdir(formats.WAL_DIR)} == before
    assert disk.listdir(formats.CHECKPOINT_DIR) == ["0000000000000000.ckpt"]


# ---- recover ------------------------------------------------------------------------------------


def test_recover_cuts_a_torn_tail_and_checkpoints_the_replayed_state(disk, superblock) -> None:
    path = write_wal(disk, superblock.uuid, 1, [file_ops(2, b"a"), file_ops(3, b"b")],
                     tail=b"torn!" * 8)
    recovered = recover(disk)
    assert recovered.last_lsn == 2
    cut = recovered.log_end.offset
    assert disk.read_file(path)[cut:] == b""  # everything from the torn record on is gone
    assert scan_log(disk, superblock.uuid, 0).end.reason is None
    assert checkpoints.list_checkpoints(disk)[-1] == (2, formats.checkpoint_name(2))
    again = load(disk)
    assert again.checkpoint_lsn == 2 and again.replayed == 0
    assert names(again.state) == {b"a", b"b"}


def test_recover_can_leave_replayed_records_to_a_later_checkpoint(disk, superblock) -> None:
    path = write_wal(disk, superblock.uuid, 1, [file_ops(2, b"a"), file_ops(3, b"b")],
                     tail=b"torn!" * 8)
    recovered = recover(disk, defer_checkpoint=True)
    assert recovered.checkpoint_due and recovered.replayed == 2
    assert checkpoints.list_checkpoints(disk) == [(0, formats.checkpoint_name(0))]
    assert disk.read_file(path)[recovered.log_end.offset:] == b""  # the torn tail is cut all the same
    again = load(disk)  # what the checkpoint would have held, replayed again
    assert again.replayed == 2 and names(again.state) == {b"a", b"b"}
    assert again.log_end.reason is None


def test_recover_checkpoints_reclaimed_orphans_even_when_deferring(disk, superblock) -> None:
    """A reclaimed orphan is a change the log does not hold: it must reach a checkpoint
    before the mount, whatever the caller prefers."""
    orphan = file_ops(2, b"gone") + [redo.DropEntry(ROOT_INO, b"gone"),
                                     redo.PutInode(2, REG, 0, 0, 0, 0, 0, T0, T0, T0)]
    write_wal(disk, superblock.uuid, 1, [orphan, file_ops(3, b"kept")])
    recovered = recover(disk, defer_checkpoint=True)
    assert recovered.orphans == 1 and not recovered.checkpoint_due
    assert checkpoints.list_checkpoints(disk)[-1][0] == 2
    again = load(disk)
    assert (again.replayed, again.orphans) == (0, 0) and names(again.state) == {b"kept"}


# ---- write_checkpoint ---------------------------------------------------------------------------


def test_write_checkpoint_keeps_only_the_newest_two(disk, superblock) -> None:
    for lsn in (3, 9, 12):
        write_checkpoint(disk, superblock.uuid, lsn, snapshot.encode(state_with((lsn, b"x%d" % lsn))))
    assert disk.listdir(formats.CHECKPOINT_DIR) == ["0000000000000009.ckpt",
                                                    "000000000000000c.ckpt"]
    for lsn in (9, 12):
        got_lsn, body = formats.decode_checkpoint(
            disk.read_file(formats.checkpoint_name(lsn)), superblock.uuid, "ck")
        assert got_lsn == lsn and names(snapshot.decode(body)) == {b"x%d" % lsn}


def test_written_checkpoints_survive_a_crash(disk, superblock) -> None:
    write_checkpoint(disk, superblock.uuid, 4, snapshot.encode(state_with((2, b"kept"))))
    after_crash = disk.crash()
    recovered = load(after_crash)
    assert recovered.checkpoint_lsn == 4 and names(recovered.state) == {b"kept"}


def test_checkpoint_body_written_in_parts_is_the_same_file(disk, superblock):
    body = snapshot.encode(TreeState.fresh(uid=0, gid=0, now_ns=1))
    uuid = superblock.uuid
    write_checkpoint(disk, uuid, 5, [body[:3], body[3:10], b"", body[10:]])
    whole = formats.encode_checkpoint(5, uuid, body)
    assert disk.read_file(formats.checkpoint_name(5)) == whole
    assert load(disk).checkpoint_lsn == 5
