"""Every on-disk format of a razorfs data directory, and the rule that says when each is valid.

All integers are little-endian. CRC means CRC-32C (Castagnoli, the ``crc32c`` package: hardware
SSE4.2/ARMv8 instructions, ~10 GB/s, where ``zlib.crc32`` is slower and detects fewer burst errors).

DATA_DIR/
  superblock            written once by mkfs (temp file, fsync, rename, fsync dir)
  lock                  flock()ed by the one daemon (or fsck) using the directory; holds its pid
  blocks                the block store: block N lives at byte N * BLOCK_SIZE
  wal/<LSN:016x>.wal    WAL segments, named by the first LSN they may hold
  checkpoints/<LSN:016x>.ckpt   metadata snapshots, as of LSN (all records <= LSN applied)
  replica.state         the replica's shipped LSN (``--replica``; layout in replica_formats)
  epochs                inode number epochs (file handle generations), rewritten atomically by
                        every recovery (temp file, fsync, rename, fsync dir)

superblock (64 bytes)
  0   8  magic  b"RAZORFS\\0"
  8   4  format version (FORMAT_VERSION; READABLE_VERSIONS are read); any other is refused
  12  4  block size (BLOCK_SIZE)
  16 16  filesystem uuid (WAL segments and checkpoints carry it, so a file from another
         filesystem copied in is never replayed)
  32  8  creation time, ns since the epoch
  40 20  reserved, zero
  60  4  CRC of bytes 0..59
  Valid iff the magic, the CRC and the version match.

WAL segment
  header (32 bytes)
    0  8  magic b"RZWALSEG"
    8  4  format version
    12 4  reserved, zero
    16 8  first LSN of the segment (equal to the number in its name)
    24 4  first 4 bytes of the filesystem uuid
    28 4  CRC of bytes 0..27
  then records, each starting at an 8-byte aligned offset:
    0  4  magic b"RZR1"
    4  4  payload length P (<= MAX_RECORD)
    8  8  LSN: one transaction = one record, LSNs are consecutive across segments
    16 8  batch: the group-commit number that wrote the record (one pwrite + one fsync per batch)
    24 4  CRC of bytes 4..23, then bytes 28..31, then the payload
    28 4  following: how many records of the same batch come after this one
    32 P  payload: msgpack of the transaction's redo operations (razorfs.state.redo)
    then zero padding to a multiple of 8.
  A segment is preallocated with zeros, so the log's end is the first slot that is not a valid
  record: wrong magic, bad CRC, or an LSN that is not the previous one plus one.

  Torn tail versus corruption. A batch is written only after the previous batch's fsync returned.
  The damaged slot belongs to the last good record's batch if that record says more of its batch
  follow, else to the next batch. When any valid record of a *later* batch than the damaged
  slot's exists further on (in this or a later segment), the damaged record was once durable:
  that is corruption, and the mount is refused naming file and offset. Otherwise the damage is
  confined to the last batch, which was never acknowledged: a torn tail, cut off by recovery.
  A segment header is fsynced before any record goes into its segment, so a damaged header
  followed by any valid record is corruption too.

checkpoint
  header (48 bytes)
    0  8  magic b"RZCKPT\\0\\0"
    8  4  format version
    12 4  reserved, zero
    16 8  LSN the snapshot is as of
    24 8  body length B
    32 4  first 4 bytes of the filesystem uuid
    36 4  CRC of the body
    40 4  reserved, zero
    44 4  CRC of bytes 0..43
  body: msgpack of the tree state (razorfs.state.snapshot: its layout is described there)
  Valid iff both CRCs match and the file holds exactly 48 + B bytes. Written to a temp name,
  fsynced, renamed, directory fsynced: a crash leaves the old or the new file, never a mix.

epochs
  header (24 bytes)
    0  8  magic b"RZEPOCHS"
    8  4  number of entries N
    12 4  first 4 bytes of the filesystem uuid
    16 4  reserved, zero
    20 4  CRC of bytes 0..19, then of the entries
  then N entries of 12 bytes: 0 8 first inode number of the epoch, 8 4 epoch
  Valid iff the magic and CRC match, the uuid is this filesystem's, the file holds exactly
  24 + 12 N bytes, and first inode numbers and epochs both strictly increase. An inode's
  epoch is that of the last entry whose first inode number is not above it (0 before the
  first): the generation of its file handles (razorfs.state.generations).

block store
  Block N is the BLOCK_SIZE bytes at offset N * BLOCK_SIZE of ``blocks``. Blocks carry no header:
  each inode's extent map holds, per block, (physical block, CRC of its BLOCK_SIZE bytes), and a
  read whose CRC does not match returns EIO. Blocks are copy-on-write: a committed block is never
  rewritten, so a crash can only damage blocks no committed state points to.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import NamedTuple

import crc32c as _crc32c

# 2: WAL record bytes 28..31 say how many records of the batch follow (under the CRC).
# 3: a redo operation may carry a small write's data (PutData, razorfs.state.redo).
# A version 2 directory is read as it is and its superblock rewritten as 3 at the next mount,
# before any record of version 3 goes into it; older versions are refused (the superblock,
# segment and checkpoint headers carry it).
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
BLOCK_SIZE = 4096
MAX_RECORD = 64 << 20

SUPERBLOCK_PATH = "superblock"
LOCK_PATH = "lock"
BLOCKS_PATH = "blocks"
WAL_DIR = "wal"
CHECKPOINT_DIR = "checkpoints"
EPOCHS_PATH = "epochs"

SUPERBLOCK_MAGIC = b"RAZORFS\0"
SEGMENT_MAGIC = b"RZWALSEG"
RECORD_MAGIC = b"RZR1"
CHECKPOINT_MAGIC = b"RZCKPT\0\0"
EPOCHS_MAGIC = b"RZEPOCHS"

_LSN_STEM = re.compile(r"[0-9a-f]{16}")
_SUPERBLOCK = struct.Struct("<8sII16sQ20s")
_SEGMENT_HEADER = struct.Struct("<8sIIQ4s")
_RECORD_HEADER = struct.Struct("<4sIQQII")
_CHECKPOINT_HEADER = struct.Struct("<8sIIQQ4sII")
_EPOCHS_HEADER = struct.Struct("<8sI4sI")
_EPOCH_ENTRY = struct.Struct("<QI")

SUPERBLOCK_SIZE = _SUPERBLOCK.size + 4
SEGMENT_HEADER_SIZE = _SEGMENT_HEADER.size + 4
RECORD_HEADER_SIZE = _RECORD_HEADER.size
CHECKPOINT_HEADER_SIZE = _CHECKPOINT_HEADER.size + 4


def crc(data: bytes, value: int = 0) -> int:
    return _crc32c.crc32c(data, value)


def block_crcs(data) -> list[int]:
    """The CRC of each BLOCK_SIZE block of ``data`` (whole blocks), calling the C function
    directly: 256 calls per MiB written or read."""
    view, checksum = memoryview(data), _crc32c.crc32c
    return [checksum(view[i : i + BLOCK_SIZE]) for i in range(0, len(view), BLOCK_SIZE)]


class FormatError(Exception):
    """An on-disk structure is invalid; the message names what and where."""


@dataclass(frozen=True)
class Superblock:
    version: int
    block_size: int
    uuid: bytes
    created_ns: int

    def encode(self) -> bytes:
        body = _SUPERBLOCK.pack(
            SUPERBLOCK_MAGIC, self.version, self.block_size, self.uuid, self.created_ns, bytes(20)
        )
        return body + struct.pack("<I", crc(body))

    @classmethod
    def decode(cls, data: bytes, where: str = SUPERBLOCK_PATH) -> Superblock:
        if len(data) != SUPERBLOCK_SIZE or data[:8] != SUPERBLOCK_MAGIC:
            raise FormatError(f"{where}: not a razorfs superblock")
        body, (stored,) = data[:-4], struct.unpack("<I", data[-4:])
        if crc(body) != stored:
            raise FormatError(f"{where}: superblock checksum mismatch")
        _, version, block_size, uuid, created_ns, _ = _SUPERBLOCK.unpack(body)
        if version not in READABLE_VERSIONS:
            raise FormatError(
                f"{where}: format version {version} is not supported "
                f"(this razorfs reads versions {', '.join(map(str, READABLE_VERSIONS))})"
            )
        if block_size != BLOCK_SIZE:
            raise FormatError(f"{where}: block size {block_size} is not supported")
        return cls(version, block_size, uuid, created_ns)


def segment_name(first_lsn: int) -> str:
    return f"{WAL_DIR}/{first_lsn:016x}.wal"


def parse_lsn_name(name: str, suffix: str) -> int | None:
    stem, dot, ext = name.partition(".")
    if dot and "." + ext == suffix and _LSN_STEM.fullmatch(stem):
        return int(stem, 16)
    return None


def lsn_named(names, directory: str, suffix: str) -> list[tuple[int, str]]:
    """(LSN, path) of the ``names`` of ``directory`` named by an LSN with ``suffix``, in LSN
    order (WAL segments, checkpoints); other names are not ours and left out."""
    found = []
    for name in names:
        lsn = parse_lsn_name(name, suffix)
        if lsn is not None:
            found.append((lsn, f"{directory}/{name}"))
    return sorted(found)


def encode_segment_header(first_lsn: int, uuid: bytes) -> bytes:
    body = _SEGMENT_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, 0, first_lsn, uuid[:4])
    return body + struct.pack("<I", crc(body))


def decode_segment_header(data: bytes, uuid: bytes, where: str) -> int:
    """Return the segment's first LSN, or raise FormatError."""
    if len(data) < SEGMENT_HEADER_SIZE or data[:8] != SEGMENT_MAGIC:
        raise FormatError(f"{where}: not a razorfs WAL segment")
    body = data[: _SEGMENT_HEADER.size]
    (stored,) = struct.unpack_from("<I", data, _SEGMENT_HEADER.size)
    if crc(body) != stored:
        raise FormatError(f"{where}: WAL segment header checksum mismatch at offset 0")
    _, version, _, first_lsn, uuid_prefix = _SEGMENT_HEADER.unpack(body)
    if version not in READABLE_VERSIONS:
        raise FormatError(f"{where}: WAL format version {version} is not supported")
    if uuid_prefix != uuid[:4]:
        raise FormatError(f"{where}: WAL segment belongs to another filesystem")
    return first_lsn


