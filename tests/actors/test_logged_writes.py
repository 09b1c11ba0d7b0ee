"""Small writes logged with their data (PutData): one flush per durable write, and the log
carries the bytes until a checkpoint has made the block store durable."""

import random

from razorfs import fsck
from razorfs.storage.formats import BLOCK_SIZE

from .harness import formatted, mounted, pattern


async def test_a_logged_write_is_made_durable_with_one_flush(fs):
    f = await fs.create(b"f")
    await fs.sync()
    before = await fs.wal_stats()
    await fs.wait_durable(await fs.write(f.ino, 0, pattern(1, BLOCK_SIZE)))
    ordered = await fs.wal_stats()
    await fs.wait_durable(await fs.write(f.ino, 0, pattern(2, BLOCK_SIZE), log_data=True))
    logged = await fs.wal_stats()
    assert ordered.fsyncs - before.fsyncs == 2  # the block store, then the log
    assert logged.fsyncs - ordered.fsyncs == 1  # the log alone carries the bytes


async def test_the_log_gives_back_a_block_the_block_store_lost():
    disk = formatted()
    async with mounted(disk) as fs:
        f = await fs.create(b"f")
        await fs.sync()
        await fs.write(f.ino, 0, pattern(3, 2 * BLOCK_SIZE), log_data=True)
        await fs.write(f.ino, 100, b"partial", log_data=True)
        await fs.sync()
        image = disk.crash()  # nothing unsynced survives: the blocks only the log has
    assert fsck.check(image).clean, fsck.check(image).problems
    expected = bytearray(pattern(3, 2 * BLOCK_SIZE))
    expected[100:107] = b"partial"
    async with mounted(image) as fs:
        assert await fs.read(await fs.resolve("f")) == expected
    assert fsck.check(image).clean


async def test_a_checkpoint_makes_logged_blocks_durable_before_the_log_goes():
    disk = formatted()
    async with mounted(disk, segment_bytes=8 << 10) as fs:
        f = await fs.create(b"f")
        await fs.write(f.ino, 0, pattern(4, BLOCK_SIZE), log_data=True)
        await fs.sync()
        await fs.checkpoint()
        for i in range(30):  # roll segments: the log of the logged write is trimmed
            await fs.create(b"g%d" % i)
        await fs.sync()
        await fs.checkpoint()
        image = disk.crash()
    async with mounted(image) as fs:
        assert await fs.read(await fs.resolve("f")) == pattern(4, BLOCK_SIZE)


async def test_a_block_rewritten_unlogged_after_a_logged_write_keeps_its_new_bytes():
    """Replay must not write a logged block's old bytes over a later, ordered use of it."""
    disk = formatted()
    async with mounted(disk) as fs:
        f = await fs.create(b"f")
        await fs.write(f.ino, 0, pattern(5, BLOCK_SIZE), log_data=True)
        await fs.sync()
        for i in range(40):  # free and reuse the same physical blocks, logged or not
            await fs.write(f.ino, 0, pattern(6 + i, BLOCK_SIZE), log_data=bool(i % 3 == 0))
            await fs.sync()
        final = pattern(6 + 39, BLOCK_SIZE)
        image = disk.crash(random.Random(7), keep_unsynced=True, tear=True)
    assert fsck.check(image).clean
    async with mounted(image) as fs:
        assert await fs.read(await fs.resolve("f")) == final
