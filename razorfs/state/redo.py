"""The redo-operation schema: what a WAL record holds, and what a transaction changes.

A redo operation is a decision already taken (the inode number chosen, the timestamps read, the
blocks mapped), so replaying it needs no clock and no allocator: ``TreeState.apply`` gives the same
state during live operation and during recovery. A transaction's operations are one WAL record's
payload, the msgpack array ``[[TAG, field1, ...], ...]``; fields are msgpack-native values only
(int, bytes, bool, None, tuples). Tags 1-49 are on-disk format: never renumber them.

``record_type`` is also how the actors declare their messages (razorfs/actors/messages.py), so
that what is logged is built exactly like what is said.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any, ClassVar

import msgpack


class SchemaError(ValueError):
    """Bytes that are not a record of this schema."""


def record_type(cls):
    """The record type ``cls`` declares: a named tuple of its annotated fields (defaults
    allowed), with its ``TAG`` and docstring. Immutable like a frozen dataclass, and built at C
    speed: every request and every replayed WAL record builds several."""
    namespace = dict(vars(cls))
    annotations = namespace.get("__annotations__", {})
    names = [name for name, kind in annotations.items() if not str(kind).startswith("ClassVar")]
    defaults = [namespace.pop(name) for name in names if name in namespace]
    for name in ("__dict__", "__weakref__"):
        namespace.pop(name, None)
    namespace["__slots__"] = ()
    base = namedtuple(cls.__name__, names, defaults=defaults, module=cls.__module__)
    return type(cls.__name__, (base,), namespace)


def as_list(record) -> list:
    """The wire form of a record: ``[TAG, field1, field2, ...]``."""
    return [record.TAG, *record]


def from_list(items, by_tag: dict[int, type]) -> Any:
    """The record of type ``by_tag[items[0]]`` that ``items`` (its wire form) holds."""
    if not isinstance(items, (list, tuple)) or not items:
        raise SchemaError(f"not a tagged record: {items!r:.80}")
    tag = items[0]
    cls = by_tag.get(tag) if type(tag) is int else None
    if cls is None:
        raise SchemaError(f"unknown record tag {items[0]!r}")
    try:
        return cls(*items[1:])
    except TypeError as exc:
        raise SchemaError(f"bad fields for {cls.__name__}: {exc}") from None


@record_type
class PutInode:
    """Create or overwrite an inode's attributes."""

    TAG: ClassVar[int] = 1
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


@record_type
class DropInode:
    """Forget an inode whose last link and last kernel reference are gone; frees its blocks."""

    TAG: ClassVar[int] = 2
    ino: int


@record_type
class PutEntry:
    """Add or replace the name ``name`` in directory ``parent``, pointing at ``ino``."""

    TAG: ClassVar[int] = 3
    parent: int
    name: bytes
    ino: int


@record_type
class DropEntry:
    TAG: ClassVar[int] = 4
    parent: int
    name: bytes


@record_type
class PutTarget:
    """A symlink's target."""

    TAG: ClassVar[int] = 5
    ino: int
    target: bytes


@record_type
class PutBlocks:
    """Map file blocks: ``blocks`` is a flat tuple (lblk, pblk, crc, lblk, pblk, crc, ...)."""

    TAG: ClassVar[int] = 6
    ino: int
    blocks: tuple


@record_type
class PutData:
    """PutBlocks of a small write, with the blocks' bytes (in triple order) in the record
    itself: the commit that logs it needs no flush of the block store before it, and replay
    writes the bytes back wherever the block store lost them (format version 3)."""

    TAG: ClassVar[int] = 10
    ino: int
    blocks: tuple
    data: bytes


@record_type
class TruncateBlocks:
    """Unmap every file block numbered ``first_dropped`` or higher."""

    TAG: ClassVar[int] = 7
    ino: int
    first_dropped: int


@record_type
class PutXattr:
    TAG: ClassVar[int] = 8
    ino: int
    name: bytes
    value: bytes


@record_type
class DropXattr:
    TAG: ClassVar[int] = 9
    ino: int
    name: bytes


REDO_OPS = (PutInode, DropInode, PutEntry, DropEntry, PutTarget, PutBlocks, TruncateBlocks,
            PutXattr, DropXattr, PutData)
_BY_TAG = {cls.TAG: cls for cls in REDO_OPS}
assert len(_BY_TAG) == len(REDO_OPS), "duplicate redo tag"


def encode_ops(ops) -> bytes:
    """A transaction's redo operations, as one WAL record payload."""
    return msgpack.packb([as_list(op) for op in ops], use_bin_type=True)


def decode_ops(payload: bytes) -> list:
    try:
        items = msgpack.unpackb(payload, raw=False, use_list=False)
    except (msgpack.UnpackException, ValueError) as exc:
        raise SchemaError(f"undecodable redo record: {exc}") from None
    if not isinstance(items, tuple):
        raise SchemaError("a redo record is an array of operations")
    ops = []
    for item in items:
        # The common case inline (replay decodes every record of the log before a mount);
        # anything else goes through from_list for its precise error.
        tag = item[0] if type(item) is tuple and item else None
        cls = _BY_TAG.get(tag) if type(tag) is int else None
        if cls is None:
            from_list(item, _BY_TAG)
            raise SchemaError(f"tag {tag!r} is not a redo operation")
        try:
            ops.append(cls(*item[1:]))
        except TypeError as exc:
            raise SchemaError(f"bad fields for {cls.__name__}: {exc}") from None
    return ops
