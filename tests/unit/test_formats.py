"""On-disk formats: every structure round-trips, and every damaged one is refused."""

from __future__ import annotations

import struct

import pytest

from razorfs.storage import formats
from razorfs.storage.formats import (
    BLOCK_SIZE,
    CHECKPOINT_HEADER_SIZE,
    FORMAT_VERSION,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    SUPERBLOCK_SIZE,
    FormatError,
    Superblock,
)

UUID = bytes(range(16))
OTHER_UUID = bytes(range(100, 116))


def flip(data: bytes, index: int) -> bytes:
    damaged = bytearray(data)
    damaged[index] ^= 0x40
    return bytes(damaged)


# ---- superblock ---------------------------------------------------------------------------------


def test_superblock_roundtrip() -> None:
    superblock = Superblock(FORMAT_VERSION, BLOCK_SIZE, UUID, 1_700_000_000_123_456_789)
    data = superblock.encode()
    assert len(data) == SUPERBLOCK_SIZE == 64
    assert data[:8] == b"RAZORFS\0"
    assert Superblock.decode(data) == superblock


def test_superblock_wrong_magic_refused() -> None:
    data = bytearray(Superblock(FORMAT_VERSION, BLOCK_SIZE, UUID, 1).encode())
    data[:8] = b"EXT4FS\0\0"
    with pytest.raises(FormatError, match="not a razorfs superblock"):
        Superblock.decode(bytes(data))


def test_superblock_wrong_length_refused() -> None:
    data = Superblock(FORMAT_VERSION, BLOCK_SIZE, UUID, 1).encode()
    with pytest.raises(FormatError, match="not a razorfs superblock"):
        Superblock.decode(data[:-1])


@pytest.mark.parametrize("index", [8, 12, 16, 31, 32, 45, 59, 60, 63])
def test_superblock_flipped_byte_fails_checksum(index: int) -> None:
    data = Superblock(FORMAT_VERSION, BLOCK_SIZE, UUID, 1).encode()
    with pytest.raises(FormatError, match="checksum"):
        Superblock.decode(flip(data, index))


def test_superblock_unknown_version_refused_naming_it() -> None:
    data = Superblock(FORMAT_VERSION + 6, BLOCK_SIZE, UUID, 1).encode()
    with pytest.raises(FormatError, match=rf"version {FORMAT_VERSION + 6} is not supported"):
        Superblock.decode(data)


def test_superblock_other_block_size_refused() -> None:
    data = Superblock(FORMAT_VERSION, 8192, UUID, 1).encode()
    with pytest.raises(FormatError, match="block size 8192"):
        Superblock.decode(data)


# ---- WAL segment header -------------------------------------------------------------------------


def test_segment_header_roundtrip() -> None:
    header = formats.encode_segment_header(0x1234, UUID)
    assert len(header) == SEGMENT_HEADER_SIZE == 32
    assert formats.decode_segment_header(header, UUID, "seg") == 0x1234
    # Trailing records after the header do not disturb it.
    assert formats.decode_segment_header(header + bytes(100), UUID, "seg") == 0x1234


def test_segment_header_of_another_filesystem_refused() -> None:
    header = formats.encode_segment_header(7, UUID)
    with pytest.raises(FormatError, match="seg: WAL segment belongs to another filesystem"):
        formats.decode_segment_header(header, OTHER_UUID, "seg")


@pytest.mark.parametrize("index", [0, 8, 12, 16, 24, 28, 31])
def test_segment_header_flipped_byte_refused(index: int) -> None:
    header = formats.encode_segment_header(7, UUID)
    with pytest.raises(FormatError, match="seg: "):
        formats.decode_segment_header(flip(header, index), UUID, "seg")


def test_segment_header_too_short_refused() -> None:
    header = formats.encode_segment_header(7, UUID)
    with pytest.raises(FormatError, match="not a razorfs WAL segment"):
        formats.decode_segment_header(header[:-1], UUID, "seg")