def _padded(length: int) -> int:
    return (length + 7) & ~7


def encode_record(lsn: int, batch: int, payload: bytes, following: int = 0) -> bytes:
    length = len(payload)
    if length > MAX_RECORD:
        raise ValueError(f"WAL record of {length} bytes exceeds {MAX_RECORD}")
    fields = struct.pack("<IQQI", length, lsn, batch, following)
    checksum = crc(payload, crc(fields))
    header = _RECORD_HEADER.pack(RECORD_MAGIC, length, lsn, batch, checksum, following)
    return header + payload + bytes(_padded(length) - length)


class Record(NamedTuple):
    """A valid WAL record (a named tuple, not a frozen dataclass: recovery builds a million of
    them, and a frozen dataclass's ``__init__`` costs several times a tuple's)."""

    offset: int
    lsn: int
    batch: int
    payload: bytes
    following: int = 0

    @property
    def end(self) -> int:
        return self.offset + RECORD_HEADER_SIZE + _padded(len(self.payload))


def decode_record(data: bytes, offset: int) -> Record | None:
    """The valid record at ``offset`` of a segment's bytes, or None."""
    run = decode_records(data, offset, limit=1)
    return run[0] if run else None


def decode_records(data: bytes, offset: int, first_lsn: int | None = None,
                   limit: int | None = None) -> list[Record]:
    """The valid records at ``offset`` and after it whose LSNs follow one another (the first
    one's being ``first_lsn``, when given), at most ``limit``: the run stops at the first slot
    that is not the next record. One loop: at a million records this is most of the log scan
    before a mount."""
    records: list[Record] = []
    append, unpack, size = records.append, _RECORD_HEADER.unpack_from, len(data)
    checksum = _crc32c.crc32c
    expected = first_lsn
    while offset + RECORD_HEADER_SIZE <= size and (limit is None or len(records) < limit):
        magic, length, lsn, batch, stored, following = unpack(data, offset)
        start = offset + RECORD_HEADER_SIZE
        end = start + length
        if (magic != RECORD_MAGIC or length > MAX_RECORD or end > size
                or (expected is not None and lsn != expected)):
            break
        # bytes 28..31 and the payload are contiguous: one CRC call covers both
        if checksum(data[offset + 28 : end], checksum(data[offset + 4 : offset + 24])) != stored:
            break
        append(Record(offset, lsn, batch, data[start:end], following))
        offset = start + _padded(length)
        expected = lsn + 1
    return records


