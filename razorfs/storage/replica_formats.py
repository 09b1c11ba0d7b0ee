"""Every object format of a razorfs replica in an object store, the data directory's record of
it, and the rule that says when each is valid (the why of this layout: docs/DESIGN.md, Replica).

All integers are little-endian; CRC means CRC-32C as in ``formats``. LSNs in names are 16
lowercase hex digits, so that names sort in LSN order.

PREFIX/
  identity                          the filesystem uuid (written once)
  chunks/<FIRST>-<LAST>.rzc         WAL records FIRST..LAST and the blocks they map
  bases/<LSN>/checkpoint            a checkpoint file at LSN, byte for byte (``formats``)
  bases/<LSN>/pack-<N:08d>          blocks live at LSN (N from 0)
  bases/<LSN>/manifest              written last: the base exists once this does

identity (36 bytes)
  0  8  magic b"RZREPLID"
  8  4  format version (REPLICA_VERSION)
  12 4  reserved, zero
  16 16 filesystem uuid
  32 4  CRC of bytes 0..31

chunk
  header (64 bytes)
    0  8  magic b"RZCHUNK\\0"
    8  4  format version
    12 4  reserved, zero
    16 8  first LSN
    24 8  last LSN
    32 4  first 4 bytes of the filesystem uuid
    36 4  timeline entries T
    40 4  block count K
    44 4  reserved, zero
    48 8  record bytes R
    56 4  CRC of the body (every byte after the header)
    60 4  CRC of bytes 0..59
  body
    T x (8 LSN, 8 ns since the epoch): every record <= LSN was durable by then; LSNs increase,
        the last is the chunk's last LSN
    R bytes: the WAL records first..last, as ``formats.encode_record`` wrote them
    K x BLOCK_SIZE: the bytes of each block the records map, in the order of the
        (lblk, pblk, crc) triples of their ``PutBlocks`` operations
  Valid iff both CRCs match, the records decode (each with its own CRC) as exactly the LSNs
  first..last, their PutBlocks triples number K and each block's CRC is its triple's.

pack (a base's blocks)
  header (32 bytes)
    0  8  magic b"RZPACK\\0\\0"
    8  4  format version
    12 4  block count K
    16 8  base LSN
    24 4  CRC of the body
    28 4  CRC of bytes 0..27
  body: K x (8 pblk, 4 CRC of the block, 4 reserved zero), then K x BLOCK_SIZE bytes
  Valid iff both CRCs match and each block's CRC is its entry's.

manifest
  0  8  magic b"RZBASE\\0\\0"
  8  4  format version
  12 4  pack count P
  16 8  LSN
  24 8  ns since the epoch when LSN was seen durable
  32 4  first 4 bytes of the filesystem uuid
  36 4  CRC of the checkpoint object
  40 8  blocks in all packs
  48    P x (4 CRC of the pack object, 4 its block count)
  then  4  CRC of every byte before it
  Valid iff the CRC matches; the checkpoint and each pack must then have the CRCs it gives.

DATA_DIR/replica.state (64 bytes; temp file, fsync, rename, fsync dir)
  0  8  magic b"RZREPST\\0"
  8  4  format version
  12 4  flags: 1 = the replica needs a fresh base (its history has a gap after shipped LSN)
  16 8  shipped LSN: every record <= it is in the store (written after the upload: it may lag
        the store, never lead it)
  24 16 first 16 bytes of SHA-256 of the replica URL it describes
  40 20 reserved, zero
  60 4  CRC of bytes 0..59
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass

from razorfs.storage import formats
from razorfs.storage.formats import BLOCK_SIZE, FormatError, crc

REPLICA_VERSION = 1

IDENTITY_KEY = "identity"
CHUNK_DIR = "chunks"
BASE_DIR = "bases"
STATE_PATH = "replica.state"

IDENTITY_MAGIC = b"RZREPLID"
CHUNK_MAGIC = b"RZCHUNK\0"
PACK_MAGIC = b"RZPACK\0\0"
MANIFEST_MAGIC = b"RZBASE\0\0"
STATE_MAGIC = b"RZREPST\0"

NEEDS_BASE = 1

_IDENTITY = struct.Struct("<8sII16s")
_CHUNK_HEADER = struct.Struct("<8sIIQQ4sIIIQI")
_TIMELINE_ENTRY = struct.Struct("<QQ")
_PACK_HEADER = struct.Struct("<8sIIQI")
_PACK_ENTRY = struct.Struct("<QII")
_MANIFEST_HEAD = struct.Struct("<8sIIQQ4sIQ")
_MANIFEST_PACK = struct.Struct("<II")
_STATE = struct.Struct("<8sIIQ16s20s")

CHUNK_HEADER_SIZE = _CHUNK_HEADER.size + 4
PACK_HEADER_SIZE = _PACK_HEADER.size + 4
_CHUNK_NAME = re.compile(r"([0-9a-f]{16})-([0-9a-f]{16})\.rzc")
_BASE_NAME = re.compile(r"([0-9a-f]{16})")


def _sealed(body: bytes) -> bytes:
    return body + struct.pack("<I", crc(body))


def _unseal(data: bytes, size: int, where: str, what: str) -> bytes:
    body = data[: size - 4]
    if len(data) < size or crc(body) != struct.unpack_from("<I", data, size - 4)[0]:
        raise FormatError(f"{where}: {what} checksum mismatch")
    return body


def _check_version(version: int, where: str) -> None:
    if version != REPLICA_VERSION:
        raise FormatError(f"{where}: replica format version {version} is not supported "
                          f"(this razorfs reads version {REPLICA_VERSION})")


# ---- names ----

def chunk_key(first: int, last: int) -> str:
    return f"{CHUNK_DIR}/{first:016x}-{last:016x}.rzc"


def parse_chunk_key(name: str) -> tuple[int, int] | None:
    """(first, last) of a chunk's name relative to PREFIX/chunks/, or None."""
    match = _CHUNK_NAME.fullmatch(name)
    return (int(match[1], 16), int(match[2], 16)) if match else None


