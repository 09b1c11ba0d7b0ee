"""The block store: fixed-size, copy-on-write data blocks in one file (layout in ``formats``).

Stateless apart from the open file and two write generations: FUSE handlers call it from
worker threads; the WAL writer calls ``sync_ordered`` before each group commit (data before the
log records that point at it: ordered mode), which skips the fsync when every write since the
last one was *logged* (its bytes travel in the WAL record, ``PutData``); a checkpoint calls
``sync`` first, which covers those too, since the log that holds them may then be trimmed.
"""

from __future__ import annotations

import errno
import threading

from razorfs.storage.formats import BLOCK_SIZE, BLOCKS_PATH, block_crcs
from razorfs.storage.interface import SpaceInfo, Storage


class BlockStore:
    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._file = storage.open(BLOCKS_PATH, create=True)
        self._lock = threading.Lock()
        self._generation = 0  # every write
        self._ordered_generation = 0  # writes whose bytes only the block store holds
        self._synced_generation = 0
        self._synced_ordered_generation = 0

    def disk_space(self) -> SpaceInfo:
        return self._storage.space()

    def block_count(self) -> int:
        return self._file.size() // BLOCK_SIZE

    def write(self, extents: tuple, data: bytes | memoryview, *, logged: bool = False) -> list[int]:
        """Write ``data`` (whole blocks) into the flat (start, length, ...) extents; return the
        CRC of each block in order. ``logged``: the WAL record that maps them carries them too."""
        view = memoryview(data)
        position = 0
        for i in range(0, len(extents), 2):
            start, length = extents[i], extents[i + 1]
            size = length * BLOCK_SIZE
            self._file.pwrite(start * BLOCK_SIZE, view[position : position + size])
            position += size
        if position != len(view):
            raise ValueError("extents do not cover the data")
        with self._lock:
            # After the pwrite, not before: a commit that sees this generation must cover it.
            self._generation += 1
            if not logged:
                self._ordered_generation += 1
        return block_crcs(view)

    def read_run(self, first_pblk: int, count: int) -> bytes:
        data = self._file.pread(first_pblk * BLOCK_SIZE, count * BLOCK_SIZE)
        if len(data) != count * BLOCK_SIZE:
            raise OSError(errno.EIO, f"block store short read at block {first_pblk}")
        return data

    def read_run_if_cached(self, first_pblk: int, count: int) -> bytes | bytearray | None:
        """``read_run`` if the blocks are all in the page cache (no waiting), else None."""
        return self._file.pread_if_cached(first_pblk * BLOCK_SIZE, count * BLOCK_SIZE)

    def sync(self) -> bool:
        """fsync the store if anything was written since the last sync; True if it did."""
        with self._lock:
            generation, ordered = self._generation, self._ordered_generation
        if generation == self._synced_generation:
            return False
        self._file.fsync()
        self._synced_generation, self._synced_ordered_generation = generation, ordered
        return True

    def sync_ordered(self) -> bool:
        """fsync the store if a write the log does not carry came since the last sync; True if
        it did."""
        with self._lock:
            generation, ordered = self._generation, self._ordered_generation
        if ordered == self._synced_ordered_generation:
            return False
        self._file.fsync()
        self._synced_generation, self._synced_ordered_generation = generation, ordered
        return True

    def close(self) -> None:
        self._file.close()

