"""Recovery coordinator actor: recovers at mount, starts the other actors, drives checkpoints.

At start it runs recovery (``razorfs.state.recovery``) in a worker thread, rebuilds the
allocator's free map from the extent maps, starts allocator → WAL writer → tree manager and
hands back their ``Handles``. Then it checkpoints whenever enough log has accumulated, and once
more when its inbox is closed, before closing the others in turn.

A checkpoint is a snapshot of the tree as of LSN C, written once C is durable (so every block it
points to is durable too), atomically; then WAL segments older than the *previous* checkpoint are
deleted, so that if the newest checkpoint is ever found damaged, the previous one plus the log
still rebuild everything.
"""

from __future__ import annotations

import functools
import itertools

import structlog
import trio

from razorfs.actors import messages as m
from razorfs.actors.block_allocator import BlockAllocator, FreeSpace
from razorfs.actors.mailbox import Mailbox, dispatch, open_mailbox
from razorfs.actors.system import Handles, Tuning
from razorfs.actors.tree_manager import TreeManager
from razorfs.actors.wal_writer import WalStatus, WalWriter
from razorfs.errors import FsError
from razorfs.state.recovery import Recovered, recover
from razorfs.state.replica import ReplicaHold, forget_replica
from razorfs.storage.blockstore import BlockStore
from razorfs.storage.checkpoints import list_checkpoints, write_checkpoint
from razorfs.storage.interface import Storage

log = structlog.get_logger("razorfs.recovery")


class RecoveryCoordinator:
    """Recovers, starts allocator → WAL writer → tree manager, then drives checkpoints until its
    inbox is closed; then takes a final checkpoint and closes the others in turn."""

    def __init__(self, inbox: trio.MemoryReceiveChannel, storage: Storage,
                 tuning: Tuning = Tuning(), replica_hold: ReplicaHold | None = None) -> None:
        self._inbox = inbox
        self._storage = storage
        self._tuning = tuning
        self._replica_hold = replica_hold
        self._uuid = b""
        self._checkpoint_lsn = 0
        self.checkpoints_written = 0
        self.last_checkpoint_seconds = 0.0
        self._tree: Mailbox | None = None  # set once the others run
        self._blocks: BlockStore | None = None
        self._wal: Mailbox | None = None
        self._handlers = {
            m.Checkpoint: self._take_checkpoint,
            m.CheckpointStats: self._stats,
        }

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        hold = self._replica_hold
        recovered = await trio.to_thread.run_sync(functools.partial(
            recover, self._storage, defer_checkpoint=True,
            keep_log_after=hold.before_recovery(self._storage) if hold else None))
        self._uuid = recovered.superblock.uuid
        self._checkpoint_lsn = recovered.checkpoint_lsn
        # Blocks the replica still has to upload, which the recovered tree no longer maps.
        held = await trio.to_thread.run_sync(self._replica_blocks, recovered)
        blocks = self._blocks = BlockStore(self._storage)
        try:
            free = FreeSpace.from_used(itertools.chain(
                (p for p, *_ in recovered.state.used_blocks()), held), blocks.block_count())
            tree, tree_inbox = open_mailbox()
            wal, wal_inbox = open_mailbox()
            log_mailbox, log_inbox = open_mailbox()
            allocator, allocator_inbox = open_mailbox()
            status = WalStatus()
            # Built before the allocator starts: its constructor publishes the durable LSN,
            # which the allocator reads.
            wal_writer = WalWriter(
                wal_inbox, log_inbox, self._storage, self._uuid, blocks,
                next_lsn=recovered.last_lsn + 1, batch=recovered.last_batch,
                commit_interval=self._tuning.commit_interval, status=status,
                segment_bytes=self._tuning.segment_bytes, replica_hold=hold)
            async with trio.open_nursery() as nursery:
                await nursery.start(BlockAllocator(allocator_inbox, self._storage, free,
                                                   status, replica_hold=hold).run)
                if held:
                    await allocator.tell(m.FreeAfter(tuple(sorted(held)), recovered.last_lsn))
                await nursery.start(wal_writer.run)
                tree_manager = TreeManager(
                    tree_inbox, recovered.state, last_lsn=recovered.last_lsn, wal=wal.clone(),
                    log=log_mailbox, wal_status=status, allocator=allocator.clone())
                await nursery.start(tree_manager.run)
                task_status.started(Handles(tree.clone(), tree_manager.queries, wal.clone(),
                                            allocator.clone(), blocks, status, recovered))
                await allocator.aclose()
                self._tree, self._wal = tree, wal
                async with tree, wal:
                    await self._serve(checkpoint_now=recovered.checkpoint_due)
        finally:
            blocks.close()

    def _replica_blocks(self, recovered: Recovered) -> set[int]:
        if self._replica_hold is None:
            forget_replica(self._storage)
            return set()
        return self._replica_hold.after_recovery(
            self._storage, self._uuid, recovered.last_lsn,
            {pblk for pblk, *_ in recovered.state.used_blocks()})

    async def _serve(self, *, checkpoint_now: bool) -> None:
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
                    await dispatch(envelope, self._handlers, "recovery")
                if trio.current_time() < next_check:
                    continue
                next_check = trio.current_time() + self._tuning.checkpoint_poll
                status = await self._wal.ask(m.WalStats())
                grown = (status.bytes_since_trim >= self._tuning.checkpoint_bytes
                         or status.durable_lsn - self._checkpoint_lsn
                         >= self._tuning.checkpoint_records)
                if (checkpoint_now or grown) and not status.failed:
                    checkpoint_now = False
                    await self._checkpoint_or_failsafe()
        await self._checkpoint_or_failsafe()

    async def _take_checkpoint(self, message: m.Checkpoint) -> m.CheckpointTaken:
        return m.CheckpointTaken(await self._checkpoint())

    async def _stats(self, message: m.CheckpointStats) -> m.CheckpointCounts:
        return m.CheckpointCounts(self.checkpoints_written, self.last_checkpoint_seconds)

    async def _checkpoint_or_failsafe(self) -> None:
        try:
            await self._checkpoint()
        except FsError as exc:
            log.error("checkpoint skipped", reason=str(exc))
        except OSError as exc:
            log.error("checkpoint failed", reason=str(exc))
            await self._tree.tell(m.EnterFailsafe(f"checkpoint write failed: {exc}"))

    async def _checkpoint(self) -> int:
        tree, wal = self._tree, self._wal
        started = trio.current_time()
        capture, lsn = await tree.ask(m.BeginSnapshot())
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
                finished, data = await tree.ask(
                    m.SnapshotChunk(capture, self._tuning.checkpoint_chunk))
                parts.append(data)
                # Let the tasks whose replies the last step produced run before the tree
                # manager takes the next chunk: else one may wait for two chunks, not one.
                await trio.lowlevel.checkpoint()
        finally:
            if not finished:
                await _abort_capture(tree, capture)
        size = sum(map(len, parts))
        await wal.ask(m.WaitDurable(lsn))
        # Blocks whose bytes only the log carries (PutData) become durable on their own first:
        # the log behind this checkpoint may be trimmed once it is written.
        await trio.to_thread.run_sync(self._blocks.sync)
        # Written part by part: joining a big body would hold the GIL, so every request.
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
        except FsError as exc:
            log.info("checkpoint capture left to the tree manager", capture=capture,
                     reason=str(exc))