def find_valid_records_after(data: bytes, offset: int):
    """Every valid record starting at or after ``offset`` (8-aligned scan, jumping by magic)."""
    position = data.find(RECORD_MAGIC, offset)
    while position >= 0:
        if position % 8 == 0:
            record = decode_record(data, position)
            if record is not None:
                yield record
        position = data.find(RECORD_MAGIC, position + 1)


def encode_checkpoint(lsn: int, uuid: bytes, body: bytes) -> bytes:
    return checkpoint_header(lsn, uuid, [body]) + body


def checkpoint_header(lsn: int, uuid: bytes, parts) -> bytes:
    """The header of a checkpoint whose body is the concatenation of ``parts``: a big body can
    be written part by part, never joined into one more copy."""
    length = value = 0
    for part in parts:
        length += len(part)
        value = crc(part, value)
    head = _CHECKPOINT_HEADER.pack(CHECKPOINT_MAGIC, FORMAT_VERSION, 0, lsn, length, uuid[:4],
                                   value, 0)
    return head + struct.pack("<I", crc(head))


def decode_checkpoint(data: bytes, uuid: bytes, where: str) -> tuple[int, bytes]:
    """Return (lsn, body) of a valid checkpoint, or raise FormatError naming the problem."""
    if len(data) < CHECKPOINT_HEADER_SIZE or data[:8] != CHECKPOINT_MAGIC:
        raise FormatError(f"{where}: not a razorfs checkpoint")
    head = data[: _CHECKPOINT_HEADER.size]
    (stored,) = struct.unpack_from("<I", data, _CHECKPOINT_HEADER.size)
    if crc(head) != stored:
        raise FormatError(f"{where}: checkpoint header checksum mismatch at offset 0")
    _, version, _, lsn, length, uuid_prefix, body_crc, _ = _CHECKPOINT_HEADER.unpack(head)
    if version not in READABLE_VERSIONS:
        raise FormatError(f"{where}: checkpoint format version {version} is not supported")
    if uuid_prefix != uuid[:4]:
        raise FormatError(f"{where}: checkpoint belongs to another filesystem")
    body = data[CHECKPOINT_HEADER_SIZE:]
    if len(body) != length:
        raise FormatError(f"{where}: checkpoint body is {len(body)} bytes, header says {length}")
    if crc(body) != body_crc:
        raise FormatError(
            f"{where}: checkpoint body checksum mismatch (bytes {CHECKPOINT_HEADER_SIZE}.."
            f"{CHECKPOINT_HEADER_SIZE + length})"
        )
    return lsn, body