def test_segment_name_is_sixteen_hex_digits() -> None:
    assert formats.segment_name(0xAB) == "wal/00000000000000ab.wal"
    assert formats.checkpoint_name(0xAB) == "checkpoints/00000000000000ab.ckpt"


# ---- WAL records --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 100, 4096])
def test_record_roundtrip_and_alignment(size: int) -> None:
    payload = bytes((i * 7 + 3) % 256 for i in range(size))
    encoded = formats.encode_record(42, 9, payload)
    assert len(encoded) % 8 == 0
    assert len(encoded) == RECORD_HEADER_SIZE + -(-size // 8) * 8
    assert encoded[size + RECORD_HEADER_SIZE :] == bytes(len(encoded) - size - RECORD_HEADER_SIZE)
    record = formats.decode_record(b"\0" * 16 + encoded, 16)
    assert record == formats.Record(16, 42, 9, payload)
    assert record.end == 16 + len(encoded)


def test_records_decode_back_to_back() -> None:
    data = formats.encode_record(1, 1, b"abc") + formats.encode_record(2, 1, b"defghijkl")
    first = formats.decode_record(data, 0)
    second = formats.decode_record(data, first.end)
    assert (first.lsn, first.payload) == (1, b"abc")
    assert (second.lsn, second.payload, second.end) == (2, b"defghijkl", len(data))


def test_record_larger_than_max_refused_by_encoder() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        formats.encode_record(1, 1, bytes(formats.MAX_RECORD + 1))


def test_record_with_oversized_length_field_is_invalid() -> None:
    encoded = bytearray(formats.encode_record(1, 1, b"x"))
    struct.pack_into("<I", encoded, 4, formats.MAX_RECORD + 1)
    assert formats.decode_record(bytes(encoded), 0) is None


def test_record_cut_short_is_invalid() -> None:
    encoded = formats.encode_record(1, 1, b"0123456789")
    for cut in (0, 10, RECORD_HEADER_SIZE - 1, RECORD_HEADER_SIZE, RECORD_HEADER_SIZE + 9):
        assert formats.decode_record(encoded[:cut], 0) is None


PAYLOAD = b"the redo operations of one transaction"
# Bytes 0..27: magic, length, LSN, batch, CRC; bytes 28..31 are the reserved field.
CHECKED_HEADER_BYTES = range(0, 28)


@pytest.mark.parametrize("index", [*CHECKED_HEADER_BYTES,
                                   *range(RECORD_HEADER_SIZE, RECORD_HEADER_SIZE + len(PAYLOAD))])
def test_record_any_flipped_byte_makes_it_invalid(index: int) -> None:
    encoded = formats.encode_record(5, 3, PAYLOAD)
    assert formats.decode_record(encoded, 0) is not None
    assert formats.decode_record(flip(encoded, index), 0) is None


@pytest.mark.parametrize("index", [28, 31])
def test_record_flipped_reserved_byte_makes_it_invalid(index: int) -> None:
    encoded = formats.encode_record(5, 3, PAYLOAD)
    assert formats.decode_record(flip(encoded, index), 0) is None


def test_find_valid_records_after_skips_garbage_and_misaligned_magic() -> None:
    good = formats.encode_record(3, 2, b"payload!")
    data = b"RZR1" + bytes(4) + b"garbage!" + b"\0RZR1xxx" + good
    found = list(formats.find_valid_records_after(data, 0))
    assert [(r.offset, r.lsn) for r in found] == [(24, 3)]
    assert list(formats.find_valid_records_after(data, 25)) == []


# ---- checkpoints --------------------------------------------------------------------------------


BODY = bytes(range(256)) * 3


def test_checkpoint_roundtrip() -> None:
    data = formats.encode_checkpoint(77, UUID, BODY)
    assert len(data) == CHECKPOINT_HEADER_SIZE + len(BODY)
    assert formats.decode_checkpoint(data, UUID, "ck") == (77, BODY)


def test_checkpoint_with_empty_body_roundtrips() -> None:
    data = formats.encode_checkpoint(0, UUID, b"")
    assert formats.decode_checkpoint(data, UUID, "ck") == (0, b"")


def test_checkpoint_truncated_body_refused() -> None:
    data = formats.encode_checkpoint(77, UUID, BODY)
    with pytest.raises(FormatError, match=rf"ck: checkpoint body is 767 bytes, header says {len(BODY)}"):
        formats.decode_checkpoint(data[:-1], UUID, "ck")


def test_checkpoint_with_trailing_bytes_refused() -> None:
    data = formats.encode_checkpoint(77, UUID, BODY)
    with pytest.raises(FormatError, match="ck: "):
        formats.decode_checkpoint(data + b"\0", UUID, "ck")


def test_checkpoint_flipped_body_byte_refused() -> None:
    data = formats.encode_checkpoint(77, UUID, BODY)
    with pytest.raises(FormatError, match="ck: checkpoint body checksum mismatch"):
        formats.decode_checkpoint(flip(data, CHECKPOINT_HEADER_SIZE + 300), UUID, "ck")


@pytest.mark.parametrize("index", [8, 12, 16, 24, 32, 36, 40, 44, 47])
def test_checkpoint_flipped_header_byte_refused(index: int) -> None:
    data = formats.encode_checkpoint(77, UUID, BODY)
    with pytest.raises(FormatError, match="ck: checkpoint header checksum mismatch"):
        formats.decode_checkpoint(flip(data, index), UUID, "ck")


def test_checkpoint_wrong_magic_or_too_short_refused() -> None:
    data = formats.encode_checkpoint(77, UUID, BODY)
    with pytest.raises(FormatError, match="not a razorfs checkpoint"):
        formats.decode_checkpoint(flip(data, 0), UUID, "ck")
    with pytest.raises(FormatError, match="not a razorfs checkpoint"):
        formats.decode_checkpoint(data[: CHECKPOINT_HEADER_SIZE - 1], UUID, "ck")


def test_checkpoint_of_another_filesystem_refused() -> None:
    data = formats.encode_checkpoint(77, UUID, BODY)
    with pytest.raises(FormatError, match="belongs to another filesystem"):
        formats.decode_checkpoint(data, OTHER_UUID, "ck")


# ---- file names ---------------------------------------------------------------------------------


def test_parse_lsn_name() -> None:
    assert formats.parse_lsn_name("00000000000000ff.wal", ".wal") == 255
    assert formats.parse_lsn_name("0000000000000000.ckpt", ".ckpt") == 0
    assert formats.parse_lsn_name("ffffffffffffffff.wal", ".wal") == 2**64 - 1
    name = formats.segment_name(12345).rpartition("/")[2]
    assert formats.parse_lsn_name(name, ".wal") == 12345


@pytest.mark.parametrize("name", [
    "00000000000000ff.ckpt",       # other suffix
    "00000000000000ff",            # no suffix
    "00000000000000ff.wal.tmp",    # temp file of an atomic write
    "0000000000000ff.wal",         # 15 digits
    "000000000000000ff.wal",       # 17 digits
    "zzzzzzzzzzzzzzzz.wal",        # not hex
    ".wal",
])
def test_parse_lsn_name_rejects_other_names(name: str) -> None:
    assert formats.parse_lsn_name(name, ".wal") is None


@pytest.mark.parametrize("name", ["0x0000000000000f.wal", "-000000000000005.wal",
                                  " 000000000000005.wal", "0000_0000_00005a.wal"])
def test_parse_lsn_name_rejects_non_hex_digit_stems(name: str) -> None:
    assert formats.parse_lsn_name(name, ".wal") is None


def test_checkpoint_written_in_parts_is_the_same_file():
    parts = [BODY[:5], b"", BODY[5:]]
    data = formats.checkpoint_header(77, UUID, parts) + b"".join(parts)
    assert data == formats.encode_checkpoint(77, UUID, BODY)
    assert formats.decode_checkpoint(data, UUID, "c") == (77, BODY)
