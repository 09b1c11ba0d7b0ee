"""Replicator actor: ships every committed change to an S3 object store, in order, continuously.

It follows the durable LSN the WAL writer publishes, reads the new records from the local WAL
segments and the blocks they map from the block store, and uploads them as one chunk object;
then it records the shipped LSN in ``replica.state`` and moves the hold LSN (``ReplicaHold``)
that keeps those segments and blocks from being trimmed or reused. Nothing here makes a FUSE
request wait: the mount only ever reads the hold LSN. A base (a checkpoint and every block it
maps) starts a replica, follows a gap, and with a retention is taken again once the chunks
since the newest base outgrow it; old objects are pruned outside the retention window.

The store down or slow: every call is retried with exponential backoff and a warning names the
backlog; past ``backlog_bytes`` of unshipped log the hold is released (the disk must not fill)
and the replica is marked as needing a fresh base, which it gets when the store answers again.
Layout and reasons: docs/DESIGN.md, Replica; formats: razorfs/storage/replica_formats.py.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import structlog
import trio

from razorfs.actors import messages as m
from razorfs.actors.mailbox import Mailbox, dispatch
from razorfs.errors import FsError
from razorfs.state.replica import (
    NO_HOLD, LogGone, LogReader, ReplicaHold, checkpoint_blocks, write_state)
from razorfs.storage import formats
from razorfs.storage import replica_formats as rf
from razorfs.storage.blockstore import BlockStore
from razorfs.storage.formats import FormatError
from razorfs.storage.interface import Storage
from razorfs.storage.objectstore import ObjectStore, ObjectStoreError, ReplicaURL
from razorfs.storage.replica_catalog import Catalog, base_time, read_catalog

log = structlog.get_logger("razorfs.replica")


@dataclass(frozen=True)
class ReplicaTuning:
    retention_seconds: float | None = None  # None: keep everything, no periodic bases
    backlog_bytes: int = 1 << 30  # unshipped WAL kept locally before the hold is released
    base_min_bytes: int = 64 << 20  # chunk bytes since the newest base before another
    poll: float = 0.05  # how often the durable LSN is looked at
    chunk_bytes: int = 16 << 20  # records + blocks per chunk
    pack_blocks: int = 4096  # blocks per base pack (16 MiB)
    backoff_min: float = 0.5
    backoff_max: float = 10.0  # also the longest lag after the store is back
    warn_every: float = 60.0
    drain_seconds: float = 10.0  # at unmount, time left to ship what is durable
    timeline_max: int = 256  # timeline entries per chunk


class LocalDamage(Exception):
    """A block the replica needs no longer holds the bytes its record gives."""


class Refused(Exception):
    """The store holds something this filesystem must not write over."""


class Replicator:
    def __init__(self, inbox: trio.MemoryReceiveChannel, storage: Storage, uuid: bytes,
                 blocks: BlockStore, wal_status, hold: ReplicaHold, coordinator: Mailbox,
                 tuning: ReplicaTuning = ReplicaTuning(), *, store=None) -> None:
        self._inbox = inbox
        self._storage = storage
        self._uuid = uuid
        self._blocks = blocks
        self._status = wal_status
        self._hold = hold
        self._coordinator = coordinator
        self._tuning = tuning
        self._url = hold.url
        self._store: ObjectStore | None = store
        self._reader = LogReader(storage)
        self._shipped = hold.shipped_lsn
        self._needs_base = hold.needs_base
        self._base_from: int | None = None  # durable LSN when the base being built began
        self._ready = False  # the store's catalog was read and reconciled
        self._refused: str | None = None
        self._catalog: Catalog | None = None
        self._base_times: dict[int, int] = {}
        self._chunk_bytes_since_base = 0
        self._last_base_bytes = 0
        self._timeline: deque[tuple[int, int]] = deque()  # (durable lsn, ns) after shipped
        self._noted_lsn = -1
        self._shipped_record_bytes = 0
        self._record_bytes_offset = hold.backlog_at_mount
        self._store_error: str | None = None
        self._warned_at = -float("inf")
        self._next_prune = 0.0
        self._stopping = False
        self._stop_requested = trio.Event()  # wakes the work loop from its pauses
        self._counters = {"chunks_uploaded": 0, "bases_uploaded": 0, "bytes_uploaded": 0,
                          "objects_pruned": 0, "upload_errors": 0}
        self._state = "starting"
        self._handlers = {m.ReplicaStats: self._stats}

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._note_durable()
        task_status.started()
        try:
            async with self._coordinator, trio.open_nursery() as nursery:
                work_done = trio.Event()
                nursery.start_soon(self._work, work_done)
                async with self._inbox:
                    async for envelope in self._inbox:
                        await dispatch(envelope, self._handlers, "replicator")
                # Unmounting: ship what is durable, for a while, then stop.
                self._stopping = True
                self._stop_requested.set()
                with trio.move_on_after(self._tuning.drain_seconds):
                    await work_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._reader.close()
            log.info("replica stopped", url=self._url, shipped_lsn=self._shipped,
                     durable_lsn=self._status.durable_lsn)

    async def _stats(self, message: m.ReplicaStats) -> m.ReplicaStatus:
        return m.ReplicaStatus(self.stats())

    # ---- the work loop ----

    async def _work(self, done: trio.Event) -> None:
        backoff = self._tuning.backoff_min
        try:
            while True:
                self._note_durable()
                try:
                    if not await self._step():
                        if self._stopping:
                            return
                        await self._pause(self._tuning.poll)
                except ObjectStoreError as exc:
                    self._unreachable(str(exc))
                    if self._stopping:
                        return
                    await self._pause(backoff)
                    backoff = min(backoff * 2, self._tuning.backoff_max)
                    continue
                except (LocalDamage, LogGone, FormatError) as exc:
                    log.error("replica: local data for the replica is gone or damaged; "
                              "taking a fresh base", reason=str(exc), shipped_lsn=self._shipped)
                    await self._mark_needs_base()
                    await self._pause(backoff)
                    backoff = min(backoff * 2, self._tuning.backoff_max)
                    continue
                except Refused as exc:
                    self._refused = str(exc)
                    self._state = "refused"
                    self._hold.lsn = NO_HOLD
                    log.error("replica refused: nothing will be uploaded", reason=str(exc),
                              url=self._url)
                    return
                if self._store_error is not None:
                    log.info("replica: store reachable again", url=self._url,
                             lag_lsns=self._status.durable_lsn - self._shipped)
                    self._store_error = None
                backoff = self._tuning.backoff_min
        finally:
            done.set()

    async def _pause(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self._stop_requested.wait()

    async def _step(self) -> bool:
        """One piece of work; False when there was none."""
        if self._store is None:
            self._store = await trio.to_thread.run_sync(ObjectStore, ReplicaURL.parse(self._url))
        if not self._ready:
            await self._reconcile()
        if self._needs_base:
            if self._stopping:
                return False
            await self._upload_base(fresh=True)
            return True
        if self._shipped < self._status.durable_lsn:
            await self._ship_chunk()
            return True
        self._state = "caught up"
        if self._stopping:
            return False
        if self._base_due():
            await self._upload_base(fresh=False)
            return True
        if self._tuning.retention_seconds is not None and trio.current_time() >= self._next_prune:
            await self._prune()
            return True
        return False

    def _note_durable(self) -> None:
        """Timeline: when each durable LSN was first seen (an upper bound of its commit)."""
        durable = self._status.durable_lsn
        if durable > self._noted_lsn:
            self._noted_lsn = durable
            self._timeline.append((durable, time.time_ns()))
        self._check_backlog()

    def _check_backlog(self) -> None:
        if (not self._needs_base and self._hold.lsn != NO_HOLD
                and self._lag_bytes() > self._tuning.backlog_bytes):
            log.error("replica backlog over its bound: releasing the local WAL and blocks "
                      "kept for it; the replica will restart from a fresh base and the "
                      "moments after LSN %d until then will not be restorable" % self._shipped,
                      lag_bytes=self._lag_bytes(), bound=self._tuning.backlog_bytes,
                      url=self._url)
            self._needs_base = True
            self._hold.needs_base = True
            self._hold.lsn = NO_HOLD
            try:
                write_state(self._storage, rf.ReplicaState(self._shipped, True,
                                                           rf.target_id(self._url)))
            except OSError as exc:
                log.error("replica state record not written", reason=str(exc))

    def _unreachable(self, reason: str) -> None:
        self._counters["upload_errors"] += 1
        now = trio.current_time()
        if self._store_error is None or now - self._warned_at >= self._tuning.warn_every:
            self._warned_at = now
            log.warning("replica: store unreachable, keeping the backlog locally",
                        reason=reason, url=self._url,
                        lag_lsns=self._status.durable_lsn - self._shipped,
                        lag_bytes=self._lag_bytes(), bound_bytes=self._tuning.backlog_bytes)
        self._store_error = reason
        self._state = "store unreachable"

    # ---- reconcile with the store ----

    async def _reconcile(self) -> None:
        catalog = await trio.to_thread.run_sync(read_catalog, self._store)
        if catalog.uuid is None:
            await trio.to_thread.run_sync(self._store.put, rf.IDENTITY_KEY,
                                          rf.encode_identity(self._uuid))
        elif catalog.uuid != self._uuid:
            raise Refused(f"{self._url} holds the replica of another filesystem "
                          f"(uuid {catalog.uuid.hex()}, this one is {self._uuid.hex()})")
        newest = catalog.newest_lsn
        if newest is not None and newest > self._status.durable_lsn:
            raise Refused(f"{self._url} holds LSN {newest}, beyond this filesystem's log "
                          f"(LSN {self._status.durable_lsn}): another history of it; use "
                          "another prefix")
        leftovers = [name for names in catalog.incomplete_bases.values() for name in names]
        if leftovers:
            await trio.to_thread.run_sync(self._store.delete, leftovers)
            log.info("replica: removed an incomplete base", objects=len(leftovers))
        if not self._needs_base:
            shipped = self._shipped
            by_first = {first: last for first, last in catalog.chunks}
            while shipped + 1 in by_first:  # uploaded before a crash, not yet recorded
                shipped = by_first[shipped + 1]
            if catalog.range_for(shipped) is None:
                log.warning("replica lacks the history up to the shipped LSN: taking a "
                            "fresh base", shipped_lsn=shipped)
                await self._mark_needs_base()
            elif shipped != self._shipped:
                log.info("replica: adopted chunks uploaded before a crash",
                         recorded_lsn=self._shipped, shipped_lsn=shipped)
                await self._set_shipped(shipped, record_bytes=None)
        if catalog.bases:
            newest_base = catalog.bases[-1]
            self._chunk_bytes_since_base = sum(size for span, size in catalog.chunk_sizes.items()
                                               if span[0] > newest_base)
            self._last_base_bytes = catalog.base_sizes.get(newest_base, 0)
        self._catalog = catalog
        self._ready = True
        self._state = "streaming"

    async def _mark_needs_base(self) -> None:
        self._needs_base = self._hold.needs_base = True
        self._hold.lsn = NO_HOLD  # the base holds from its own start (``_upload_base``)
        await trio.to_thread.run_sync(write_state, self._storage, rf.ReplicaState(
            self._shipped, True, rf.target_id(self._url)))

    async def _set_shipped(self, lsn: int, record_bytes: int | None) -> None:
        await trio.to_thread.run_sync(write_state, self._storage, rf.ReplicaState(
            lsn, False, rf.target_id(self._url)))
        self._shipped = self._hold.shipped_lsn = lsn
        if record_bytes is not None:
            self._shipped_record_bytes += record_bytes
        while self._timeline and self._timeline[0][0] <= lsn:
            self._timeline.popleft()
        self._update_hold()

    def _update_hold(self) -> None:
        lsn = self._shipped if not self._needs_base else NO_HOLD
        if self._base_from is not None:
            lsn = min(lsn, self._base_from)
        self._hold.lsn = lsn

    # ---- chunks ----

    async def _ship_chunk(self) -> None:
        self._state = "streaming"
        upto = self._status.durable_lsn
        records = await trio.to_thread.run_sync(self._reader.read, self._shipped, upto,
                                                self._tuning.chunk_bytes)
        first, last = records[0][0].lsn, records[-1][0].lsn
        blocks = await trio.to_thread.run_sync(self._read_blocks, records)
        raw = b"".join(data for _, data, _ in records)
        parts = rf.encode_chunk(first, last, self._uuid, self._chunk_timeline(last), raw, blocks)
        size = sum(map(len, parts))
        await trio.to_thread.run_sync(self._store.put, rf.chunk_key(first, last), parts)
        self._counters["chunks_uploaded"] += 1
        self._counters["bytes_uploaded"] += size
        self._chunk_bytes_since_base += size
        await self._set_shipped(last, len(raw))

    def _read_blocks(self, records) -> list[bytes]:
        """The bytes of every block the records map, each checked against its record's CRC."""
        found = []
        for record, _, triples in records:
            for _, pblk, checksum in triples:
                data = self._blocks.read_run(pblk, 1)
                if formats.crc(data) != checksum:
                    raise LocalDamage(f"block {pblk} mapped by LSN {record.lsn} no longer "
                                      "holds the bytes its record gives")
                found.append(data)
        return found

    def _chunk_timeline(self, last: int) -> list[tuple[int, int]]:
        entries = [entry for entry in self._timeline if entry[0] < last]
        covering = next((ns for lsn, ns in self._timeline if lsn >= last), time.time_ns())
        entries.append((last, covering))
        limit = self._tuning.timeline_max
        if len(entries) > limit:
            step = len(entries) / (limit - 1)
            entries = [entries[int(i * step)] for i in range(limit - 1)] + [entries[-1]]
        return entries

    # ---- bases ----

    def _base_due(self) -> bool:
        return (self._tuning.retention_seconds is not None
                and self._chunk_bytes_since_base >= max(self._last_base_bytes,
                                                         self._tuning.base_min_bytes))

    async def _upload_base(self, *, fresh: bool) -> None:
        self._state = "uploading a base"
        self._base_from = self._status.durable_lsn
        self._update_hold()
        try:
            try:
                lsn = (await self._coordinator.ask(m.Checkpoint())).lsn
            except FsError as exc:
                raise ObjectStoreError(f"no checkpoint for a base: {exc}") from None
            # time the checkpoint's LSN was durable by (an upper bound)
            base_ns = time.time_ns()
            written_bytes = self._status.durable_bytes
            if lsn not in (self._catalog.bases if self._catalog else ()):
                size = await self._put_base(lsn, base_ns)
                self._last_base_bytes = size
                self._catalog.bases.append(lsn)
                self._base_times[lsn] = base_ns
            self._chunk_bytes_since_base = 0
            self._counters["bases_uploaded"] += 1
            if fresh:
                self._needs_base = self._hold.needs_base = False
                self._shipped_record_bytes = self._record_bytes_offset + written_bytes
                await self._set_shipped(lsn, record_bytes=None)
            log.info("replica base uploaded", lsn=lsn, fresh=fresh, url=self._url)
        finally:
            self._base_from = None
            self._update_hold()

    async def _put_base(self, lsn: int, base_ns: int) -> int:
        path = formats.checkpoint_name(lsn)
        try:
            data = await trio.to_thread.run_sync(self._storage.read_file, path)
        except FileNotFoundError:
            raise LocalDamage(f"{path} was replaced before the base could read it") from None
        _, body = formats.decode_checkpoint(data, self._uuid, path)
        mapped = sorted(await trio.to_thread.run_sync(checkpoint_blocks, body))
        del body
        store = self._store
        await trio.to_thread.run_sync(store.put, rf.base_checkpoint_key(lsn), data)
        size = len(data)
        packs = []
        step = self._tuning.pack_blocks
        for number, start in enumerate(range(0, len(mapped), step)):
            blocks = await trio.to_thread.run_sync(self._read_base_blocks,
                                                   mapped[start : start + step])
            parts = rf.encode_pack(lsn, blocks)
            pack = b"".join(parts)
            await trio.to_thread.run_sync(store.put, rf.base_pack_key(lsn, number), pack)
            packs.append((formats.crc(pack), len(blocks)))
            size += len(pack)
        manifest = rf.encode_manifest(rf.Manifest(lsn, base_ns, formats.crc(data), len(mapped),
                                                  tuple(packs)), self._uuid)
        await trio.to_thread.run_sync(store.put, rf.base_manifest_key(lsn), manifest)
        self._counters["bytes_uploaded"] += size + len(manifest)
        return size

    def _read_base_blocks(self, mapped) -> list[tuple[int, int, bytes]]:
        found = []
        for pblk, checksum in mapped:
            data = self._blocks.read_run(pblk, 1)
            if formats.crc(data) != checksum:
                raise LocalDamage(f"data block {pblk} does not match its checksum "
                                  "(`razorfs fsck` names the file)")
            found.append((pblk, checksum, data))
        return found

    # ---- retention ----

    async def _prune(self) -> None:
        retention = self._tuning.retention_seconds
        self._next_prune = trio.current_time() + max(1.0, min(60.0, retention / 4))
        catalog = await trio.to_thread.run_sync(read_catalog, self._store)
        for lsn in catalog.bases:
            if lsn not in self._base_times:
                self._base_times[lsn] = await trio.to_thread.run_sync(
                    base_time, self._store, self._uuid, lsn)
        cutoff = time.time_ns() - int(retention * 1e9)
        keep = max((lsn for lsn in catalog.bases if self._base_times[lsn] <= cutoff),
                   default=None)
        if keep is None:
            return
        doomed = [name for lsn in catalog.bases if lsn < keep
                  for name in catalog.base_objects[lsn]]
        doomed += [rf.chunk_key(first, last) for first, last in catalog.chunks if last <= keep]
        if doomed:
            await trio.to_thread.run_sync(self._store.delete, doomed)
            self._counters["objects_pruned"] += len(doomed)
            log.info("replica pruned", objects=len(doomed), kept_from_lsn=keep)
        self._catalog = await trio.to_thread.run_sync(read_catalog, self._store)

    # ---- stats ----

    def _lag_bytes(self) -> int:
        if self._shipped >= self._status.durable_lsn:
            return 0
        return max(0, self._record_bytes_offset + self._status.durable_bytes
                   - self._shipped_record_bytes)

    def stats(self) -> dict:
        durable = self._status.durable_lsn
        caught_up = self._shipped >= durable and not self._needs_base
        oldest = next((ns for lsn, ns in self._timeline if lsn > self._shipped), None)
        lag_seconds = 0.0 if caught_up or oldest is None else (time.time_ns() - oldest) / 1e9
        return {
            "url": self._url, "state": self._state, "shipped_lsn": self._shipped,
            "durable_lsn": durable, "hold_lsn": None if self._hold.lsn == NO_HOLD else
            self._hold.lsn,
            "lag_lsns": 0 if caught_up else max(0, durable - self._shipped),
            "lag_bytes": 0 if caught_up else self._lag_bytes(),
            "lag_seconds": round(lag_seconds, 3),
            "needs_base": self._needs_base, "store_error": self._store_error,
            "refused": self._refused, **self._counters,
        }