def checkpoint_name(lsn: int) -> str:
    return f"{CHECKPOINT_DIR}/{lsn:016x}.ckpt"


def encode_epochs(entries: list[tuple[int, int]], uuid: bytes) -> bytes:
    """The epochs file holding ``entries``, (first inode number, epoch) pairs."""
    body = b"".join(_EPOCH_ENTRY.pack(first, epoch) for first, epoch in entries)
    head = _EPOCHS_HEADER.pack(EPOCHS_MAGIC, len(entries), uuid[:4], 0)
    return head + struct.pack("<I", crc(body, crc(head))) + body


def decode_epochs(data: bytes, uuid: bytes, where: str = EPOCHS_PATH) -> list[tuple[int, int]]:
    """The (first inode number, epoch) entries of a valid epochs file, or FormatError."""
    size = _EPOCHS_HEADER.size + 4
    if len(data) < size or data[:8] != EPOCHS_MAGIC:
        raise FormatError(f"{where}: not a razorfs epochs file")
    _, count, uuid_prefix, _ = _EPOCHS_HEADER.unpack_from(data)
    (stored,) = struct.unpack_from("<I", data, _EPOCHS_HEADER.size)
    body = data[size:]
    if len(body) != count * _EPOCH_ENTRY.size:
        raise FormatError(f"{where}: {len(body)} bytes of entries, header says {count} entries")
    if crc(body, crc(data[: _EPOCHS_HEADER.size])) != stored:
        raise FormatError(f"{where}: epochs checksum mismatch")
    if uuid_prefix != uuid[:4]:
        raise FormatError(f"{where}: epochs file belongs to another filesystem")
    entries = [_EPOCH_ENTRY.unpack_from(body, i) for i in range(0, len(body), _EPOCH_ENTRY.size)]
    for (first, epoch), (next_first, next_epoch) in zip(entries, entries[1:]):
        if next_first <= first or next_epoch <= epoch:
            raise FormatError(f"{where}: epochs do not increase")
    return entries
