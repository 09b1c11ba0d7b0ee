"""The replica's view of the local data directory: which blocks a record maps, which blocks a
checkpoint maps, the shipped-LSN record (``replica.state``), and what the mount must keep for
a replica that is behind (docs/DESIGN.md, Replica). No I/O beyond the storage interface, no
actors: the recovery coordinator, the replicator and ``razorfs restore`` share it.
"""

from __future__ import annotations

import io
import stat
import struct
from dataclasses import dataclass

import msgpack
import structlog

from razorfs.actors import messages as m
from razorfs.storage import replica_formats as rf
from razorfs.storage.formats import FormatError
from razorfs.storage.interface import Storage
from razorfs.storage.wal import scan_log

log = structlog.get_logger("razorfs.replica")

NO_HOLD = 1 << 64  # greater than every LSN
_EXTENT = struct.Struct("<QQ")


def mapped_blocks(payload: bytes) -> list[tuple[int, int, int]]:
    """The (lblk, pblk, crc) triples a WAL record's payload maps (its PutBlocks operations):
    each is a block version born in that record (copy-on-write: nothing maps a block twice)."""
    triples = []
    for op in m.decode_ops(payload):
        if type(op) is m.PutBlocks:
            flat = op.blocks
            triples.extend(zip(flat[0::3], flat[1::3], flat[2::3]))
    return triples


def checkpoint_blocks(body: bytes) -> list[tuple[int, int]]:
    """(pblk, crc) of every block a checkpoint body maps, read record by record without
    building the tree (its record layout: razorfs.tree, "checkpoint bodies")."""
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
        log.info("replica: a fresh base will be uploaded", reason=reason, lsn=last_lsn)
        self.needs_base, self.shipped_lsn, self.lsn = True, 0, last_lsn
        return set()


def forget_replica(storage: Storage) -> None:
    """Mounted without ``--replica``: blocks and log are no longer kept for it, so a later
    mount with it must start from a fresh base."""
    state = read_state(storage)
    if state is not None and not state.needs_base:
        write_state(storage, rf.ReplicaState(state.shipped_lsn, True, state.target))
        log.warning("mounted without --replica: the replica will need a fresh base next time",
                    shipped_lsn=state.shipped_lsn)