def base_dir(lsn: int) -> str:
    return f"{BASE_DIR}/{lsn:016x}"


def parse_base_name(name: str) -> int | None:
    match = _BASE_NAME.fullmatch(name)
    return int(match[1], 16) if match else None


def base_checkpoint_key(lsn: int) -> str:
    return f"{base_dir(lsn)}/checkpoint"


def base_pack_key(lsn: int, number: int) -> str:
    return f"{base_dir(lsn)}/pack-{number:08d}"


def base_manifest_key(lsn: int) -> str:
    return f"{base_dir(lsn)}/manifest"


def target_id(url: str) -> bytes:
    return hashlib.sha256(url.encode()).digest()[:16]


# ---- identity ----

def encode_identity(uuid: bytes) -> bytes:
    return _sealed(_IDENTITY.pack(IDENTITY_MAGIC, REPLICA_VERSION, 0, uuid))


def decode_identity(data: bytes, where: str) -> bytes:
    if data[:8] != IDENTITY_MAGIC or len(data) != _IDENTITY.size + 4:
        raise FormatError(f"{where}: not a razorfs replica identity")
    _, version, _, uuid = _IDENTITY.unpack(_unseal(data, _IDENTITY.size + 4, where, "identity"))
    _check_version(version, where)
    return uuid


# ---- chunks ----

@dataclass
class Chunk:
    first: int
    last: int
    timeline: list[tuple[int, int]]  # (lsn, ns): records <= lsn durable by then
    records: list[formats.Record]
    blocks: list[tuple[int, int, bytes]]  # (pblk, crc, bytes), in PutBlocks triple order


def encode_chunk(first: int, last: int, uuid: bytes, timeline, records: bytes,
                 blocks: list[bytes]) -> list[bytes]:
    """The chunk as a list of parts (the header first): block bytes are not copied again."""
    parts = [b"".join(_TIMELINE_ENTRY.pack(lsn, ns) for lsn, ns in timeline), records, *blocks]
    value = 0
    for part in parts:
        value = crc(part, value)
    head = _CHUNK_HEADER.pack(CHUNK_MAGIC, REPLICA_VERSION, 0, first, last, uuid[:4],
                              len(timeline), len(blocks), 0, len(records), value)
    return [_sealed(head), *parts]


