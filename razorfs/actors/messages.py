"""What actors say to each other: the requests each actor takes, and the reply each one gets.

Every message is a record type (``razorfs.state.redo.record_type``): a named tuple with a unique
``TAG``, the msgpack array ``[TAG, field1, ...]`` on the wire, fields of msgpack-native values
only. Unlike the redo operations these tags are not on-disk format; they are grouped by the actor
that takes the message. A request answered with ``Failed`` is raised in the asker as
``FsError(errno)``; a request marked *tell* gets no reply.

Three things pass between actors without a message, each for a reason:

* ``TreeQueries`` (actors/tree_manager.py), the tree manager's read-only face, is called directly
  by the FUSE layer for lookups, getattrs, readdirs, xattr reads, block maps and fsync's sync
  point. Trio runs every task on one thread and switches only at an ``await``; these methods never
  await, so each sees every transaction wholly applied or not at all, as an ask would, without
  its two task switches and two encodings on the most frequent requests.
* ``WalStatus`` (actors/wal_writer.py) publishes the durable LSN and the log's failure, written
  only by the WAL writer: the tree manager reads it before each transaction, the allocator before
  each message (blocks freed by a durable transaction become reusable), the FUSE layer to skip a
  wait that is already over. A reply channel back from the WAL writer would make a cycle of
  mailboxes that could not be closed in order at shutdown.
* ``BlockStore`` (storage/blockstore.py): file data never travels in messages. The FUSE data path
  writes blocks from worker threads and commits their mapping with ``CommitWrite``; the WAL
  writer fsyncs the store before writing any record that points into it (ordered mode).
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgpack

from razorfs.state.redo import SchemaError, as_list, from_list, record_type
from razorfs.state.tree import Attr

# ---- to the tree manager ----


@record_type
class SetAttr:
    """Change attributes; None leaves a field as it is. ``tail`` (lblk, pblk, crc) replaces the
    new last block when a shrink ends inside a block (its bytes past the end zeroed).
    Reply: Changed."""

    TAG: ClassVar[int] = 50
    ino: int
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    tail: tuple | None = None


@record_type
class MakeNode:
    """Create a file, directory, symlink (``target``), fifo, socket or device. ``umask`` is the
    caller's: applied unless the parent has a default ACL. Reply: Changed."""

    TAG: ClassVar[int] = 51
    parent: int
    name: bytes
    mode: int
    rdev: int
    uid: int
    gid: int
    target: bytes = b""
    umask: int = 0


@record_type
class Remove:
    """unlink (``directory`` False) or rmdir (True). Reply: Committed."""

    TAG: ClassVar[int] = 52
    parent: int
    name: bytes
    directory: bool


@record_type
class Rename:
    """Reply: Committed (LSN 0 when nothing changed)."""

    TAG: ClassVar[int] = 53
    old_parent: int
    old_name: bytes
    new_parent: int
    new_name: bytes
    flags: int


@record_type
class Link:
    """Reply: Changed."""

    TAG: ClassVar[int] = 54
    ino: int
    new_parent: int
    new_name: bytes


@record_type
class SetXattr:
    """``keep_setgid``: the caller is in the file's group or privileged, so that an access ACL
    changing the mode leaves S_ISGID (posix_acl_update_mode). Reply: Committed."""

    TAG: ClassVar[int] = 55
    ino: int
    name: bytes
    value: bytes
    keep_setgid: bool = True


@record_type
class RemoveXattr:
    """Reply: Committed."""

    TAG: ClassVar[int] = 56
    ino: int
    name: bytes


@record_type
class CommitWrite:
    """Data already written to new blocks: map them and grow the size to offset + length.
    ``data``: the blocks' bytes, to be logged with the mapping (a small write someone is likely
    to fsync); empty: the block store's flush before the commit makes them durable.
    Reply: Changed."""

    TAG: ClassVar[int] = 57
    ino: int
    offset: int
    length: int
    blocks: tuple
    data: bytes = b""


@record_type
class Forget:
    """The kernel dropped references: ``pairs`` is a flat tuple (ino, count, ...). Tell."""

    TAG: ClassVar[int] = 58
    pairs: tuple


@record_type
class Accessed:
    """A file was read: move its atime by the relatime rule. Reply: Done (the reader waits
    only when relatime says the atime moves: rarely)."""

    TAG: ClassVar[int] = 59
    ino: int


@record_type
class EnterFailsafe:
    """Storage failed: refuse every change from now on (EROFS), keep serving reads. Tell."""

    TAG: ClassVar[int] = 60
    reason: str


@record_type
class TreeStats:
    """Reply: TreeStatus."""

    TAG: ClassVar[int] = 61


@record_type
class BeginSnapshot:
    """Start capturing the tree as of the last LSN applied (copy-on-write from now on; one
    capture at a time, a new one replaces any other). Reply: SnapshotStarted."""

    TAG: ClassVar[int] = 62


@record_type
class SnapshotChunk:
    """The next piece of capture ``capture``'s checkpoint body, about ``budget`` inode records
    of work. Reply: SnapshotPiece; the pieces concatenated are exactly the body."""

    TAG: ClassVar[int] = 63
    capture: int
    budget: int


@record_type
class AbortSnapshot:
    """Drop capture ``capture`` if it is still the running one. Reply: Done."""

    TAG: ClassVar[int] = 64
    capture: int


# ---- to the block allocator ----


@record_type
class Allocate:
    """Reply: Extents covering ``count`` blocks."""

    TAG: ClassVar[int] = 70
    count: int


