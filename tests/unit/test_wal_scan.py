"""scan_log: the valid WAL records in LSN order, and the torn-tail-versus-corruption rule."""

from __future__ import annotations

import random

import pytest

from razorfs.datadir import format_storage
from razorfs.storage import formats
from razorfs.storage.formats import SEGMENT_HEADER_SIZE, FormatError
from razorfs.storage.simdisk import SimDisk
from razorfs.storage.wal import LogEnd, delete_segments_upto, list_segments, scan_log

SEGMENT_BYTES = 4096
RECORD_BYTES = 48  # 32-byte header + 16-byte payload (see payload())


def payload(lsn: int) -> bytes:
    return f"op {lsn:013d}".encode()


def rec(lsn: int, batch: int, following: int = 0) -> bytes:
    """A record; ``following``: how many more records of its batch come after it."""
    return formats.encode_record(lsn, batch, payload(lsn), following)


def slot(index: int) -> int:
    """Offset of the index-th record of a segment (all test records have the same size)."""
    return SEGMENT_HEADER_SIZE + index * RECORD_BYTES


def garbage(size: int = RECORD_BYTES) -> bytes:
    return bytes((i * 37 + 11) % 251 + 1 for i in range(size))


def damaged(record: bytes, index: int = RECORD_BYTES - 5) -> bytes:
    out = bytearray(record)
    out[index] ^= 0xFF
    return bytes(out)


@pytest.fixture
def disk() -> SimDisk:
    return SimDisk()


@pytest.fixture
def uuid(disk: SimDisk) -> bytes:
    return format_storage(disk).uuid


def write_segment(disk: SimDisk, uuid: bytes, first_lsn: int, *chunks: bytes,
                  pad: bool = True) -> str:
    """A segment as the writer leaves it: header, records, then preallocated zeros."""
    data = formats.encode_segment_header(first_lsn, uuid) + b"".join(chunks)
    if pad:
        assert len(data) <= SEGMENT_BYTES
        data += bytes(SEGMENT_BYTES - len(data))
    path = formats.segment_name(first_lsn)
    with disk.open(path, create=True) as f:
        f.truncate(0)
        f.pwrite(0, data)
        f.fsync()
    disk.fsync_dir(formats.WAL_DIR)
    return path


def lsns(scan) -> list[int]:
    return [record.lsn for record in scan.records]


# ---- the valid log ------------------------------------------------------------------------------


def test_fresh_filesystem_has_an_empty_log(disk, uuid) -> None:
    scan = scan_log(disk, uuid, 0)
    assert scan.records == [] and scan.segments == [] and scan.end is None
    assert scan.last_lsn is None and scan.last_batch == 0


def test_all_records_returned_in_order(disk, uuid) -> None:
    path = write_segment(disk, uuid, 1, rec(1, 1), rec(2, 1), rec(3, 2), rec(4, 3), rec(5, 3))
    scan = scan_log(disk, uuid, 0)
    assert lsns(scan) == [1, 2, 3, 4, 5]
    assert [r.payload for r in scan.records] == [payload(i) for i in range(1, 6)]
    assert [r.offset for r in scan.records] == [slot(i) for i in range(5)]
    assert scan.last_lsn == 5 and scan.last_batch == 3
    assert scan.end == LogEnd(path, slot(5), None)
    assert scan.segments == [(1, path)]


@pytest.mark.parametrize("after, expected", [(0, [1, 2, 3, 4]), (2, [3, 4]), (4, [])])
def test_only_records_after_the_checkpoint_lsn_are_returned(disk, uuid, after, expected) -> None:
    write_segment(disk, uuid, 1, rec(1, 1), rec(2, 2), rec(3, 2), rec(4, 3))
    scan = scan_log(disk, uuid, after)
    assert lsns(scan) == expected
    assert scan.last_batch == 3  # batches are counted even for records the checkpoint covers