def decode_chunk(data: bytes, uuid: bytes, where: str, block_triples) -> Chunk:
    """A valid chunk, or FormatError naming what is wrong. ``block_triples(payload)`` gives
    the (lblk, pblk, crc) triples a record's payload maps (the redo schema is not known here)."""
    if len(data) < CHUNK_HEADER_SIZE or data[:8] != CHUNK_MAGIC:
        raise FormatError(f"{where}: not a razorfs replica chunk")
    head = _unseal(data, CHUNK_HEADER_SIZE, where, "chunk header")
    (_, version, _, first, last, uuid_prefix, entries, count, _, record_bytes,
     body_crc) = _CHUNK_HEADER.unpack(head)
    _check_version(version, where)
    if uuid_prefix != uuid[:4]:
        raise FormatError(f"{where}: chunk belongs to another filesystem")
    body = memoryview(data)[CHUNK_HEADER_SIZE:]
    timeline_bytes = entries * _TIMELINE_ENTRY.size
    if len(body) != timeline_bytes + record_bytes + count * BLOCK_SIZE:
        raise FormatError(f"{where}: chunk is {len(data)} bytes, its header says otherwise")
    if crc(body) != body_crc:
        raise FormatError(f"{where}: chunk body checksum mismatch")
    timeline = [_TIMELINE_ENTRY.unpack_from(body, i * _TIMELINE_ENTRY.size)
                for i in range(entries)]
    record_data = bytes(body[timeline_bytes : timeline_bytes + record_bytes])
    records = formats.decode_records(record_data, 0, first)
    end = records[-1].end if records else 0
    if not records or records[-1].lsn != last or end != len(record_data):
        raise FormatError(f"{where}: chunk records are not exactly LSN {first}..{last}")
    blocks = []
    position = timeline_bytes + record_bytes
    for record in records:
        for _, pblk, checksum in block_triples(record.payload):
            block = bytes(body[position : position + BLOCK_SIZE])
            if len(block) != BLOCK_SIZE or crc(block) != checksum:
                raise FormatError(f"{where}: block {pblk} of LSN {record.lsn} does not match "
                                  "its checksum")
            blocks.append((pblk, checksum, block))
            position += BLOCK_SIZE
    if len(blocks) != count:
        raise FormatError(f"{where}: chunk holds {count} blocks, its records map {len(blocks)}")
    if not timeline or timeline[-1][0] != last:
        raise FormatError(f"{where}: chunk timeline does not end at LSN {last}")
    return Chunk(first, last, timeline, records, blocks)


def read_chunk_head(data: bytes, where: str) -> tuple[int, int, list[tuple[int, int]]]:
    """(first, last, timeline) from the start of a chunk (header and timeline only)."""
    if len(data) < CHUNK_HEADER_SIZE or data[:8] != CHUNK_MAGIC:
        raise FormatError(f"{where}: not a razorfs replica chunk")
    head = _unseal(data, CHUNK_HEADER_SIZE, where, "chunk header")
    _, version, _, first, last, _, entries, _, _, _, _ = _CHUNK_HEADER.unpack(head)
    _check_version(version, where)
    return first, last, [_TIMELINE_ENTRY.unpack_from(data, CHUNK_HEADER_SIZE + i * 16)
                         for i in range(entries)]


def chunk_head_size(entries_max: int) -> int:
    return CHUNK_HEADER_SIZE + entries_max * _TIMELINE_ENTRY.size


# ---- bases ----

def encode_pack(lsn: int, blocks: list[tuple[int, int, bytes]]) -> list[bytes]:
    """A pack of (pblk, crc, bytes) blocks, as parts (the header first)."""
    table = b"".join(_PACK_ENTRY.pack(pblk, checksum, 0) for pblk, checksum, _ in blocks)
    parts = [table, *(data for _, _, data in blocks)]
    value = 0
    for part in parts:
        value = crc(part, value)
    return [_sealed(_PACK_HEADER.pack(PACK_MAGIC, REPLICA_VERSION, len(blocks), lsn, value)),
            *parts]


