"""File handle generations: the epoch table, its file, and the new epoch every recovery starts."""

from __future__ import annotations

import stat

import pytest

from razorfs.datadir import format_storage
from razorfs.fsck import check
from razorfs.state import redo
from razorfs.state.generations import Generations
from razorfs.state.recovery import load, recover
from razorfs.state.tree import ROOT_INO
from razorfs.storage import formats
from razorfs.storage.checkpoints import read_epochs
from razorfs.storage.formats import FormatError
from razorfs.storage.simdisk import SimDisk

T0 = 1_700_000_000_000_000_000
UUID = bytes(range(16))


def test_an_inode_has_the_epoch_its_number_falls_in() -> None:
    table = Generations([(2, 1), (10, 2), (11, 5)])
    assert [table.of(ino) for ino in (ROOT_INO, 2, 9, 10, 11, 12, 10**12)] == [0, 1, 1, 2, 5, 5, 5]
    assert Generations().of(7) == 0  # a filesystem made before epochs: every handle generation 0


def test_each_start_is_a_new_epoch_and_a_mount_that_made_no_inode_leaves_none() -> None:
    first = Generations().started_at(2)
    assert first.entries == [(2, 1)]
    again = first.started_at(2)  # nothing was made in epoch 1 (or it was lost in a crash)
    assert again.entries == [(2, 2)] and again.of(2) == 2
    grown = again.started_at(40)
    assert grown.entries == [(2, 2), (40, 3)] and grown.of(39) == 2 and grown.of(40) == 3
    assert Generations().started_at(ROOT_INO).entries == [(ROOT_INO + 1, 1)]  # root stays 0


def test_the_epochs_file_round_trips_and_refuses_damage() -> None:
    entries = [(2, 1), (900, 2), (2**40, 2**32 - 1)]
    data = formats.encode_epochs(entries, UUID)
    assert formats.decode_epochs(data, UUID) == entries
    for offset in (0, 9, 13, 21, len(data) - 1):
        damaged = bytearray(data)
        damaged[offset] ^= 0x10
        with pytest.raises(FormatError):
            formats.decode_epochs(bytes(damaged), UUID)
    with pytest.raises(FormatError, match="another filesystem"):
        formats.decode_epochs(data, bytes(16))
    with pytest.raises(FormatError, match="entries"):
        formats.decode_epochs(data[:-1], UUID)
    with pytest.raises(FormatError, match="increase"):
        formats.decode_epochs(formats.encode_epochs([(5, 2), (5, 3)], UUID), UUID)
    with pytest.raises(FormatError, match="increase"):
        formats.decode_epochs(formats.encode_epochs([(5, 2), (9, 2)], UUID), UUID)


@pytest.fixture
def disk() -> SimDisk:
    disk = SimDisk()
    format_storage(disk)
    return disk


def add_files(disk: SimDisk, recovered, count: int) -> None:
    """``count`` inodes created as the tree manager would, written to the log."""
    state, uuid = recovered.state, recovered.superblock.uuid
    ops = []
    for _ in range(count):
        ino = state.next_ino
        ops += [redo.PutInode(ino, stat.S_IFREG | 0o644, 1, 0, 0, 0, 0, T0, T0, T0),
                redo.PutEntry(ROOT_INO, b"f%d" % ino, ino)]
        state.apply(ops[-2])
        state.apply(ops[-1])
    lsn = recovered.last_lsn + 1
    data = formats.encode_segment_header(lsn, uuid) + formats.encode_record(
        lsn, recovered.last_batch + 1, redo.encode_ops(ops)) + bytes(64)
    with disk.open(formats.segment_name(lsn), create=True) as segment:
        segment.pwrite(0, data)
        segment.fsync()
    disk.fsync_dir(formats.WAL_DIR)


def test_every_recovery_makes_its_epoch_durable_before_serving(disk) -> None:
    first = recover(disk)
    assert first.generations.entries == [(2, 1)]
    assert read_epochs(disk, first.superblock.uuid) == [(2, 1)]
    add_files(disk, first, 3)  # inodes 2, 3, 4 in epoch 1
    survived = disk.crash()  # only what was fsynced: the epochs file, the log record
    second = recover(survived)
    assert second.generations.entries == [(2, 1), (5, 2)]
    assert [second.generations.of(ino) for ino in (2, 4, 5)] == [1, 1, 2]
    assert read_epochs(survived, second.superblock.uuid) == [(2, 1), (5, 2)]
    third = recover(survived)  # the second mount made nothing: its epoch is replaced
    assert third.generations.entries == [(2, 1), (5, 3)]
    assert load(survived).generations.entries == [(2, 1), (5, 3)]  # load writes nothing


def test_a_damaged_epochs_file_is_reported_and_replaced_making_old_handles_stale(disk) -> None:
    recovered = recover(disk)
    add_files(disk, recovered, 2)
    recover(disk)
    data = bytearray(disk.read_file(formats.EPOCHS_PATH))
    data[-1] ^= 0x01
    disk.write_file_atomically(formats.EPOCHS_PATH, bytes(data))
    report = check(disk, verify_data=False)
    assert any("epochs checksum mismatch" in problem for problem in report.problems)
    after = recover(disk)
    entries = after.generations.entries
    assert after.epochs_damage and len(entries) == 2 and entries[0][0] == ROOT_INO + 1
    assert entries[0][1] > 10**9  # from the clock: above any count of mounts before
    assert after.generations.of(2) not in (0, 1)  # handles made in epoch 1 answer ESTALE
    assert check(disk, verify_data=False).clean