def test_other_files_in_the_wal_directory_are_ignored(disk, uuid) -> None:
    write_segment(disk, uuid, 1, rec(1, 1))
    for name in ("notes.txt", "0000000000000002.wal.tmp", "0000000000000003.ckpt"):
        with disk.open(f"{formats.WAL_DIR}/{name}", create=True) as f:
            f.pwrite(0, garbage())
    assert [path for _, path in list_segments(disk)] == [formats.segment_name(1)]
    assert lsns(scan_log(disk, uuid, 0)) == [1]


def test_scan_does_not_change_the_disk(disk, uuid) -> None:
    path = write_segment(disk, uuid, 1, rec(1, 1), garbage())
    before = disk.read_file(path)
    scan_log(disk, uuid, 0)
    assert disk.read_file(path) == before
    assert disk.listdir(formats.WAL_DIR) == ["0000000000000001.wal"]


@pytest.mark.parametrize("pad_first", [True, False])
def test_rotation_across_two_segments_reads_through(disk, uuid, pad_first) -> None:
    write_segment(disk, uuid, 1, rec(1, 1), rec(2, 1), rec(3, 2), pad=pad_first)
    second = write_segment(disk, uuid, 4, rec(4, 3), rec(5, 3), rec(6, 4))
    scan = scan_log(disk, uuid, 0)
    assert lsns(scan) == [1, 2, 3, 4, 5, 6]
    assert scan.last_batch == 4
    assert scan.end == LogEnd(second, slot(3), None)
    assert lsns(scan_log(disk, uuid, 4)) == [5, 6]


def test_empty_newest_segment_after_rotation_is_fine(disk, uuid) -> None:
    write_segment(disk, uuid, 1, rec(1, 1), rec(2, 1))
    newest = write_segment(disk, uuid, 3)
    scan = scan_log(disk, uuid, 2)
    assert scan.records == [] and scan.last_batch == 1
    assert scan.end == LogEnd(newest, SEGMENT_HEADER_SIZE, None)


# ---- torn tails ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kept", [1, 10, 31, 32, 40, 47])
def test_truncated_last_record_is_a_torn_tail(disk, uuid, kept) -> None:
    path = write_segment(disk, uuid, 1, rec(1, 1), rec(2, 1), rec(3, 2)[:kept], pad=False)
    scan = scan_log(disk, uuid, 0)
    assert lsns(scan) == [1, 2]
    assert scan.end.segment == path and scan.end.offset == slot(2)
    assert scan.end.reason == f"invalid record at {path} offset {slot(2)}"


@pytest.mark.parametrize("tail", [garbage(), damaged(rec(3, 2)), damaged(rec(3, 2), 2)],
                         ids=["garbage", "bad-payload-crc", "bad-magic"])
def test_garbage_last_record_is_a_torn_tail_with_a_reason(disk, uuid, tail) -> None:
    path = write_segment(disk, uuid, 1, rec(1, 1), rec(2, 1), tail)
    scan = scan_log(disk, uuid, 0)
    assert lsns(scan) == [1, 2] and scan.last_batch == 1
    assert scan.end == LogEnd(path, slot(2), f"invalid record at {path} offset {slot(2)}")


def test_zeroed_last_record_ends_the_log_without_a_reason(disk, uuid) -> None:
    path = write_segment(disk, uuid, 1, rec(1, 1), rec(2, 1), bytes(RECORD_BYTES))
    scan = scan_log(disk, uuid, 0)
    assert lsns(scan) == [1, 2]
    assert scan.end == LogEnd(path, slot(2), None)


def test_record_with_unexpected_lsn_ends_the_log(disk, uuid) -> None:
    write_segment(disk, uuid, 1, rec(1, 1), rec(2, 1), rec(7, 2))
    scan = scan_log(disk, uuid, 0)
    assert lsns(scan) == [1, 2]
    assert scan.end.offset == slot(2) and "has LSN 7, expected 3" in scan.end.reason


def test_damage_followed_by_records_of_the_same_batch_is_a_torn_tail(disk, uuid) -> None:
    # Batch 2 (LSNs 3..5) was being written when the power failed: its first record is torn,
    # the later ones reached the disk. Batch 2 was never acknowledged, so all of it is dropped.
    path = write_segment(disk, uuid, 1, rec(1, 1), rec(2, 1), garbage(), rec(4, 2), rec(5, 2))
    scan = scan_log(disk, uuid, 0)
    assert lsns(scan) == [1, 2]
    assert scan.end == LogEnd(path, slot(2), f"invalid record at {path} offset {slot(2)}")


