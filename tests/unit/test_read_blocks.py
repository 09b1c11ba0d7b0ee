"""read_blocks: the verified read of a file's block range, run by run."""

from __future__ import annotations

import os

import pytest

from razorfs.fuse.datapath import ChecksumMismatch, read_blocks
from razorfs.storage.formats import BLOCK_SIZE, crc

STORE = os.urandom(64 * BLOCK_SIZE)  # a block store of 64 blocks


def block(pblk: int) -> bytes:
    return STORE[pblk * BLOCK_SIZE : (pblk + 1) * BLOCK_SIZE]


def mapping(pairs) -> tuple:
    return tuple(v for lblk, pblk in pairs for v in (lblk, pblk, crc(block(pblk))))


class Store:
    def __init__(self) -> None:
        self.calls = []

    def read_run(self, pblk: int, count: int) -> bytes:
        self.calls.append((pblk, count))
        return STORE[pblk * BLOCK_SIZE : (pblk + count) * BLOCK_SIZE]


@pytest.mark.parametrize("pairs, runs", [
    ([(10, 3), (11, 4), (12, 5), (13, 6)], [(3, 4)]),            # one run
    ([(10, 3), (11, 4), (12, 9), (13, 10)], [(3, 2), (9, 2)]),    # two physical runs
    ([(10, 3), (12, 5), (13, 6)], [(3, 1), (5, 2)]),              # a hole at 11
    ([(10, 7), (11, 6), (12, 5)], [(7, 1), (6, 1), (5, 1)]),      # backwards on disk
])
def test_reads_each_physical_run_once_and_zero_fills_holes(pairs, runs):
    store = Store()
    data = read_blocks(store.read_run, 10, 4, mapping(pairs))
    assert store.calls == runs
    mapped = dict(pairs)
    expected = b"".join(block(mapped[lblk]) if lblk in mapped else bytes(BLOCK_SIZE)
                        for lblk in range(10, 14))
    assert bytes(data) == expected


def test_a_damaged_block_is_named():
    triples = list(mapping([(0, 1), (1, 2), (2, 3)]))
    triples[3 * 1 + 2] ^= 1  # logical block 1 (physical 2) has a wrong checksum
    with pytest.raises(ChecksumMismatch) as info:
        read_blocks(Store().read_run, 0, 3, tuple(triples))
    assert (info.value.lblk, info.value.pblk) == (1, 2)


def test_uncached_run_makes_the_whole_read_none():
    assert read_blocks(lambda pblk, count: None, 0, 2, mapping([(0, 1), (1, 2)])) is None
