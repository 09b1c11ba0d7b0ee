"""WAL writer actor: appends redo records, group commit, publishes the durable LSN.

Records arrive in LSN order (``Append``, no reply) in a log inbox of their own, which the writer
never waits on: a record does not wake it (one task step less per transaction); it takes the
records there whenever it wakes for a request or for its tick, and the tree manager asks it to
take them (``TakeRecords``) when that inbox is full. A commit takes every record waiting at that
moment, fsyncs the block store if data was written since the last commit (data
before the records that point at it), writes the records with one pwrite into the current segment
and fsyncs it once. Then every ``WaitDurable`` asker whose LSN is covered is answered. While that
fsync runs, new records and askers queue up and form the next batch: that is group commit.

A commit starts as soon as someone waits, at every tick of ``commit_interval`` when records are
waiting (so none waits longer: the bound on loss without fsync, G4), or when the batch grows past
``MAX_BATCH_BYTES``.
An I/O error of the log turns the whole filesystem failsafe (read-only): a log that may have lost
a write cannot take more records after it.
"""

from __future__ import annotations

import errno

import structlog
import trio

from razorfs.actors import messages as m
from razorfs.actors.mailbox import ReplyLater, ReplySlot, answer, dispatch
from razorfs.log import debug_enabled
from razorfs.storage import formats
from razorfs.storage.blockstore import BlockStore
from razorfs.storage.interface import Storage, StorageFile
from razorfs.storage.wal import delete_segments_upto

log = structlog.get_logger("razorfs.wal")

_ZEROS = bytes(1 << 20)


class WalStatus:
    """What the WAL writer publishes for others to read: written only by the WAL writer."""

    def __init__(self) -> None:
        self.durable_lsn = 0
        self.failed: str | None = None
        self.durable_bytes = 0  # of records made durable since the mount (replica lag)


