"""Replica object formats: what is written reads back, and every damage is named."""

import pytest

from razorfs.state import redo as m
from razorfs.state import snapshot
from razorfs.state.replica import checkpoint_blocks, mapped_blocks
from razorfs.storage import formats
from razorfs.storage import replica_formats as rf
from razorfs.storage.formats import BLOCK_SIZE, FormatError
from razorfs.state.tree import TreeState

UUID = bytes(range(16))


def _chunk(first=5, count=3):
    records, blocks = [], []
    for lsn in range(first, first + count):
        block = bytes([lsn]) * BLOCK_SIZE
        payload = m.encode_ops([m.PutBlocks(2, (0, 100 + lsn, formats.crc(block)))])
        records.append(formats.encode_record(lsn, 1, payload))
        blocks.append(block)
    timeline = [(first + 1, 10), (first + count - 1, 20)]
    return b"".join(rf.encode_chunk(first, first + count - 1, UUID, timeline,
                                    b"".join(records), blocks))


def test_chunk_round_trip():
    chunk = rf.decode_chunk(_chunk(), UUID, "c", mapped_blocks)
    assert (chunk.first, chunk.last) == (5, 7)
    assert [r.lsn for r in chunk.records] == [5, 6, 7]
    assert [(pblk, data[:1]) for pblk, _, data in chunk.blocks] == [
        (105, b"\x05"), (106, b"\x06"), (107, b"\x07")]
    assert chunk.timeline == [(6, 10), (7, 20)]
    assert rf.read_chunk_head(_chunk(), "c") == (5, 7, [(6, 10), (7, 20)])


@pytest.mark.parametrize("offset", [3, 20, rf.CHUNK_HEADER_SIZE + 5, -5])
def test_chunk_damage_is_named(offset):
    data = bytearray(_chunk())
    data[offset] ^= 0x40
    with pytest.raises(FormatError, match="chunks/x"):
        rf.decode_chunk(bytes(data), UUID, "chunks/x", mapped_blocks)


def test_chunk_of_another_filesystem_is_refused():
    with pytest.raises(FormatError, match="another filesystem"):
        rf.decode_chunk(_chunk(), bytes(16), "c", mapped_blocks)


def test_pack_and_manifest_round_trip_and_damage():
    blocks = [(9, formats.crc(b"a" * BLOCK_SIZE), b"a" * BLOCK_SIZE),
              (3, formats.crc(b"b" * BLOCK_SIZE), b"b" * BLOCK_SIZE)]
    pack = b"".join(rf.encode_pack(42, blocks))
    assert [(p, c, bytes(d)) for p, c, d in rf.decode_pack(pack, 42, "p")] == blocks
    with pytest.raises(FormatError, match="another base|does not belong"):
        rf.decode_pack(pack, 41, "p")
    damaged = bytearray(pack)
    damaged[-1] ^= 1
    with pytest.raises(FormatError, match="checksum"):
        rf.decode_pack(bytes(damaged), 42, "p")
    manifest = rf.Manifest(42, 123, 7, 2, ((formats.crc(pack), 2),))
    encoded = rf.encode_manifest(manifest, UUID)
    assert rf.decode_manifest(encoded, UUID, "m") == manifest
    with pytest.raises(FormatError):
        rf.decode_manifest(encoded[:-1] + bytes([encoded[-1] ^ 1]), UUID, "m")


def test_identity_and_state_record():
    assert rf.decode_identity(rf.encode_identity(UUID), "i") == UUID
    state = rf.ReplicaState(77, True, rf.target_id("s3://b/p"))
    assert rf.ReplicaState.decode(state.encode()) == state
    with pytest.raises(FormatError):
        rf.ReplicaState.decode(state.encode()[:-1] + b"\0")


def test_chunk_names_sort_by_lsn_and_parse_back():
    names = [rf.chunk_key(a, b) for a, b in [(1, 9), (10, 255), (256, 4096)]]
    assert sorted(names) == names
    assert [rf.parse_chunk_key(n.split("/")[1]) for n in names] == [(1, 9), (10, 255),
                                                                      (256, 4096)]


def test_checkpoint_blocks_are_the_trees():
    state = TreeState.fresh(uid=0, gid=0, now_ns=1)
    state.apply(m.PutInode(2, 0o100644, 1, 0, 0, 0, 3 * BLOCK_SIZE, 1, 1, 1))
    state.apply(m.PutEntry(1, b"f", 2))
    state.apply(m.PutBlocks(2, (0, 7, 11, 1, 8, 12, 2, 30, 13)))
    state.apply(m.PutInode(3, 0o100644, 1, 0, 0, 0, 1, 1, 1, 1))
    state.apply(m.PutEntry(1, b"g", 3))
    state.apply(m.PutBlocks(3, (0, 5, 99)))
    assert sorted(checkpoint_blocks(snapshot.encode(state))) == sorted(
        (p, c) for p, _, _, c in state.used_blocks())
