"""Recovery: rebuild the tree from the newest valid checkpoint plus every WAL record after it.

No undo is ever needed: uncommitted changes never reach the disk's committed state, and data
blocks are copy-on-write. A torn tail is cut off; damage anywhere else refuses the mount with a
message naming file and offset. Orphans (inodes unlinked while open when the crash came) are
reclaimed. ``load`` changes nothing on disk (fsck shares it); ``recover`` then makes the disk
agree. The daemon runs this through the recovery coordinator actor, offline tools directly.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import structlog

from razorfs.state import redo, snapshot
from razorfs.state.generations import Generations
from razorfs.state.tree import TreeState, collector_paused
from razorfs.storage import formats
from razorfs.storage.checkpoints import (
    CHECKPOINTS_KEPT, list_checkpoints, read_checkpoint, read_epochs, read_superblock,
    write_checkpoint, write_epochs)
from razorfs.storage.formats import BLOCK_SIZE, FormatError, Superblock
from razorfs.storage.interface import Storage
from razorfs.storage.wal import LogEnd, delete_segments_upto, list_segments, scan_log

log = structlog.get_logger("razorfs.recovery")

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
    # file handle generations; ``recover`` starts a new epoch for the numbers it will give
    generations: Generations = field(default_factory=Generations)
    epochs_damage: str | None = None  # why the epochs file could not be read
    # pblk -> bytes of the blocks the replayed log carries itself (PutData) and the state still
    # maps: the block store may have lost them; ``recover`` writes them back
    logged_blocks: dict[int, bytes] = field(default_factory=dict)


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
            checkpoint_lsn, body = read_checkpoint(storage, path, superblock.uuid)
            state = snapshot.decode(body)
            break
        except (FormatError, ValueError) as exc:
            skipped.append(str(exc))
            damaged.append(path)
    else:
        raise FormatError("no valid checkpoint" + (": " + "; ".join(skipped) if skipped else ""))
    loaded = time.perf_counter()
    scan = scan_log(storage, superblock.uuid, checkpoint_lsn, salvage=salvage)
    scanned = time.perf_counter()
    records, decode, apply = scan.records, redo.decode_ops, state.apply
    logged: dict[int, tuple] = {}  # pblk -> (ino, lblk, crc, bytes) of the last PutData of it
    put_data, put_blocks = redo.PutData, redo.PutBlocks
    for start in range(0, len(records), REPLAY_PROGRESS_EVERY):
        if start:
            log.info("replaying WAL", replayed=start, total=len(records))
        # One try per slice, not per record: the loop body is most of a replay's time.
        try:
            for record in records[start : start + REPLAY_PROGRESS_EVERY]:
                for op in decode(record.payload):
                    apply(op)
                    kind = type(op)
                    if kind is put_data:
                        _note_logged(logged, op)
                    elif kind is put_blocks and logged:
                        for pblk in op.blocks[1::3]:  # a later mapping not logged: on disk
                            logged.pop(pblk, None)
        except Exception as exc:
            raise FormatError(
                f"WAL record LSN {record.lsn} at offset {record.offset} cannot be replayed: {exc}"
            ) from None
    try:
        generations, epochs_damage = Generations(read_epochs(storage, superblock.uuid)), None
    except FormatError as exc:
        generations, epochs_damage = Generations(), str(exc)
    orphans = [inode for inode in state.inodes.values() if inode.nlink == 0]
    for inode in orphans:
        state.apply(redo.DropInode(inode.ino))
    seconds = {"checkpoint": loaded - started, "scan": scanned - loaded,
               "replay": time.perf_counter() - scanned}
    return Recovered(superblock, state, checkpoint_lsn,
                     scan.last_lsn or checkpoint_lsn, scan.last_batch,
                     len(scan.records), len(orphans), scan.end, scan.discarded, skipped, damaged,
                     {name: round(value, 3) for name, value in seconds.items()},
                     generations=generations, epochs_damage=epochs_damage,
                     logged_blocks=_still_mapped(state, logged))


def _note_logged(logged: dict, op: redo.PutData) -> None:
    flat, data = op.blocks, op.data
    for i in range(0, len(flat), 3):
        start = i // 3 * BLOCK_SIZE
        logged[flat[i + 1]] = (op.ino, flat[i], flat[i + 2], data[start : start + BLOCK_SIZE])


def _still_mapped(state: TreeState, logged: dict) -> dict[int, bytes]:
    """The logged blocks the state maps where their PutData put them, by physical block."""
    kept = {}
    for pblk, (ino, lblk, crc, data) in logged.items():
        inode = state.inodes.get(ino)
        if inode is not None and inode.blocks and inode.blocks.get(lblk) == (pblk << 32) | crc:
            kept[pblk] = data
    return kept


def _write_logged_blocks(storage: Storage, blocks: dict[int, bytes]) -> None:
    """Put back the blocks only the log carried, durably, before anything relies on them."""
    with storage.open(formats.BLOCKS_PATH, create=True) as store:
        for pblk in sorted(blocks):
            store.pwrite(pblk * BLOCK_SIZE, blocks[pblk])
        store.fsync()


def recover(storage: Storage, *, salvage: bool = False, defer_checkpoint: bool = False,
            keep_log_after: int | None = None) -> Recovered:
    """``load``, then make the disk agree: cut a torn tail and checkpoint the recovered state.

    ``defer_checkpoint`` (the coordinator at mount): when replayed records are all the
    checkpoint would add, write none and set ``checkpoint_due`` instead, so that serialising a
    big state does not hold up the mount; the coordinator takes the same checkpoint through the
    chunked path once requests are served (a crash before then replays the same records).
    ``keep_log_after``: the replica's shipped LSN; no record after it is trimmed."""
    recovered = load(storage, salvage=salvage)
    if recovered.superblock.version != formats.FORMAT_VERSION:
        # before the daemon writes anything of the newer version (formats.FORMAT_VERSION)
        upgraded = dataclasses.replace(recovered.superblock, version=formats.FORMAT_VERSION)
        storage.write_file_atomically(formats.SUPERBLOCK_PATH, upgraded.encode())
        log.info("data directory upgraded", version=formats.FORMAT_VERSION,
                 was=recovered.superblock.version)
        recovered.superblock = upgraded
    if recovered.logged_blocks:
        _write_logged_blocks(storage, recovered.logged_blocks)
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
                         snapshot.encode(recovered.state))
        # As after any checkpoint: keep the log back to the previous checkpoint only (else
        # every crash would leave one more segment behind).
        checkpoints = list_checkpoints(storage)
        if len(checkpoints) >= CHECKPOINTS_KEPT:
            upto = checkpoints[-CHECKPOINTS_KEPT][0]
            delete_segments_upto(storage, upto if keep_log_after is None
                                 else min(upto, keep_log_after))
    _start_epoch(storage, recovered)
    log.info("recovered", checkpoint_lsn=recovered.checkpoint_lsn, replayed=recovered.replayed,
             last_lsn=recovered.last_lsn, orphans_reclaimed=recovered.orphans,
             inodes=len(recovered.state.inodes), seconds=recovered.seconds,
             checkpoint_due=recovered.checkpoint_due,
             torn_tail=end.reason if end is not None else None)
    return recovered


def _start_epoch(storage: Storage, recovered: Recovered) -> None:
    """Make a new inode epoch durable before any inode number is given (``generations``)."""
    generations = recovered.generations
    if recovered.epochs_damage is not None:
        log.warning("epochs file damaged: file handles made before now answer ESTALE",
                    reason=recovered.epochs_damage)
        generations = Generations.after_damage(time.time_ns() // 10**9)
    recovered.generations = generations.started_at(recovered.state.next_ino)
    write_epochs(storage, recovered.superblock.uuid, recovered.generations.entries)


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