class WalWriter:
    SEGMENT_BYTES = 16 << 20
    MAX_BATCH_BYTES = 4 << 20

    def __init__(self, inbox: trio.MemoryReceiveChannel, log_inbox: trio.MemoryReceiveChannel,
                 storage: Storage, uuid: bytes, blocks: BlockStore, *, next_lsn: int,
                 batch: int, commit_interval: float, status: WalStatus,
                 segment_bytes: int | None = None, replica_hold=None) -> None:
        self._inbox = inbox
        self._log_inbox = log_inbox
        self._storage = storage
        self._uuid = uuid
        self._blocks = blocks
        self._commit_interval = commit_interval
        self._status = status
        self._segment_bytes = segment_bytes or self.SEGMENT_BYTES
        self._replica_hold = replica_hold  # segments after its LSN are kept for the replica
        self._segment: StorageFile | None = None
        self._segment_offset = 0
        self._durable_lsn = status.durable_lsn = next_lsn - 1
        self._appended_lsn = next_lsn - 1
        self._batch = batch
        self._pending: list[tuple[int, bytes]] = []
        self._pending_bytes = 0
        self._waiters: list[tuple[int, ReplySlot | None]] = []
        self._failed: str | None = None
        # fsyncs: counted at each flush, in the worker threads too (the writer awaits them:
        # nothing reads the counts meanwhile)
        self._stats = {"batches": 0, "records": 0, "fsyncs": 0, "bytes_since_trim": 0}
        self._handlers = {
            m.Append: self._append,
            m.WaitDurable: ReplyLater(self._wait_durable),
            m.TrimLog: self._trim_log,
            m.WalStats: self._wal_stats,
            m.TakeRecords: self._take_records,
        }

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await trio.to_thread.run_sync(self._start_segment, self._durable_lsn + 1)
        task_status.started()
        try:
            async with self._inbox, self._log_inbox:
                await self._serve()
        finally:
            if self._segment is not None:
                self._segment.close()

    async def _serve(self) -> None:
        next_tick = trio.current_time() + self._commit_interval
        while True:
            envelope = None
            with trio.move_on_at(next_tick):
                try:
                    envelope = await self._inbox.receive()
                except trio.EndOfChannel:
                    break
            # Every request already waiting, and every record, joins the batch before a commit.
            while envelope is not None:
                await dispatch(envelope, self._handlers, "wal")
                try:
                    envelope = self._inbox.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    envelope = None
            await self._take_records(None)
            if trio.current_time() >= next_tick:
                next_tick = trio.current_time() + self._commit_interval
                await self._commit()
            elif self._commit_due():
                await self._commit()
        await self._take_records(None)
        await self._commit()

    async def _take_records(self, message: m.TakeRecords | None) -> None:
        while True:
            try:
                envelope = self._log_inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            await dispatch(envelope, self._handlers, "wal")

    def _commit_due(self) -> bool:
        return bool(
            any(lsn > self._durable_lsn for lsn, _ in self._waiters)
            or self._pending_bytes >= self.MAX_BATCH_BYTES
        )

    async def _append(self, message: m.Append) -> None:
        if message.lsn != self._appended_lsn + 1 and not self._failed:
            # a gap would make every later record unreachable at replay: stop logging now
            self._fail(f"LSN {message.lsn} appended after {self._appended_lsn}")
        self._appended_lsn = message.lsn
        if self._failed:
            return
        self._pending.append((message.lsn, message.payload))
        self._pending_bytes += len(message.payload) + formats.RECORD_HEADER_SIZE

    async def _wait_durable(self, message: m.WaitDurable, slot: ReplySlot | None) -> None:
        if self._failed:
            answer(slot, m.Failed(errno.EIO, f"log failed: {self._failed}"))
        elif message.lsn <= self._durable_lsn:
            answer(slot, m.Durable(self._durable_lsn))
        else:
            self._waiters.append((message.lsn, slot))

    async def _trim_log(self, message: m.TrimLog) -> None:
        await self._commit()
        await trio.to_thread.run_sync(self._trim, message.upto)

    async def _wal_stats(self, message: m.WalStats) -> m.LogStatus:
        s = self._stats
        return m.LogStatus(self._durable_lsn, s["batches"], s["records"], s["fsyncs"],
                           s["bytes_since_trim"], self._failed)

    async def _commit(self) -> None:
        if self._pending and not self._failed:
            batch, self._pending = self._pending, []
            self._pending_bytes = 0
            self._batch += 1
            last = len(batch) - 1
            data = b"".join(formats.encode_record(lsn, self._batch, payload, last - index)
                            for index, (lsn, payload) in enumerate(batch))
            try:
                if (self._segment_offset + len(data) > self._segment_bytes
                        and self._segment_offset > formats.SEGMENT_HEADER_SIZE):
                    await trio.to_thread.run_sync(self._start_segment, batch[0][0])
                flushes = await trio.to_thread.run_sync(self._write_batch, data)
            except OSError as exc:
                self._fail(f"WAL write failed: {exc}")
            else:
                self._segment_offset += len(data)
                self._durable_lsn = self._status.durable_lsn = batch[-1][0]
                self._status.durable_bytes += len(data)
                self._stats["batches"] += 1
                self._stats["records"] += len(batch)
                self._stats["bytes_since_trim"] += len(data)
                if debug_enabled():
                    log.debug("group commit", records=len(batch), bytes=len(data),
                              durable_lsn=self._durable_lsn, fsyncs=flushes)
        self._answer_waiters()

    def _answer_waiters(self) -> None:
        still_waiting = []
        for lsn, slot in self._waiters:
            if self._failed:
                answer(slot, m.Failed(errno.EIO, f"log failed: {self._failed}"))
            elif lsn <= self._durable_lsn:
                answer(slot, m.Durable(self._durable_lsn))
            else:
                still_waiting.append((lsn, slot))
        self._waiters = still_waiting

    def _write_batch(self, data: bytes) -> int:
        """The batch on disk behind the data it maps (bytes a record carries itself need no
        flush first); returns how many flushes it took."""
        flushes = 0
        if self._blocks.sync_ordered():
            self._stats["fsyncs"] += 1
            flushes += 1
        self._segment.pwrite(self._segment_offset, data)
        self._segment.fsync()
        self._stats["fsyncs"] += 1
        return flushes + 1

    def _fail(self, reason: str) -> None:
        self._failed = self._status.failed = reason
        log.error("failsafe: log write failed, filesystem is now read-only", reason=reason)

    def _start_segment(self, first_lsn: int) -> None:
        """Create, zero-fill and fsync a new segment (and its directory entry) before any record
        goes into it, so that later fdatasyncs of the segment need no metadata update."""
        path = formats.segment_name(first_lsn)
        segment = self._storage.open(path, create=True)
        try:
            segment.truncate(0)
            header = formats.encode_segment_header(first_lsn, self._uuid)
            segment.pwrite(0, header)
            for offset in range(len(header), self._segment_bytes, len(_ZEROS)):
                segment.pwrite(offset, _ZEROS[: min(len(_ZEROS), self._segment_bytes - offset)])
            segment.fsync()
            self._stats["fsyncs"] += 1
            self._storage.fsync_dir(formats.WAL_DIR)
            self._stats["fsyncs"] += 1
        except BaseException:
            segment.close()
            raise
        if self._segment is not None:
            self._segment.close()
        self._segment = segment
        self._segment_offset = len(header)
        log.debug("new WAL segment", path=path)

    def _trim(self, upto: int) -> None:
        """Delete segments whose every record is <= ``upto`` (covered by a checkpoint)."""
        if self._segment_offset > formats.SEGMENT_HEADER_SIZE:
            self._start_segment(self._durable_lsn + 1)
        if self._replica_hold is not None:
            upto = min(upto, self._replica_hold.lsn)  # records the replica has not shipped
        delete_segments_upto(self._storage, upto)
        self._stats["bytes_since_trim"] = 0