def test_zeroed_slot_followed_by_records_of_the_same_batch_is_a_torn_tail(disk, uuid) -> None:
    write_segment(disk, uuid, 1, rec(1, 1), bytes(RECORD_BYTES), rec(3, 2), rec(4, 2))
    assert lsns(scan_log(disk, uuid, 0)) == [1]


def test_damage_inside_the_last_batch_is_a_torn_tail(disk, uuid) -> None:
    write_segment(disk, uuid, 1, rec(1, 1), rec(2, 2), damaged(rec(3, 2)), rec(4, 2))
    scan = scan_log(disk, uuid, 0)
    assert lsns(scan) == [1, 2] and scan.end.reason is not None


# ---- corruption ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [garbage(), damaged(rec(3, 2)), bytes(RECORD_BYTES)],
                         ids=["garbage", "bad-crc", "zeros"])
def test_damage_followed_by_a_later_batch_in_the_same_segment_is_corruption(
        disk, uuid, bad) -> None:
    # Batch 3 was only written after batch 2's fsync returned: the damaged slot was durable.
    path = write_segment(disk, uuid, 1, rec(1, 1), rec(2, 1), bad, rec(4, 2), rec(5, 3))
    with pytest.raises(FormatError, match="corrupt") as info:
        scan_log(disk, uuid, 0)
    message = str(info.value)
    assert f"{path} offset {slot(2)}" in message
    assert f"batch 3, LSN 5) follows it at {path} offset {slot(4)}" in message


def test_damage_followed_by_a_much_later_batch_is_corruption(disk, uuid) -> None:
    write_segment(disk, uuid, 1, rec(1, 1), garbage(), rec(3, 2), rec(4, 7))
    with pytest.raises(FormatError, match="corrupt"):
        scan_log(disk, uuid, 0)


def test_damage_followed_by_a_later_batch_in_a_later_segment_is_corruption(disk, uuid) -> None:
    first = write_segment(disk, uuid, 1, rec(1, 1), rec(2, 1), garbage())
    later = write_segment(disk, uuid, 4, rec(4, 3), rec(5, 3))
    with pytest.raises(FormatError, match="corrupt") as info:
        scan_log(disk, uuid, 0)
    assert f"{first} offset {slot(2)}" in str(info.value)
    assert f"follows it at {later} offset {slot(0)}" in str(info.value)


def test_damaged_segment_header_followed_by_a_later_batch_is_corruption(disk, uuid) -> None:
    write_segment(disk, uuid, 1, rec(1, 1), rec(2, 1))
    broken = write_segment(disk, uuid, 3, rec(3, 2), rec(4, 2))
    write_segment(disk, uuid, 5, rec(5, 3))
    with disk.open(broken) as f:
        f.pwrite(20, b"\xff")
    with pytest.raises(FormatError, match="corrupt.*checksum mismatch"):
        scan_log(disk, uuid, 0)


def test_torn_header_of_the_newest_segment_is_a_torn_tail(disk, uuid) -> None:
    write_segment(disk, uuid, 1, rec(1, 1, 1), rec(2, 1))
    newest = write_segment(disk, uuid, 3)  # a crash while creating it: no record yet
    with disk.open(newest) as f:
        f.pwrite(20, b"\xff")
    scan = scan_log(disk, uuid, 0)
    assert lsns(scan) == [1, 2]
    assert scan.end.segment == newest and scan.end.offset == 0
    assert "checksum mismatch" in scan.end.reason


def test_damaged_header_before_a_valid_record_is_corruption(disk, uuid) -> None:
    # Headers are fsynced before any record goes into the segment.
    write_segment(disk, uuid, 1, rec(1, 1, 1), rec(2, 1))
    newest = write_segment(disk, uuid, 3, rec(3, 2))
    with disk.open(newest) as f:
        f.pwrite(20, b"\xff")
    with pytest.raises(FormatError, match="corrupt"):
        scan_log(disk, uuid, 0)


