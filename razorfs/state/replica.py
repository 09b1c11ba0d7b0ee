"""The replica's view of the local data directory: which blocks a record maps, which blocks a
checkpoint maps, the shipped-LSN record (``replica.state``), and what the mount must keep for
a replica that is behind (docs/DESIGN.md, Replica). No I/O beyond the storage interface, no
actors: the recovery coordinator, the replicator and ``razorfs restore`` share it.
"""

from __future__ import annotations

import io
import stat
import struct

import msgpack
import structlog

from razorfs.state import redo
from razorfs.storage import replica_formats as rf
from razorfs.storage.formats import FormatError
from razorfs.storage.interface import Storage
from razorfs.storage import formats
from razorfs.storage.wal import list_segments, scan_log

log = structlog.get_logger("razorfs.replica")

NO_HOLD = 1 << 64  # greater than every LSN
_EXTENT = struct.Struct("<QQ")


def mapped_blocks(payload: bytes) -> list[tuple[int, int, int]]:
    """The (lblk, pblk, crc) triples a WAL record's payload maps (its PutBlocks and PutData
    operations): each is a block version born in that record (copy-on-write: nothing maps a
    block twice)."""
    triples = []
    for op in redo.decode_ops(payload):
        if type(op) is redo.PutBlocks or type(op) is redo.PutData:
            flat = op.blocks
            triples.extend(zip(flat[0::3], flat[1::3], flat[2::3]))
    return triples


def checkpoint_blocks(body: bytes) -> list[tuple[int, int]]:
    """(pblk, crc) of every block a checkpoint body maps, read record by record without
    building the tree (its record layout: razorfs.state.snapshot)."""
    unpacker = msgpack.Unpacker(io.BytesIO(body), raw=False, use_list=False,
                                strict_map_key=False, max_buffer_size=max(len(body), 1))
    if unpacker.read_array_header() != 2:
        raise FormatError("a checkpoint body is a 2-array")
    unpacker.skip()  # next_ino
    found = []
    for _ in range(unpacker.read_array_header()):
        record = unpacker.unpack()
        if stat.S_ISREG(record[1]) and record[10]:
            for _, packed in _EXTENT.iter_unpack(record[10]):
                found.append((packed >> 32, packed & 0xFFFFFFFF))
    return found


def read_state(storage: Storage) -> rf.ReplicaState | None:
    if not storage.exists(rf.STATE_PATH):
        return None
    try:
        return rf.ReplicaState.decode(storage.read_file(rf.STATE_PATH))
    except FormatError as exc:
        log.warning("replica state record unreadable: the replica will take a fresh base",
                    reason=str(exc))
        return None


def write_state(storage: Storage, state: rf.ReplicaState) -> None:
    storage.write_file_atomically(rf.STATE_PATH, state.encode())


