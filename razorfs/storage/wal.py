"""Reading the WAL back: the valid records in LSN order, and where the log ends.

The byte layout and the torn-tail rule are in ``formats``. ``scan_log`` applies that rule; it
never changes the disk (recovery cuts the tail afterwards, fsck only reports).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from razorfs.storage import formats
from razorfs.storage.formats import FormatError
from razorfs.storage.interface import Storage


@dataclass
class LogEnd:
    """Where the valid log stops: the segment and offset of the first slot that is not the next
    record, and why (None when the segment simply ended)."""

    segment: str
    offset: int
    reason: str | None


@dataclass
class LogScan:
    records: list[formats.Record] = field(default_factory=list)
    segments: list[tuple[int, str]] = field(default_factory=list)
    end: LogEnd | None = None
    last_batch: int = 0
    last_following: int = 0  # records of last_batch still expected after the last good one
    discarded: int = 0  # committed records dropped by a salvage after mid-log damage

    @property
    def last_lsn(self) -> int | None:
        return self.records[-1].lsn if self.records else None


def list_segments(storage: Storage) -> list[tuple[int, str]]:
    """(first LSN, path) of every WAL segment, in LSN order."""
    found = []
    for name in storage.listdir(formats.WAL_DIR):
        lsn = formats.parse_lsn_name(name, ".wal")
        if lsn is not None:
            found.append((lsn, f"{formats.WAL_DIR}/{name}"))
    return sorted(found)


def scan_log(storage: Storage, uuid: bytes, after_lsn: int, *,
             salvage: bool = False) -> LogScan:
    """Every valid record with an LSN greater than ``after_lsn``, in order.

    Raises FormatError when the log is damaged somewhere other than its tail, or when records
    after ``after_lsn`` are missing (a gap between the checkpoint and the oldest segment).
    With ``salvage`` (``razorfs fsck --repair``), damage anywhere ends the log instead, and
    ``discarded`` counts the committed records after it that are given up.
    """
    scan = LogScan(segments=list_segments(storage))
    contents = []
    for first_lsn, path in scan.segments:
        contents.append((first_lsn, path, storage.read_file(path)))

    expected = None  # LSN the next record must carry, once the first record is known
    for index, (first_lsn, path, data) in enumerate(contents):
        try:
            header_lsn = formats.decode_segment_header(data, uuid, path)
        except FormatError as exc:
            # Headers are fsynced before any record goes in: every valid record after a damaged
            # header (batch > 0) proves corruption.
            scan.discarded = _ensure_tail(contents, index, formats.SEGMENT_HEADER_SIZE, 0,
                                          str(exc), salvage)
            scan.end = LogEnd(path, 0, str(exc))
            return _finish(scan, after_lsn)
        if header_lsn != first_lsn:
            raise FormatError(f"{path}: header says first LSN {header_lsn}")
        if expected is not None and first_lsn != expected:
            # A later segment starting anywhere but right after the previous one's last record
            # means records between them are lost.
            if _has_records(data):
                raise FormatError(
                    f"{path}: starts at LSN {first_lsn} but the log before it ends at "
                    f"{expected - 1}"
                )
            scan.end = LogEnd(path, formats.SEGMENT_HEADER_SIZE, None)
            return _finish(scan, after_lsn)
        expected = first_lsn
        offset = formats.SEGMENT_HEADER_SIZE
        run = formats.decode_records(data, offset, expected)
        if run:
            _take(scan, run, after_lsn)
            expected = run[-1].lsn + 1
            offset = run[-1].end
        # The slot at ``offset`` is not the next record: the segment's end, or damage.
        if _is_clean_end(data, offset):
            reason = f"log ends at {path} offset {offset}"
            scan.discarded = _ensure_tail(contents[index : index + 1], 0, offset,
                                          _damaged_batch(scan), reason, salvage)
            if scan.discarded:
                scan.end = LogEnd(path, offset, reason)
                return _finish(scan, after_lsn)
            continue
        record = formats.decode_record(data, offset)
        reason = (f"invalid record at {path} offset {offset}" if record is None
                  else f"record at {path} offset {offset} has LSN {record.lsn}, "
                       f"expected {expected}")
        scan.discarded = _ensure_tail(contents, index, offset, _damaged_batch(scan), reason,
                                      salvage)
        scan.end = LogEnd(path, offset, reason)
        return _finish(scan, after_lsn)
    if contents:
        scan.end = LogEnd(contents[-1][1], offset, None)
    return _finish(scan, after_lsn)


def delete_segments_upto(storage: Storage, upto: int) -> int:
    """Delete the segments whose every record is <= ``upto`` (the newest segment always stays);
    return how many. Oldest first, each removal durable before the next: unsynced removals may
    land in any order, and an older segment left without the one after it is a gap that the
    scan refuses."""
    segments = list_segments(storage)
    removed = 0
    for (_, path), (next_first, _) in zip(segments, segments[1:]):
        if next_first - 1 <= upto:
            storage.unlink(path)
            storage.fsync_dir(formats.WAL_DIR)
            removed += 1
    return removed


def _take(scan: LogScan, run: list[formats.Record], after_lsn: int) -> None:
    """Add a run of consecutive records to the scan (those after ``after_lsn``)."""
    if run[0].lsn > after_lsn:
        scan.records.extend(run)
    else:
        scan.records.extend(record for record in run if record.lsn > after_lsn)
    scan.last_batch = run[-1].batch
    scan.last_following = run[-1].following


def _has_records(data: bytes) -> bool:
    return next(formats.find_valid_records_after(data, formats.SEGMENT_HEADER_SIZE), None) is not None


def _is_clean_end(data: bytes, offset: int) -> bool:
    """True where the segment's written part ends: end of file or preallocated zeros."""
    return offset >= len(data) or not any(data[offset : offset + formats.RECORD_HEADER_SIZE])


def _damaged_batch(scan: LogScan) -> int:
    """The batch a damaged slot right after the last good record belongs to."""
    return scan.last_batch if scan.last_following else scan.last_batch + 1


def _ensure_tail(contents, index: int, offset: int, damaged_batch: int, reason: str,
                 salvage: bool) -> int:
    """Raise unless the damage at ``offset`` of segment ``index`` is confined to the last batch
    (with ``salvage``, return how many committed records follow it instead): any valid record
    of a batch after the damaged slot's proves that the damaged record was once durable."""
    committed = [(path, record)
                 for position, (_, path, data) in enumerate(contents[index:])
                 for record in formats.find_valid_records_after(
                     data, offset if position == 0 else formats.SEGMENT_HEADER_SIZE)
                 if record.batch > damaged_batch]
    if salvage:
        return len(committed)
    for path, record in committed:
        raise FormatError(
            f"WAL corrupt: {reason}, yet a later commit (batch {record.batch}, LSN "
            f"{record.lsn}) follows it at {path} offset {record.offset}: refusing to "
            "drop committed records (`razorfs fsck --repair` salvages the log up to "
            "the damage)"
        )
    return 0


def _finish(scan: LogScan, after_lsn: int) -> LogScan:
    if scan.records and scan.records[0].lsn != after_lsn + 1:
        raise FormatError(
            f"WAL gap: the checkpoint is as of LSN {after_lsn} but the oldest record found after "
            f"it is LSN {scan.records[0].lsn}"
        )
    return scan