def test_damage_inside_a_batch_followed_by_the_next_batch_is_corruption(disk, uuid) -> None:
    # LSNs 1..3 are batch 1; LSN 2's payload rots; LSN 3 (still batch 1) proves the damaged slot
    # belongs to batch 1, and LSN 4 of batch 2 proves batch 1's fsync returned (acknowledged).
    write_segment(disk, uuid, 1, rec(1, 1, 2), damaged(rec(2, 1, 1)), rec(3, 1), rec(4, 2))
    with pytest.raises(FormatError, match="corrupt"):
        scan_log(disk, uuid, 0)


# ---- missing records ----------------------------------------------------------------------------


def test_gap_between_checkpoint_and_first_record_is_refused(disk, uuid) -> None:
    write_segment(disk, uuid, 5, rec(5, 4), rec(6, 4))
    with pytest.raises(FormatError, match="gap") as info:
        scan_log(disk, uuid, 2)
    assert "as of LSN 2" in str(info.value) and "LSN 5" in str(info.value)
    assert lsns(scan_log(disk, uuid, 4)) == [5, 6]


def test_later_segment_with_unexpected_first_lsn_and_records_is_refused(disk, uuid) -> None:
    write_segment(disk, uuid, 1, rec(1, 1), rec(2, 1), rec(3, 2))
    later = write_segment(disk, uuid, 6, rec(6, 4))
    with pytest.raises(FormatError, match=f"{later}: starts at LSN 6 but the log before it "
                                          "ends at 3"):
        scan_log(disk, uuid, 0)


def test_later_empty_segment_with_unexpected_first_lsn_just_ends_the_log(disk, uuid) -> None:
    write_segment(disk, uuid, 1, rec(1, 1), rec(2, 1))
    later = write_segment(disk, uuid, 6)
    scan = scan_log(disk, uuid, 0)
    assert lsns(scan) == [1, 2]
    assert scan.end == LogEnd(later, SEGMENT_HEADER_SIZE, None)


def test_segment_whose_header_disagrees_with_its_name_is_refused(disk, uuid) -> None:
    data = formats.encode_segment_header(9, uuid) + rec(9, 1)
    with disk.open(formats.segment_name(1), create=True) as f:
        f.pwrite(0, data)
    with pytest.raises(FormatError, match="header says first LSN 9"):
        scan_log(disk, uuid, 0)


def test_damaged_last_record_of_a_batch_followed_by_the_next_batch_is_corruption(disk, uuid):
    # LSN 1 says one more record of batch 1 follows: the damaged slot is batch 1's, and batch
    # 2 after it proves batch 1 was fsynced (acknowledged), not torn.
    write_segment(disk, uuid, 1, rec(1, 1, 1), damaged(rec(2, 1)), rec(3, 2))
    with pytest.raises(FormatError, match="corrupt"):
        scan_log(disk, uuid, 0)


class CutBeforeEachChange:
    """The calls of ``delete_segments_upto`` passed to a SimDisk; before each change, the disks
    a power cut could leave there (unsynced directory changes kept at random)."""

    def __init__(self, disk: SimDisk) -> None:
        self.disk = disk
        self.images: list[SimDisk] = []

    def listdir(self, path: str) -> list[str]:
        return self.disk.listdir(path)

    def unlink(self, path: str) -> None:
        self._cut()
        self.disk.unlink(path)

    def fsync_dir(self, path: str) -> None:
        self._cut()
        self.disk.fsync_dir(path)

    def _cut(self) -> None:
        self.images += [self.disk.crash(random.Random(seed), keep_unsynced=True)
                        for seed in range(32)]


def test_power_cut_while_segments_are_deleted_leaves_no_gap(disk, uuid) -> None:
    for first in (1, 3, 5, 7):
        write_segment(disk, uuid, first, rec(first, first), rec(first + 1, first))
    probe = CutBeforeEachChange(disk)
    assert delete_segments_upto(probe, 6) == 3
    for image in [*probe.images, disk.crash(random.Random(0), keep_unsynced=True)]:
        assert lsns(scan_log(image, uuid, 6)) == [7, 8]