class ReplicaHold:
    """The hold LSN, written only by the replicator (and at mount, before it starts): WAL
    segments with records after it are not trimmed, and blocks freed by a transaction after
    it are not reused, because the replica still has to read them. ``NO_HOLD`` without one."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.lsn = NO_HOLD
        self.shipped_lsn = 0
        self.needs_base = True
        self.backlog_at_mount = 0  # WAL bytes of the records after shipped_lsn at mount

    def before_recovery(self, storage: Storage) -> int | None:
        """The LSN after which recovery must keep the log (None: keep nothing extra)."""
        state = read_state(storage)
        if state is None or state.needs_base or state.target != rf.target_id(self.url):
            return None
        return state.shipped_lsn

    def after_recovery(self, storage: Storage, uuid: bytes, last_lsn: int,
                       used_blocks) -> set[int]:
        """Set the hold for the recovered state; return the blocks to keep out of the free
        map until the replica has shipped ``last_lsn``: those born after the shipped LSN and
        freed again before the crash (the rebuilt free map no longer knows them)."""
        state = read_state(storage)
        same_target = state is not None and state.target == rf.target_id(self.url)
        if not same_target or state.needs_base or state.shipped_lsn > last_lsn:
            return self._fresh_base(last_lsn, "no record of this replica" if not same_target
                                    else "a fresh base was due" if state.needs_base
                                    else "the record is ahead of the log")
        shipped = state.shipped_lsn
        held: set[int] = set()
        if shipped < last_lsn:
            try:
                scan = scan_log(storage, uuid, shipped)
            except FormatError as exc:
                return self._fresh_base(last_lsn, f"the log after LSN {shipped} is gone ({exc})")
            if not scan.records or scan.records[0].lsn != shipped + 1:
                return self._fresh_base(last_lsn, f"the log after LSN {shipped} is gone")
            for record in scan.records:
                if record.lsn > last_lsn:
                    break
                held.update(pblk for _, pblk, _ in mapped_blocks(record.payload))
                self.backlog_at_mount += record.end - record.offset
            held.difference_update(used_blocks)
        self.needs_base, self.shipped_lsn, self.lsn = False, shipped, shipped
        return held

    def _fresh_base(self, last_lsn: int, reason: str) -> set[int]:
        # No hold until the base begins: it then holds from the durable LSN of that moment,
        # and every block live at its checkpoint (a later LSN) is freed only after it.
        log.info("replica: a fresh base will be uploaded", reason=reason, lsn=last_lsn)
        self.needs_base, self.shipped_lsn, self.lsn = True, 0, NO_HOLD
        return set()


def forget_replica(storage: Storage) -> None:
    """Mounted without ``--replica``: blocks and log are no longer kept for it, so a later
    mount with it must start from a fresh base."""
    state = read_state(storage)
    if state is not None and not state.needs_base:
        write_state(storage, rf.ReplicaState(state.shipped_lsn, True, state.target))
        log.warning("mounted without --replica: the replica will need a fresh base next time",
                    shipped_lsn=state.shipped_lsn)


class LogGone(Exception):
    """The local log no longer holds a record the replica needs."""


class LogReader:
    """Reads WAL records in LSN order from the local segments, from any LSN on, while the WAL
    writer appends (blocking: run it in a worker thread). Only records the caller knows to be
    durable are asked for, and those are whole on disk."""

    WINDOW = 4 << 20

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._file = None
        self._first = 0  # first LSN of the open segment
        self._offset = 0
        self._next_lsn = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def read(self, after: int, upto: int, max_bytes: int):
        """(record, its bytes, its mapped block triples) of the records after ``after`` up to
        ``upto``, while their bytes and blocks (BLOCK_SIZE each) stay within ``max_bytes``
        (at least one record)."""
        if self._next_lsn != after + 1:
            self._seek(after + 1)
        found, size = [], 0
        while self._next_lsn <= upto:
            data = self._file.pread(self._offset, self.WINDOW)
            run = formats.decode_records(data, 0, self._next_lsn)
            if not run:
                if self._long_record(data):
                    continue
                if self._next_segment():
                    continue
                raise LogGone(f"WAL record LSN {self._next_lsn} not found in the local log")
            for record in run:
                triples = mapped_blocks(record.payload)
                cost = record.end - record.offset + len(triples) * formats.BLOCK_SIZE
                if record.lsn > upto or (found and size + cost > max_bytes):
                    return found
                if record.end > len(data):
                    break  # its padding is past the window: read again from it
                found.append((record, data[record.offset : record.end], triples))
                size += cost
                self._offset += record.end - record.offset
                self._next_lsn = record.lsn + 1
        return found

    def _long_record(self, data: bytes) -> bool:
        """A record longer than the window: read it whole next time."""
        if len(data) < formats.RECORD_HEADER_SIZE or data[:4] != formats.RECORD_MAGIC:
            return False
        length = int.from_bytes(data[4:8], "little")
        if length + formats.RECORD_HEADER_SIZE <= len(data):
            return False
        self.WINDOW = length + formats.RECORD_HEADER_SIZE + 8
        return True

    def _next_segment(self) -> bool:
        for first, path in list_segments(self._storage):
            if first == self._next_lsn and first != self._first:
                self._open(first, path)
                return True
        return False

    def _open(self, first: int, path: str) -> None:
        self.close()
        self._file = self._storage.open(path)
        self._first = first
        self._offset = formats.SEGMENT_HEADER_SIZE
        self._next_lsn = first

    def _seek(self, lsn: int) -> None:
        candidates = [(first, path) for first, path in list_segments(self._storage)
                      if first <= lsn]
        if not candidates:
            raise LogGone(f"WAL record LSN {lsn} is older than every local segment")
        self._open(*candidates[-1])
        while self._next_lsn < lsn:
            if not self.read(self._next_lsn - 1, lsn - 1, 64 << 20):
                raise LogGone(f"WAL record LSN {lsn} not found in the local log")