@record_type
class Release:
    """Blocks allocated but never committed: free at once. Flat (start, length, ...). Tell."""

    TAG: ClassVar[int] = 71
    extents: tuple


@record_type
class FreeAfter:
    """Blocks unmapped by transaction ``lsn``: reusable once ``lsn`` is durable. Tell."""

    TAG: ClassVar[int] = 72
    blocks: tuple
    lsn: int


@record_type
class SpaceStats:
    """Reply: SpaceStatus."""

    TAG: ClassVar[int] = 73


# ---- to the WAL writer ----


@record_type
class Append:
    """One transaction's redo operations (already encoded), to be logged as record ``lsn``.
    Tell, into the WAL writer's log inbox, which wakes nobody: the writer takes what is there
    when it commits."""

    TAG: ClassVar[int] = 80
    lsn: int
    payload: bytes


@record_type
class WaitDurable:
    """Reply: Durable, once every record up to ``lsn`` is on stable storage."""

    TAG: ClassVar[int] = 81
    lsn: int


@record_type
class TrimLog:
    """Start a new segment and delete segments holding only records <= ``upto``. Reply: Done."""

    TAG: ClassVar[int] = 82
    upto: int


@record_type
class WalStats:
    """Reply: LogStatus."""

    TAG: ClassVar[int] = 83


@record_type
class TakeRecords:
    """The log inbox is full: take the records waiting in it now. Tell."""

    TAG: ClassVar[int] = 84


# ---- to the recovery coordinator ----


@record_type
class Checkpoint:
    """Take a checkpoint now. Reply: CheckpointTaken."""

    TAG: ClassVar[int] = 90


@record_type
class CheckpointStats:
    """Reply: CheckpointCounts."""

    TAG: ClassVar[int] = 91


# ---- to the replicator ----


@record_type
class ReplicaStats:
    """Reply: ReplicaStatus."""

    TAG: ClassVar[int] = 95


# ---- replies ----


@record_type
class Done:
    """A request with nothing to answer has been carried out."""

    TAG: ClassVar[int] = 100


@record_type
class Changed:
    """A transaction's result: the inode's attributes after it, and its commit ticket (the LSN
    to wait for to make it durable; 0 when nothing changed)."""

    TAG: ClassVar[int] = 101
    attr: Attr
    lsn: int


@record_type
class Committed:
    """A transaction's commit ticket (0 when nothing changed)."""

    TAG: ClassVar[int] = 102
    lsn: int


@record_type
class TreeStatus:
    TAG: ClassVar[int] = 103
    inodes: int
    last_lsn: int
    failsafe: str | None


@record_type
class Extents:
    """Flat (start, length, start, length, ...)."""

    TAG: ClassVar[int] = 104
    extents: tuple


@record_type
class SpaceStatus:
    """In blocks: in use (leased included), free inside the store, waiting for a durable free,
    and what the disk under the data directory can still add (its log reserve left out)."""

    TAG: ClassVar[int] = 105
    used: int
    free: int
    pending: int
    disk_free: int


@record_type
class Durable:
    TAG: ClassVar[int] = 106
    lsn: int


@record_type
class LogStatus:
    TAG: ClassVar[int] = 107
    durable_lsn: int
    batches: int
    records: int
    fsyncs: int
    bytes_since_trim: int
    failed: str | None


@record_type
class SnapshotStarted:
    TAG: ClassVar[int] = 108
    capture: int
    lsn: int


@record_type
class SnapshotPiece:
    TAG: ClassVar[int] = 109
    last: bool
    data: bytes


@record_type
class CheckpointTaken:
    TAG: ClassVar[int] = 110
    lsn: int


@record_type
class CheckpointCounts:
    TAG: ClassVar[int] = 111
    written: int
    last_seconds: float


@record_type
class ReplicaStatus:
    """The replicator's state and lag, as ``razorfs stats`` shows them under "replica"."""

    TAG: ClassVar[int] = 112
    values: dict


@record_type
class Failed:
    """The request could not be done: raised in the asker as ``FsError(errno)``."""

    TAG: ClassVar[int] = 120
    errno: int
    message: str


MESSAGES = (
    SetAttr, MakeNode, Remove, Rename, Link, SetXattr, RemoveXattr, CommitWrite, Forget,
    Accessed, EnterFailsafe, TreeStats, BeginSnapshot, SnapshotChunk, AbortSnapshot,
    Allocate, Release, FreeAfter, SpaceStats,
    Append, WaitDurable, TrimLog, WalStats, TakeRecords,
    Checkpoint, CheckpointStats, ReplicaStats,
    Done, Changed, Committed, TreeStatus, Extents, SpaceStatus, Durable, LogStatus,
    SnapshotStarted, SnapshotPiece, CheckpointTaken, CheckpointCounts, ReplicaStatus, Failed,
)
_BY_TAG = {cls.TAG: cls for cls in MESSAGES}
assert len(_BY_TAG) == len(MESSAGES), "duplicate message tag"


def encode(message) -> bytes:
    return msgpack.packb(as_list(message), use_bin_type=True)


def decode(data: bytes) -> Any:
    try:
        items = msgpack.unpackb(data, raw=False, use_list=False)
    except (msgpack.UnpackException, ValueError) as exc:
        raise SchemaError(f"undecodable message: {exc}") from None
    message = from_list(items, _BY_TAG)
    if type(message) is Changed:  # msgpack gives the nested record back as a plain tuple
        return Changed(Attr(*message.attr), message.lsn)
    return message
