"""Recovery coordinator: at mount, rebuild the state and start the other actors; later, checkpoints.

Recovery = newest valid checkpoint + redo of every WAL record after it (no undo is ever needed:
uncommitted changes never reach the disk's committed state, and data blocks are copy-on-write).
A torn tail is cut off; damage anywhere else refuses the mount with a message naming file and
offset. Orphans (inodes unlinked while open when the crash came) are reclaimed and the allocator's
free map is rebuilt from the extent maps. A checkpoint of the replayed state, so that nothing is
replayed twice, is taken by the coordinator right after start-up through the chunked path, while
requests are served (a crash before it completes replays the same records again: redo is
idempotent); the rare recoveries that change the state beyond the log (orphans reclaimed, a
damaged checkpoint set aside, no log at all) still checkpoint before the mount.

Checkpoints keep the log bounded: a snapshot of the tree as of LSN C is written once C is durable
(so every block it points to is durable too), atomically; then WAL segments older than the
*previous* checkpoint are deleted, so that if the newest checkpoint is ever found damaged, the
previous one plus the log still rebuild everything.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import structlog
import trio

from razorfs.actors import messages as m
from razorfs.actors.block_allocator import BlockAllocator, FreeSpace
from razorfs.actors.mailbox import Mailbox, handle_envelope, open_mailbox
from razorfs.actors.tree_manager import TreeManager, TreeQueries
from razorfs.actors.wal_writer import WalStatus, WalWriter
from razorfs.errors import FsError
from razorfs.storage import formats
from razorfs.storage.blockstore import BlockStore
from razorfs.storage.formats import FormatError, Superblock
from razorfs.storage.interface import Storage
from razorfs.storage.wal import LogEnd, delete_segments_upto, list_segments, scan_log
from razorfs.tree import TreeState, collector_paused

log = structlog.get_logger("razorfs.recovery")

CHECKPOINTS_KEPT = 2
REPLAY_PROGRESS_EVERY = 100_000


@dataclass
class Recovered:
    superblock: Superblock
    state: TreeState
    checkpoint_lsn: int
    last_lsn: int
    last_batch: int
    replayed: int
    orphans: int
    log_end: LogEnd | None
    discarded: int
    skipped_checkpoints: list[str]  # why each damaged checkpoint was passed over
    damaged_checkpoints: list[str]  # their paths
    seconds: dict[str, float]  # where the time went: checkpoint load, log scan, replay
    checkpoint_due: bool = False  # replayed records no checkpoint holds yet (``recover``)


def read_superblock(storage: Storage) -> Superblock:
    if not storage.exists(formats.SUPERBLOCK_PATH):
        raise FormatError("not a razorfs data directory (no superblock; run `razorfs mkfs`)")
    return Superblock.decode(storage.read_file(formats.SUPERBLOCK_PATH))


def list_checkpoints(storage: Storage) -> list[tuple[int, str]]:
    found = []
    for name in storage.listdir(formats.CHECKPOINT_DIR):
        lsn = formats.parse_lsn_name(name, ".ckpt")
        if lsn is not None:
            found.append((lsn, f"{formats.CHECKPOINT_DIR}/{name}"))
    return sorted(found)


def load(storage: Storage, *, salvage: bool = False) -> Recovered:
    """Rebuild the state from disk without changing anything (recovery and fsck share this).
    ``salvage``: a damaged log ends at the damage instead of refusing (fsck --repair)."""
    with collector_paused():
        return _load(storage, salvage=salvage)


def _load(storage: Storage, *, salvage: bool) -> Recovered:
    superblock = read_superblock(storage)
    skipped, damaged = [], []
    started = time.perf_counter()
    for lsn, path in reversed(list_checkpoints(storage)):
        try:
            checkpoint_lsn, body = formats.decode_checkpoint(
                storage.read_file(path), superblock.uuid, path)
            state = TreeState.from_snapshot(body)
            break
        except (FormatError, ValueError) as exc:
            skipped.append(str(exc))
            damaged.append(path)
    else:
        raise FormatError("no valid checkpoint" + (": " + "; ".join(skipped) if skipped else ""))
    loaded = time.perf_counter()
    scan = scan_log(storage, superblock.uuid, checkpoint_lsn, salvage=salvage)
    scanned = time.perf_counter()
    records, decode, apply = scan.records, m.decode_ops, state.apply
    for start in range(0, len(records), REPLAY_PROGRESS_EVERY):
        if start:
            log.info("replaying WAL", replayed=start, total=len(records))
        # One try per slice, not per record: the loop body is most of a replay's time.
        try:
            for record in records[start : start + REPLAY_PROGRESS_EVERY]:
                for op in decode(record.payload):
                    apply(op)
        except Exception as exc:
            raise FormatError(
                f"WAL record LSN {record.lsn} at offset {record.offset} cannot be replayed: {exc}"
            ) from None
    orphans = [inode for inode in state.inodes.values() if inode.nlink == 0]
    for inode in orphans:
        state.apply(m.DropInode(inode.ino))
    seconds = {"checkpoint": loaded - started, "scan": scanned - loaded,
               "replay": time.perf_counter() - scanned}
    return Recovered(superblock, state, checkpoint_lsn,
                     scan.last_lsn or checkpoint_lsn, scan.last_batch,
                     len(scan.records), len(orphans), scan.end, scan.discarded, skipped, damaged,
                     {name: round(value, 3) for name, value in seconds.items()})


def recover(storage: Storage, *, salvage: bool = False,
            defer_checkpoint: bool = False) -> Recovered:
    """``load``, then make the disk agree: cut a torn tail and checkpoint the recovered state.

    ``defer_checkpoint`` (the coordinator at mount): when replayed records are all the
    checkpoint would add, write none and set ``checkpoint_due`` instead. At a million records
    serialising and writing the state took seconds before the mount could answer; the
    coordinator takes the same checkpoint through the chunked path once requests are served."""
    recovered = load(storage, salvage=salvage)
    if recovered.discarded:
        log.warning("salvaged a damaged WAL: committed records after the damage discarded",
                    discarded=recovered.discarded, at=recovered.log_end.reason)
    for reason in recovered.skipped_checkpoints:
        log.warning("skipped damaged checkpoint, used an older one", reason=reason)
    for path in recovered.damaged_checkpoints:
        # Kept for inspection, but out of the rotation: otherwise it would count as one of the
        # two checkpoints kept and push the older, valid one out.
        storage.rename(path, path + ".damaged")
    if recovered.damaged_checkpoints:
        storage.fsync_dir(formats.CHECKPOINT_DIR)
    end = recovered.log_end
    if end is not None and end.reason is not None:
        _cut_tail(storage, end)
    # Orphans reclaimed and a checkpoint set aside are changes the log does not hold; with no
    # log at all, the new one must start after a checkpoint.
    beyond_log = bool(recovered.orphans or end is None or recovered.damaged_checkpoints)
    if recovered.replayed and defer_checkpoint and not beyond_log:
        recovered.checkpoint_due = True
    elif recovered.replayed or beyond_log:
        write_checkpoint(storage, recovered.superblock.uuid, recovered.last_lsn,
                         recovered.state.to_snapshot())
        # As after any checkpoint: keep the log back to the previous checkpoint only (else
        # every crash would leave one more segment behind).
        checkpoints = list_checkpoints(storage)
        if len(checkpoints) >= 2:
            delete_segments_upto(storage, checkpoints[-2][0])
    log.info("recovered", checkpoint_lsn=recovered.checkpoint_lsn, replayed=recovered.replayed,
             last_lsn=recovered.last_lsn, orphans_reclaimed=recovered.orphans,
             inodes=len(recovered.state.inodes), seconds=recovered.seconds,
             checkpoint_due=recovered.checkpoint_due,
             torn_tail=end.reason if end is not None else None)
    return recovered


def _cut_tail(storage: Storage, end: LogEnd) -> None:
    """Remove everything from the end of the valid log on, so that a later scan never meets
    these bytes again (a new segment starts at the next LSN)."""
    log.warning("cutting torn WAL tail", segment=end.segment, offset=end.offset,
                reason=end.reason)
    cut_first = formats.parse_lsn_name(end.segment.rpartition("/")[2], ".wal")
    for first_lsn, path in _segments_from(storage, cut_first):
        if path == end.segment and end.offset > 0:
            with storage.open(path) as segment:
                segment.truncate(end.offset)
                segment.fsync()
        else:
            storage.unlink(path)
    storage.fsync_dir(formats.WAL_DIR)


def _segments_from(storage: Storage, first: int):
    return [(lsn, path) for lsn, path in list_segments(storage) if lsn >= first]


def write_checkpoint(storage: Storage, uuid: bytes, lsn: int, body: bytes | list[bytes]) -> None:
    """``body``: the checkpoint body, or the list of its parts (written without joining them:
    at a million inodes, copying ~110 MB held the GIL, and so every request, for ~100 ms)."""
    parts = [body] if isinstance(body, bytes) else body
    storage.write_file_atomically(formats.checkpoint_name(lsn),
                                  [formats.checkpoint_header(lsn, uuid, parts), *parts])
    checkpoints = list_checkpoints(storage)
    stale = checkpoints[:-CHECKPOINTS_KEPT]
    for _, path in stale:
        storage.unlink(path)
    if stale:
        storage.fsync_dir(formats.CHECKPOINT_DIR)


@dataclass
class Handles:
    """What the FUSE layer talks to once the filesystem is up."""

    tree: Mailbox
    queries: TreeQueries  # the tree manager's read-only face, called directly
    wal: Mailbox
    allocator: Mailbox
    blocks: BlockStore
    wal_status: WalStatus
    recovered: Recovered


@dataclass(frozen=True)
class Tuning:
    commit_interval: float = 1.0
    checkpoint_bytes: int = 64 << 20
    # Records logged since the newest checkpoint that trigger the next one. This bounds what a
    # crash leaves to replay, so the mount after it: scanning and replaying 275,000 small
    # records took 1.2-2.1 s on top of loading a 1M-inode checkpoint, 870,000 (64 MiB, the byte
    # trigger alone) 3.6-3.8 s (bench/crash_mount.py, docs/PERFORMANCE.md).
    checkpoint_records: int = 250_000
    checkpoint_poll: float = 2.0
    segment_bytes: int = WalWriter.SEGMENT_BYTES
    # work per SnapshotChunk ask, in inode records (a few ms): the tree manager serves other
    # requests between two chunks, so this bounds how long a checkpoint holds any of them up
    checkpoint_chunk: int = 2000


class RecoveryCoordinator:
    """Recovers, starts allocator → WAL writer → tree manager, then drives checkpoints until its
    inbox is closed; then takes a final checkpoint and closes the others in turn."""

    def __init__(self, inbox: trio.MemoryReceiveChannel, storage: Storage,
                 tuning: Tuning = Tuning()) -> None:
        self._inbox = inbox
        self._storage = storage
        self._tuning = tuning
        self._uuid = b""
        self._checkpoint_lsn = 0
        self.checkpoints_written = 0
        self.last_checkpoint_seconds = 0.0

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        recovered = await trio.to_thread.run_sync(
            functools.partial(recover, self._storage, defer_checkpoint=True))
        self._uuid = recovered.superblock.uuid
        self._checkpoint_lsn = recovered.checkpoint_lsn
        blocks = BlockStore(self._storage)
        try:
            free = FreeSpace.from_used((p for p, *_ in recovered.state.used_blocks()),
                                       blocks.block_count())
            tree, tree_inbox = open_mailbox()
            wal, wal_inbox = open_mailbox()
            allocator, allocator_inbox = open_mailbox()
            status = WalStatus()
            # Built before the allocator starts: its constructor publishes the durable LSN,
            # which the allocator reads.
            wal_writer = WalWriter(
                wal_inbox, self._storage, self._uuid, blocks,
                next_lsn=recovered.last_lsn + 1, batch=recovered.last_batch,
                commit_interval=self._tuning.commit_interval, status=status,
                segment_bytes=self._tuning.segment_bytes)
            async with trio.open_nursery() as nursery:
                await nursery.start(BlockAllocator(allocator_inbox, self._storage, free,
                                                   status).run)
                await nursery.start(wal_writer.run)
                tree_manager = TreeManager(
                    tree_inbox, recovered.state, last_lsn=recovered.last_lsn, wal=wal.clone(),
                    wal_status=status, allocator=allocator.clone())
                await nursery.start(tree_manager.run)
                task_status.started(Handles(tree.clone(), tree_manager.queries, wal.clone(),
                                            allocator.clone(), blocks, status, recovered))
                await allocator.aclose()
                async with tree, wal:
                    await self._serve(tree, wal, checkpoint_now=recovered.checkpoint_due)
        finally:
            blocks.close()

    async def _serve(self, tree: Mailbox, wal: Mailbox, *, checkpoint_now: bool) -> None:
        """Serve the inbox; checkpoint when the log has grown enough, and at once if
        ``checkpoint_now`` (recovery replayed records and left their checkpoint to us)."""
        async with self._inbox:
            # A deadline, not a quiet period: a monitor asking for stats more often than the
            # poll period would otherwise hold off checkpoints for as long as it kept asking.
            next_check = trio.current_time() + (0 if checkpoint_now
                                                else self._tuning.checkpoint_poll)
            while True:
                envelope = None
                with trio.move_on_at(next_check):
                    try:
                        envelope = await self._inbox.receive()
                    except trio.EndOfChannel:
                        break
                if envelope is not None:
                    await handle_envelope(envelope, lambda msg: self._handle(msg, tree, wal),
                                          "recovery")
                if trio.current_time() < next_check:
                    continue
                next_check = trio.current_time() + self._tuning.checkpoint_poll
                durable_lsn, _, _, _, log_bytes, failed = (await wal.ask(m.WalStats())).value
                grown = (log_bytes >= self._tuning.checkpoint_bytes or durable_lsn
                         - self._checkpoint_lsn >= self._tuning.checkpoint_records)
                if (checkpoint_now or grown) and not failed:
                    checkpoint_now = False
                    await self._checkpoint_or_failsafe(tree, wal)
        await self._checkpoint_or_failsafe(tree, wal)

    async def _handle(self, message, tree: Mailbox, wal: Mailbox):
        if isinstance(message, m.Checkpoint):
            return await self._checkpoint(tree, wal)
        if isinstance(message, m.CheckpointStats):
            return (self.checkpoints_written, self.last_checkpoint_seconds)
        raise TypeError(f"recovery coordinator does not handle {type(message).__name__}")

    async def _checkpoint_or_failsafe(self, tree: Mailbox, wal: Mailbox) -> None:
        try:
            await self._checkpoint(tree, wal)
        except FsError as exc:
            log.error("checkpoint skipped", reason=str(exc))
        except OSError as exc:
            log.error("checkpoint failed", reason=str(exc))
            await tree.tell(m.EnterFailsafe(f"checkpoint write failed: {exc}"))

    async def _checkpoint(self, tree: Mailbox, wal: Mailbox) -> int:
        started = trio.current_time()
        capture, lsn = (await tree.ask(m.BeginSnapshot())).value
        finished = False
        try:
            existing = [c for c, _ in
                        await trio.to_thread.run_sync(list_checkpoints, self._storage)]
            if existing and existing[-1] == lsn:
                self._checkpoint_lsn = lsn
                return lsn  # nothing changed since the newest checkpoint
            # One chunk per ask: requests queued meanwhile are served between two chunks.
            parts = []
            while not finished:
                finished, data = (await tree.ask(
                    m.SnapshotChunk(capture, self._tuning.checkpoint_chunk))).value
                parts.append(data)
                # Let the tasks whose replies the last step produced run before the tree
                # manager takes the next chunk: else one may wait for two chunks, not one.
                await trio.lowlevel.checkpoint()
        finally:
            if not finished:
                await _abort_capture(tree, capture)
        size = sum(map(len, parts))
        await wal.ask(m.WaitDurable(lsn))
        # Written part by part: joining a big body would hold the GIL, so every request, for
        # as long as the copy takes.
        await trio.to_thread.run_sync(write_checkpoint, self._storage, self._uuid, lsn, parts)
        # Keep the log back to the previous checkpoint: the fallback if this one is damaged.
        await wal.ask(m.TrimLog(existing[-1] if existing else lsn))
        self._checkpoint_lsn = lsn
        self.checkpoints_written += 1
        self.last_checkpoint_seconds = trio.current_time() - started
        log.info("checkpoint", lsn=lsn, bytes=size, chunks=len(parts),
                 seconds=round(self.last_checkpoint_seconds, 4))
        return lsn


async def _abort_capture(tree: Mailbox, capture: int) -> None:
    """Have the tree manager drop a capture this coordinator abandons (nothing to write, an
    error, cancellation), so that apply stops copying for it; best effort: the tree manager
    may be gone already (then so is the capture)."""
    with trio.CancelScope(shield=True), trio.move_on_after(5):
        try:
            await tree.ask(m.AbortSnapshot(capture))
        except FsError:
            pass
