"""The actors as one system: what the FUSE layer holds once they run, and their tuning.

The recovery coordinator builds and starts the others (allocator → WAL writer → tree manager)
and hands ``Handles`` to whoever started it (the daemon, or a test harness).
"""

from __future__ import annotations

from dataclasses import dataclass

from razorfs.actors.mailbox import Mailbox
from razorfs.actors.tree_manager import TreeQueries
from razorfs.actors.wal_writer import WalStatus, WalWriter
from razorfs.state.recovery import Recovered
from razorfs.storage.blockstore import BlockStore


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
    # Records logged since the newest checkpoint that trigger the next one: bounds what a crash
    # leaves to replay, so the mount after it (docs/PERFORMANCE.md, bench/crash_mount.py).
    checkpoint_records: int = 250_000
    checkpoint_poll: float = 2.0
    segment_bytes: int = WalWriter.SEGMENT_BYTES
    # work per SnapshotChunk ask, in inode records (a few ms): the tree manager serves other
    # requests between two chunks, so this bounds how long a checkpoint holds any of them up
    checkpoint_chunk: int = 2000