def decode_pack(data: bytes, lsn: int, where: str) -> list[tuple[int, int, memoryview]]:
    if len(data) < PACK_HEADER_SIZE or data[:8] != PACK_MAGIC:
        raise FormatError(f"{where}: not a razorfs replica pack")
    head = _unseal(data, PACK_HEADER_SIZE, where, "pack header")
    _, version, count, pack_lsn, body_crc = _PACK_HEADER.unpack(head)
    _check_version(version, where)
    body = memoryview(data)[PACK_HEADER_SIZE:]
    if pack_lsn != lsn or len(body) != count * (_PACK_ENTRY.size + BLOCK_SIZE):
        raise FormatError(f"{where}: pack does not belong to the base at LSN {lsn}")
    if crc(body) != body_crc:
        raise FormatError(f"{where}: pack body checksum mismatch")
    blocks = []
    data_start = count * _PACK_ENTRY.size
    for i in range(count):
        pblk, checksum, _ = _PACK_ENTRY.unpack_from(body, i * _PACK_ENTRY.size)
        block = body[data_start + i * BLOCK_SIZE : data_start + (i + 1) * BLOCK_SIZE]
        if crc(block) != checksum:
            raise FormatError(f"{where}: block {pblk} does not match its checksum")
        blocks.append((pblk, checksum, block))
    return blocks


@dataclass(frozen=True)
class Manifest:
    lsn: int
    time_ns: int
    checkpoint_crc: int
    block_count: int
    packs: tuple[tuple[int, int], ...]  # (crc of the pack object, its block count)


def encode_manifest(manifest: Manifest, uuid: bytes) -> bytes:
    head = _MANIFEST_HEAD.pack(MANIFEST_MAGIC, REPLICA_VERSION, len(manifest.packs),
                               manifest.lsn, manifest.time_ns, uuid[:4],
                               manifest.checkpoint_crc, manifest.block_count)
    return _sealed(head + b"".join(_MANIFEST_PACK.pack(*pack) for pack in manifest.packs))


def decode_manifest(data: bytes, uuid: bytes, where: str) -> Manifest:
    if len(data) < _MANIFEST_HEAD.size + 4 or data[:8] != MANIFEST_MAGIC:
        raise FormatError(f"{where}: not a razorfs replica base manifest")
    _, version, count, lsn, time_ns, uuid_prefix, checkpoint_crc, blocks = (
        _MANIFEST_HEAD.unpack_from(data))
    size = _MANIFEST_HEAD.size + count * _MANIFEST_PACK.size + 4
    if len(data) != size:
        raise FormatError(f"{where}: manifest is {len(data)} bytes, expected {size}")
    _unseal(data, size, where, "manifest")
    _check_version(version, where)
    if uuid_prefix != uuid[:4]:
        raise FormatError(f"{where}: base belongs to another filesystem")
    packs = tuple(_MANIFEST_PACK.unpack_from(data, _MANIFEST_HEAD.size + i * 8)
                  for i in range(count))
    return Manifest(lsn, time_ns, checkpoint_crc, blocks, packs)


# ---- the data directory's record ----

@dataclass(frozen=True)
class ReplicaState:
    shipped_lsn: int
    needs_base: bool
    target: bytes  # target_id of the URL

    def encode(self) -> bytes:
        return _sealed(_STATE.pack(STATE_MAGIC, REPLICA_VERSION,
                                   NEEDS_BASE if self.needs_base else 0, self.shipped_lsn,
                                   self.target, bytes(20)))

    @classmethod
    def decode(cls, data: bytes, where: str = STATE_PATH) -> ReplicaState:
        if data[:8] != STATE_MAGIC or len(data) != _STATE.size + 4:
            raise FormatError(f"{where}: not a razorfs replica state record")
        _, version, flags, shipped, target, _ = _STATE.unpack(
            _unseal(data, _STATE.size + 4, where, "replica state"))
        _check_version(version, where)
        return cls(shipped, bool(flags & NEEDS_BASE), target)
