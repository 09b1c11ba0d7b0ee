"""File handle generations: which mount gave out an inode number.

A file handle (name_to_handle_at, NFS) is an inode number and a generation; it must never reach
another file than the one it was made for. Numbers only grow while mounted, but a crash loses
the transactions not yet durable, and with them the numbers they gave out: the next mount gives
those numbers again, to other files. So every recovery starts a new *epoch* at the first number
it will give (``next_ino``), made durable before the mount serves, and an inode's generation is
the epoch its number falls in. A number given again after a crash falls in a later epoch than
the handle made for its lost first holder, which then answers ESTALE. Inodes that survived keep
their epoch: their numbers are below the recovered ``next_ino``. The root is generation 0
(the kernel gives its root inode no other), as is every inode made before epochs existed.

The table lives in the epochs file (``razorfs.storage.formats``): one entry per mount that made
inodes, since a mount that made none has its entry replaced by the next one's.
"""

from __future__ import annotations

from bisect import bisect_right

from razorfs.state.tree import ROOT_INO

EPOCH_MAX = (1 << 32) - 1  # the kernel keeps a 32-bit generation


class Generations:
    """The epoch table: ``of(ino)`` is the generation of inode ``ino``'s file handles."""

    def __init__(self, entries: list[tuple[int, int]] = ()) -> None:
        self.entries = list(entries)
        self._firsts = [first for first, _ in self.entries]
        # the current epoch's range: every inode made from now on, answered without a bisect
        self._last_first, self._last_epoch = self.entries[-1] if self.entries else (0, 0)

    def of(self, ino: int) -> int:
        if ino >= self._last_first:
            return self._last_epoch
        index = bisect_right(self._firsts, ino)
        return self.entries[index - 1][1] if index else 0

    def started_at(self, next_ino: int) -> Generations:
        """The table with a new epoch for the numbers from ``next_ino`` on. The last epoch is
        replaced when it starts there (its mount made no inode that survived)."""
        first = max(next_ino, ROOT_INO + 1)
        entries = list(self.entries)
        epoch = entries[-1][1] + 1 if entries else 1
        if entries and entries[-1][0] >= first:
            entries.pop()
        if epoch > EPOCH_MAX:
            raise OverflowError("no inode epoch left (2**32 mounts)")
        return Generations([*entries, (first, epoch)])

    @classmethod
    def after_damage(cls, now_s: int) -> Generations:
        """A table for a filesystem whose epochs were lost, or restored from a replica: one
        epoch for every existing inode (their old handles answer ESTALE, the safe way),
        numbered from the clock's seconds ``now_s``, so above every epoch a count of mounts
        gave before."""
        return cls([(ROOT_INO + 1, min(now_s, EPOCH_MAX - (1 << 24)))])
