"""An in-memory disk for tests that can lose power.

Model: every file object holds its ``current`` bytes (what reads see), its ``durable`` bytes
(what survives a power cut) and the operations made since its last ``fsync`` (``pending``: writes
and truncates, in order). Every directory likewise holds ``current`` and ``durable`` entries
(name -> file or directory) and the changes made to its entries since its last ``fsync_dir``
(``pending``); only ``fsync_dir`` of that very directory makes them durable. As on Linux,
fsyncing a file does not make its name durable: a new or renamed file needs ``fsync_dir`` of its
directory (of both directories, for a move between two).

``crash()`` returns the disk a power cut could leave: walk from the root through durable entries
and give every file its durable bytes. With ``keep_unsynced``, some unsynced work may also have
reached the disk, as much of it as POSIX leaves open and as meanly as ext4 may make it (the
assumptions razorfs makes of a disk are listed in ``interface``):

* Directory entries: each directory's pending changes land as any subset closed under "an
  earlier change to a same name": a change lands only if every earlier change to any name it
  touches landed too, so each name ends at one of the values it had, and a name never goes back
  to an older value once a newer one landed. A rename within one directory is one change, both
  halves or neither (rename(2) atomicity; one journal transaction on ext4); a move between two
  directories is a change in each, which land independently (the two directories are synced
  apart). A directory draws "none", "all" or "each change at even odds" with equal chance.
* File data: independently of its name (a new name may land with none, some or all of its
  data), each file gets a random subset of its pending operations, applied in order. With
  ``tear``, the last applied write is torn: whole, cut after a random 512-byte sector (a lost
  tail), or any subset of its sectors (a lost sector in the middle, or its head), one pattern
  each with equal chance; sectors are counted from the start of the file, and each holds all of
  its old or all of its new bytes. A torn write that extends the file may leave the new size
  with zeros where its sectors did not land.

A handle stays bound to its file object, not to its name, so a renamed or unlinked file remains
usable through a handle opened before, as with POSIX. ``fail_next`` and ``capacity`` (ENOSPC) let
tests reach the error paths. One lock guards all state, since callers run in worker threads.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from dataclasses import dataclass

from razorfs.storage.interface import IOCounters, SpaceInfo, Storage, StorageFile

SECTOR = 512
FAULT_OPS = frozenset(
    {"open", "pread", "pwrite", "truncate", "fsync", "fsync_dir", "rename", "unlink", "mkdir"}
)


def _error(code: int, path: str) -> OSError:
    # OSError picks the subclass from the errno (ENOENT -> FileNotFoundError), as os.* would.
    return OSError(code, os.strerror(code), path)


def _parts(path: str) -> list[str]:
    return [name for name in path.split("/") if name]


def _write(buf: bytearray, offset: int, data: bytes) -> None:
    if offset > len(buf):
        buf.extend(bytes(offset - len(buf)))  # a write past the end leaves a hole of zeros
    buf[offset : offset + len(data)] = data


def _truncate(buf: bytearray, size: int) -> None:
    if size < len(buf):
        del buf[size:]
    else:
        buf.extend(bytes(size - len(buf)))


class _File:
    def __init__(self, data: bytes = b"") -> None:
        self.current = bytearray(data)
        self.durable = bytes(data)
        # ("write", offset, data) or ("truncate", size, b""), oldest first
        self.pending: list[tuple[str, int, bytes]] = []

    def survivor(self, rng: random.Random | None, tear: bool) -> bytes:
        """The bytes a power cut leaves (with ``rng``: plus a random subset of pending ops)."""
        buf = bytearray(self.durable)
        if rng is None:
            return bytes(buf)
        # Each pending op reached the disk or not, independently; those that did kept their order.
        applied = [op for op in self.pending if rng.random() < 0.5]
        writes = [i for i, op in enumerate(applied) if op[0] == "write"]
        for i, (kind, arg, data) in enumerate(applied):
            if kind == "truncate":
                _truncate(buf, arg)
            elif tear and i == writes[-1]:
                _write_torn(buf, arg, data, rng)
            else:
                _write(buf, arg, data)
        return bytes(buf)


def _write_torn(buf: bytearray, offset: int, data: bytes, rng: random.Random) -> None:
    """Apply a write that a power cut interrupted (the patterns: see the module docstring)."""
    end = offset + len(data)
    bounds = [offset, *range((offset // SECTOR + 1) * SECTOR, end, SECTOR), end]
    sectors = list(zip(bounds, bounds[1:]))
    pattern = rng.choice(("whole", "tail lost", "any sectors"))
    if pattern == "whole":
        kept = sectors
    elif pattern == "tail lost":
        kept = sectors[: rng.randrange(len(sectors))]
    else:
        kept = [sector for sector in sectors if rng.random() < 0.5]
    if pattern != "whole" and end > len(buf) and rng.random() < 0.5:
        _truncate(buf, end)  # the new size landed, the missing sectors read as zeros
    for start, stop in kept:
        _write(buf, start, data[start - offset : stop - offset])


class _Dir:
    def __init__(self) -> None:
        self.current: dict[str, _File | _Dir] = {}
        self.durable: dict[str, _File | _Dir] = {}
        # each change: name -> new entry (None: removed); two names for a rename in here
        self.pending: list[dict[str, _File | _Dir | None]] = []

    def change(self, names: dict[str, _File | _Dir | None]) -> None:
        for name, node in names.items():
            if node is None:
                del self.current[name]
            else:
                self.current[name] = node
        self.pending.append(names)

    def sync(self) -> None:
        self.durable = dict(self.current)
        self.pending.clear()

    def survivor(self, rng: random.Random | None) -> dict[str, _File | _Dir]:
        """The entries a power cut leaves (with ``rng``: plus a closed subset of the changes)."""
        entries = dict(self.durable)
        if rng is None or not self.pending:
            return entries
        odds = rng.choice((0.0, 0.5, 1.0))
        blocked: set[str] = set()  # names whose next change cannot land
        for change in self.pending:
            if blocked.isdisjoint(change) and rng.random() < odds:
                for name, node in change.items():
                    if node is None:
                        entries.pop(name, None)
                    else:
                        entries[name] = node
            else:
                blocked.update(change)
        return entries


@dataclass
class _Fault:
    op: str
    errno_value: int
    remaining: int
    path_contains: str


class SimFile(StorageFile):
    def __init__(self, disk: SimDisk, node: _File, path: str) -> None:
        self._disk = disk
        self._node = node
        self._path = path  # the name at open time; only used to match fail_next rules
        self._closed = False

    def _check(self, op: str | None) -> None:
        if self._closed:
            raise _error(errno.EBADF, self._path)
        if op is not None:
            self._disk._maybe_fail(op, self._path)

    def pread(self, offset: int, length: int) -> bytes:
        with self._disk._lock:
            self._check("pread")
            if offset < 0 or length < 0:
                raise _error(errno.EINVAL, self._path)
            data = bytes(self._node.current[offset : offset + length])
        self._disk.counters.add(read=len(data))
        return data

    def pread_if_cached(self, offset: int, length: int) -> bytes | None:
        data = self.pread(offset, length)  # memory: always "cached"
        return data if len(data) == length else None

    def pwrite(self, offset: int, data: bytes) -> None:
        data = bytes(data)  # the caller may reuse its buffer; pending ops must not change
        with self._disk._lock:
            self._check("pwrite")
            if offset < 0:
                raise _error(errno.EINVAL, self._path)
            self._disk._reserve(self._node, offset + len(data), self._path)
            _write(self._node.current, offset, data)
            self._node.pending.append(("write", offset, data))
        self._disk.counters.add(written=len(data))

    def truncate(self, size: int) -> None:
        with self._disk._lock:
            self._check("truncate")
            if size < 0:
                raise _error(errno.EINVAL, self._path)
            self._disk._reserve(self._node, size, self._path)
            _truncate(self._node.current, size)
            self._node.pending.append(("truncate", size, b""))

    def fsync(self) -> None:
        with self._disk._lock:
            self._check("fsync")
            self._node.durable = bytes(self._node.current)
            self._node.pending.clear()
        self._disk.counters.add(fsyncs=1)

    def size(self) -> int:
        with self._disk._lock:
            self._check(None)
            return len(self._node.current)

    def close(self) -> None:
        self._closed = True


class SimDisk(Storage):
    def __init__(self, capacity: int = 1 << 40) -> None:
        self.capacity = capacity
        self.counters = IOCounters()
        self._lock = threading.Lock()
        self._root = _Dir()
        self._faults: list[_Fault] = []

    # -- fault injection and crash ---------------------------------------------------------------

    def fail_next(self, op: str, errno_value: int, count: int = 1, path_contains: str = "") -> None:
        """Make the next ``count`` calls of ``op`` on a matching path raise, doing nothing."""
        if op not in FAULT_OPS:
            raise ValueError(f"unknown op {op!r}; one of {sorted(FAULT_OPS)}")
        if count < 1:
            raise ValueError("count must be at least 1")
        with self._lock:
            self._faults.append(_Fault(op, errno_value, count, path_contains))

    def _maybe_fail(self, op: str, *paths: str) -> None:
        for fault in self._faults:
            if fault.op == op and any(fault.path_contains in p for p in paths):
                fault.remaining -= 1
                if not fault.remaining:
                    self._faults.remove(fault)
                raise OSError(fault.errno_value, os.strerror(fault.errno_value))

    def crash(
        self, rng: random.Random | None = None, *, keep_unsynced: bool = False, tear: bool = False
    ) -> SimDisk:
        """A new disk with what a power cut could leave (see the module docstring)."""
        if keep_unsynced and rng is None:
            raise ValueError("keep_unsynced needs an rng: what survives is drawn at random")
        chance = rng if keep_unsynced else None
        new = SimDisk(self.capacity)
        copies: dict[int, _File] = {}  # a file reachable under two names stays one (hard link)

        def copy_dir(node: _Dir, into: _Dir, ancestors: frozenset[int]) -> None:
            entries = node.survivor(chance)
            for name in sorted(entries):  # sorted: the rng draws must not depend on insertion order
                child = entries[name]
                if isinstance(child, _File):
                    if id(child) not in copies:
                        copies[id(child)] = _File(child.survivor(chance, tear))
                    into.current[name] = copies[id(child)]
                elif id(child) not in ancestors:  # mixing durable and current entries can loop
                    into.current[name] = sub = _Dir()
                    copy_dir(child, sub, ancestors | {id(child)})
            into.durable = dict(into.current)

        with self._lock:
            copy_dir(self._root, new._root, frozenset({id(self._root)}))
        return new

    # -- helpers (called with the lock held) -----------------------------------------------------

    def _lookup(self, path: str) -> _File | _Dir:
        node: _File | _Dir = self._root
        for name in _parts(path):
            if not isinstance(node, _Dir):
                raise _error(errno.ENOTDIR, path)
            if name not in node.current:
                raise _error(errno.ENOENT, path)
            node = node.current[name]
        return node

    def _parent(self, path: str) -> tuple[_Dir, str]:
        parts = _parts(path)
        if not parts:
            raise _error(errno.EINVAL, path)  # the root has no entry to create, move or remove
        parent = self._lookup("/".join(parts[:-1]))
        if not isinstance(parent, _Dir):
            raise _error(errno.ENOTDIR, path)
        return parent, parts[-1]

    def _used(self) -> int:
        seen: dict[int, int] = {}
        stack = [self._root]
        while stack:
            for child in stack.pop().current.values():
                if isinstance(child, _Dir):
                    stack.append(child)
                else:
                    seen[id(child)] = len(child.current)
        return sum(seen.values())

    def _reserve(self, node: _File, end: int, path: str) -> None:
        growth = end - len(node.current)
        if growth > 0 and self._used() + growth > self.capacity:
            raise _error(errno.ENOSPC, path)

    # -- Storage ---------------------------------------------------------------------------------

    def open(self, path: str, *, create: bool = False) -> StorageFile:
        with self._lock:
            self._maybe_fail("open", path)
            parent, name = self._parent(path)
            node = parent.current.get(name)
            if node is None:
                if not create:
                    raise _error(errno.ENOENT, path)
                node = _File()
                parent.change({name: node})
            if isinstance(node, _Dir):
                raise _error(errno.EISDIR, path)
            return SimFile(self, node, path)

    def exists(self, path: str) -> bool:
        with self._lock:
            try:
                self._lookup(path)
            except OSError:
                return False
            return True

    def listdir(self, path: str) -> list[str]:
        with self._lock:
            node = self._lookup(path)
            if not isinstance(node, _Dir):
                raise _error(errno.ENOTDIR, path)
            return sorted(node.current)

    def mkdir(self, path: str) -> None:
        with self._lock:
            self._maybe_fail("mkdir", path)
            parent, name = self._parent(path)
            node = parent.current.get(name)
            if isinstance(node, _File):
                raise _error(errno.EEXIST, path)
            if node is None:
                parent.change({name: _Dir()})

    def rename(self, src: str, dst: str) -> None:
        with self._lock:
            self._maybe_fail("rename", src, dst)
            src_parent, src_name = self._parent(src)
            dst_parent, dst_name = self._parent(dst)
            node = src_parent.current.get(src_name)
            if node is None:
                raise _error(errno.ENOENT, src)
            old = dst_parent.current.get(dst_name)
            if old is node:
                return
            if isinstance(node, _Dir):
                if isinstance(old, _File):
                    raise _error(errno.ENOTDIR, dst)
                if old is not None and old.current:
                    raise _error(errno.ENOTEMPTY, dst)
                if _contains(node, dst_parent):
                    raise _error(errno.EINVAL, dst)
            elif isinstance(old, _Dir):
                raise _error(errno.EISDIR, dst)
            if src_parent is dst_parent:
                src_parent.change({src_name: None, dst_name: node})
            else:
                src_parent.change({src_name: None})
                dst_parent.change({dst_name: node})

    def unlink(self, path: str) -> None:
        with self._lock:
            self._maybe_fail("unlink", path)
            parent, name = self._parent(path)
            node = parent.current.get(name)
            if node is None:
                raise _error(errno.ENOENT, path)
            if isinstance(node, _Dir):
                raise _error(errno.EISDIR, path)
            parent.change({name: None})

    def fsync_dir(self, path: str) -> None:
        with self._lock:
            self._maybe_fail("fsync_dir", path)
            node = self._lookup(path)
            if not isinstance(node, _Dir):
                raise _error(errno.ENOTDIR, path)
            node.sync()
        self.counters.add(fsyncs=1)

    def space(self) -> SpaceInfo:
        with self._lock:
            return SpaceInfo(total=self.capacity, available=max(0, self.capacity - self._used()))


def _contains(directory: _Dir, target: _Dir) -> bool:
    """Whether ``target`` is ``directory`` or below it (a directory cannot move into itself)."""
    if directory is target:
        return True
    return any(isinstance(c, _Dir) and _contains(c, target) for c in directory.current.values())
