"""Recovery coordinator: replay after crashes, orphans, checkpoints and log trimming, failsafe."""

import errno
import stat

import pytest
import trio

from razorfs import fsck
from razorfs.actors import messages as m
from razorfs.state.recovery import load
from razorfs.storage.checkpoints import list_checkpoints
from razorfs.storage.formats import BLOCK_SIZE
from razorfs.storage.wal import list_segments

from .harness import ROOT, mounted, pattern, raises


async def populate(fs) -> None:
    """A bit of everything: directories, data, links, a symlink, a rename, xattrs."""
    d = await fs.mkdir(b"dir")
    sub = await fs.mkdir(b"sub", d.ino)
    big = await fs.create(b"big", sub.ino)
    await fs.write(big.ino, 0, pattern(1, 3 * BLOCK_SIZE + 123))
    await fs.write(big.ino, BLOCK_SIZE - 10, b"overwritten across a block boundary")
    small = await fs.create(b"small")
    await fs.write(small.ino, 0, b"hello")
    await fs.call(m.Link(small.ino, d.ino, b"hardlink"))
    await fs.create(b"sym", mode=stat.S_IFLNK | 0o777, target=b"dir/sub/big")
    await fs.call(m.Rename(ROOT, b"small", d.ino, b"renamed", 0))
    await fs.call(m.SetXattr(big.ino, b"user.k", b"v"))


async def test_clean_shutdown_leaves_nothing_to_replay(disk):
    async with mounted(disk) as fs:
        await populate(fs)
        expected = await fs.dump()
    async with mounted(disk) as fs:
        assert fs.recovered.replayed == 0 and fs.recovered.orphans == 0
        assert await fs.dump() == expected
    assert fsck.check(disk).clean


async def test_power_cut_keeps_exactly_what_was_durable(disk):
    async with mounted(disk, commit_interval=30.0) as fs:
        await populate(fs)
        await fs.sync()
        durable = await fs.dump()
        await fs.create(b"not waited for")
        await fs.call(m.Remove(ROOT, b"sym", False))
        crashed = disk.crash()
    report = fsck.check(crashed)
    assert report.clean, report.problems
    async with mounted(crashed) as fs:
        assert fs.recovered.replayed > 0
        assert await fs.dump() == durable
        big = await fs.resolve("dir/sub/big")
        assert fs.queries.getxattr(big, b"user.k") == b"v"
    assert fsck.check(crashed).clean


async def test_written_data_reads_back_after_power_cut(disk):
    data = bytearray(pattern(2, 5 * BLOCK_SIZE + 77))
    async with mounted(disk) as fs:
        ino = (await fs.create(b"data")).ino
        await fs.write(ino, 0, bytes(data))
        await fs.write(ino, 2 * BLOCK_SIZE + 5, b"X" * 6000)  # partial blocks at both ends
        data[2 * BLOCK_SIZE + 5 : 2 * BLOCK_SIZE + 6005] = b"X" * 6000
        await fs.write(ino, 8 * BLOCK_SIZE, b"past a hole")
        data += bytes(8 * BLOCK_SIZE - len(data)) + b"past a hole"
        await fs.sync()
        assert await fs.read(ino) == data
        crashed = disk.crash()
    async with mounted(crashed) as fs:
        ino = await fs.resolve("data")
        assert (await fs.getattr(ino)).size == len(data)
        assert await fs.read(ino) == data
        assert await fs.read(ino, 2 * BLOCK_SIZE, 10) == data[2 * BLOCK_SIZE : 2 * BLOCK_SIZE + 10]
    assert fsck.check(crashed).clean


async def test_orphan_is_reclaimed_at_recovery(disk):
    async with mounted(disk) as fs:
        f = await fs.create(b"open")  # the kernel still holds it
        await fs.write(f.ino, 0, pattern(3, 2 * BLOCK_SIZE))
        await fs.call(m.Remove(ROOT, b"open", False))
        await fs.sync()
        assert await fs.read(f.ino) == pattern(3, 2 * BLOCK_SIZE)
        assert (await fs.space()).used == 2
        crashed = disk.crash()
    report = fsck.check(crashed)
    assert report.clean and any("orphan" in note for note in report.notes), report
    async with mounted(crashed) as fs:
        assert fs.recovered.orphans == 1
        with raises(errno.ENOENT):
            await fs.getattr(f.ino)
        assert (await fs.space()).used == 0
    async with mounted(crashed) as fs:  # reclaimed for good: checkpointed at recovery
        assert fs.recovered.orphans == 0 and fs.recovered.replayed == 0


async def test_replayed_records_are_checkpointed_once_the_mount_serves(disk, autojump_clock):
    """Recovery leaves the checkpoint of what it replayed to the coordinator, which takes it at
    once (not at the next poll, nor only once the log has grown)."""
    async with mounted(disk, commit_interval=30.0) as fs:
        await populate(fs)
        await fs.sync()
        expected = await fs.dump()
        crashed = disk.crash()
    async with mounted(crashed, checkpoint_poll=3600.0) as fs:
        assert fs.recovered.replayed > 0 and fs.recovered.checkpoint_due
        await trio.sleep(1)
        assert (await fs.coordinator.ask(m.CheckpointStats())).written == 1
        assert list_checkpoints(crashed)[-1][0] == fs.recovered.last_lsn
        assert await fs.dump() == expected
        crashed_again = crashed.crash()
    async with mounted(crashed_again) as fs:
        assert fs.recovered.replayed == 0 and not fs.recovered.checkpoint_due
        assert await fs.dump() == expected
    assert fsck.check(crashed_again).clean


async def test_checkpoint_trims_the_log(disk):
    async with mounted(disk, segment_bytes=64 << 10, commit_interval=30.0) as fs:
        for i in range(12):  # ~20 KiB records: three to a segment
            ino = (await fs.create(b"f%d" % i)).ino
            await fs.call(m.SetXattr(ino, b"user.fill", pattern(i, 20 << 10)))
            await fs.sync()
        first = await fs.checkpoint()
        await fs.create(b"between")
        await fs.sync()
        before = len(list_segments(disk))
        second = await fs.checkpoint()
        after = len(list_segments(disk))
        assert second > first and after < before <= 12 and after <= 2, (before, after)
        assert [lsn for lsn, _ in list_checkpoints(disk)] == [first, second]
        await fs.create(b"after")
        await fs.sync()
        expected = await fs.dump()
        crashed = disk.crash()
    assert fsck.check(crashed).clean
    async with mounted(crashed) as fs:
        assert fs.recovered.checkpoint_lsn == second and fs.recovered.replayed == 1
        assert await fs.dump() == expected


def damage_newest_checkpoint(disk) -> None:
    with disk.open(list_checkpoints(disk)[-1][1]) as f:
        f.pwrite(60, b"\xff" * 8)
        f.fsync()


async def test_damaged_newest_checkpoint_falls_back_to_previous_plus_log(disk):
    async with mounted(disk) as fs:
        await fs.create(b"a")
        await fs.checkpoint()
        await fs.create(b"b")
        await fs.checkpoint()
        await fs.create(b"c")
        await fs.sync()
        crashed = disk.crash()
    damage_newest_checkpoint(crashed)
    async with mounted(crashed) as fs:
        assert fs.recovered.skipped_checkpoints
        assert set(await fs.listdir()) == {b"a", b"b", b"c"}


async def test_repeated_checkpoint_keeps_the_fallback_usable(disk):
    async with mounted(disk) as fs:
        await fs.create(b"a")
        await fs.sync()
        await fs.checkpoint()
    # Unmounting takes another checkpoint, at the same LSN: nothing changed since.
    damage_newest_checkpoint(disk)
    async with mounted(disk) as fs:
        assert fs.recovered.skipped_checkpoints
        assert b"a" in await fs.listdir(), "fell back to an older checkpoint without its log"


@pytest.mark.logs_errors
@pytest.mark.parametrize("op, path", [("fsync", "wal/"), ("pwrite", "wal/"), ("fsync", "blocks")])
async def test_log_write_error_turns_the_filesystem_read_only(disk, op, path):
    async with mounted(disk, commit_interval=30.0) as fs:
        kept = await fs.create(b"kept")
        await fs.write(kept.ino, 0, b"durable bytes")
        await fs.call(m.SetXattr(kept.ino, b"user.x", b"1"))
        await fs.sync()
        disk.fail_next(op, errno.EIO, path_contains=path)
        doomed = await fs.create(b"doomed")
        lsn = await fs.write(doomed.ino, 0, b"never durable")  # data: the store is fsynced too
        with raises(errno.EIO):
            await fs.wait_durable(lsn)
        assert (await fs.wal_stats()).failed
        assert (await fs.call(m.TreeStats())).failsafe, "tree manager does not report failsafe"
        changes = [lambda: fs.create(b"later"), lambda: fs.write(kept.ino, 0, b"x"),
                   lambda: fs.truncate(kept.ino, 0),
                   lambda: fs.call(m.Remove(ROOT, b"kept", False)),
                   lambda: fs.call(m.SetXattr(kept.ino, b"user.y", b"2"))]
        for change in changes:
            with raises(errno.EROFS):
                await change()
        assert (await fs.space()).used == 2, f"refused writes kept blocks: {await fs.space()}"
        assert (await fs.lookup(ROOT, b"kept")).ino == kept.ino
        assert await fs.read(kept.ino) == b"durable bytes"
        assert fs.queries.getxattr(kept.ino, b"user.x") == b"1"
        assert b"kept" in await fs.listdir()
        crashed = disk.crash()
    async with mounted(crashed) as fs:
        assert set(await fs.listdir()) == {b"kept"}
        assert await fs.read(await fs.resolve("kept")) == b"durable bytes"


@pytest.mark.logs_errors
@pytest.mark.parametrize("op", ["fsync", "rename", "fsync_dir"])
async def test_failed_checkpoint_loses_nothing(disk, op):
    async with mounted(disk) as fs:
        await populate(fs)
        disk.fail_next(op, errno.EIO, path_contains="checkpoints")
        with raises(errno.EIO):
            await fs.checkpoint()
        await fs.create(b"still writable")
        await fs.sync()
        expected = await fs.dump()
        crashed = disk.crash()
    assert fsck.check(crashed).clean
    async with mounted(crashed) as fs:
        assert await fs.dump() == expected


async def test_log_growth_triggers_a_checkpoint(disk, autojump_clock):
    async with mounted(disk, checkpoint_bytes=16 << 10, checkpoint_poll=2.0) as fs:
        f = await fs.create(b"f")
        for i in range(4):
            await fs.call(m.SetXattr(f.ino, b"user.%d" % i, bytes(5000)))
        lsn = await fs.sync()
        await trio.sleep(2.5)  # one poll
        # The coordinator serves requests in turn: this answers after any checkpoint it started.
        assert (await fs.coordinator.ask(m.CheckpointStats())).written == 1
        assert list_checkpoints(disk)[-1][0] == lsn
        assert (await fs.wal_stats()).bytes_since_trim == 0
        await trio.sleep(10)  # nothing new logged: no more checkpoints
        assert (await fs.coordinator.ask(m.CheckpointStats())).written == 1


async def test_record_count_triggers_a_checkpoint_and_bounds_the_replay(disk, autojump_clock):
    """Many small records, far below the byte trigger: the record trigger alone checkpoints,
    so a crash afterwards replays only what came after that checkpoint."""
    async with mounted(disk, checkpoint_records=50, checkpoint_poll=2.0) as fs:
        first = await fs.sync()
        f = await fs.create(b"f")
        for i in range(first + 49 - await fs.sync()):  # one record each
            await fs.call(m.SetXattr(f.ino, b"user.x", b"%d" % i))
        assert await fs.sync() == first + 49
        await trio.sleep(2.5)
        assert (await fs.coordinator.ask(m.CheckpointStats())).written == 0  # 49 records
        await fs.call(m.SetXattr(f.ino, b"user.x", b"last"))
        lsn = await fs.sync()
        await trio.sleep(2.5)
        assert (await fs.coordinator.ask(m.CheckpointStats())).written == 1
        assert list_checkpoints(disk)[-1][0] == lsn
        for i in range(3):
            await fs.call(m.SetXattr(f.ino, b"user.y", b"%d" % i))
        await fs.sync()
        await trio.sleep(10)  # 3 records since the checkpoint: no other
        assert (await fs.coordinator.ask(m.CheckpointStats())).written == 1
        crashed = disk.crash()
    recovered = load(crashed)
    assert (recovered.checkpoint_lsn, recovered.replayed) == (lsn, 3)


@pytest.mark.logs_errors
async def test_half_applied_transaction_never_reaches_a_checkpoint(disk):
    async with mounted(disk) as fs:
        f = await fs.create(b"f")
        await fs.sync()
        # Stands for any bug that makes TreeState.apply fail midway: the first triple maps,
        # the second does not. The tree manager goes failsafe: "the log does not have it".
        with raises(errno.EIO):
            await fs.call(m.CommitWrite(f.ino, 0, 2 * BLOCK_SIZE, (0, 5, 7, 1, "bad", 7)))
        with raises(errno.EROFS):
            await fs.create(b"g")
    report = fsck.check(disk)
    assert report.clean, report.problems
    async with mounted(disk) as fs:
        assert fs.queries.map_blocks(f.ino, 0, 2) == (0, ())


async def test_frequent_stats_requests_do_not_hold_off_checkpoints(disk, autojump_clock):
    """A monitor asking for stats more often than the poll period (``razorfs stats`` in a loop,
    a Prometheus scrape) must not keep the coordinator from checking the log's size."""
    async with mounted(disk, checkpoint_bytes=16 << 10, checkpoint_poll=5.0) as fs:
        f = await fs.create(b"f")
        for i in range(4):
            await fs.call(m.SetXattr(f.ino, b"user.%d" % i, bytes(5000)))
        # No fsync: the commit interval commits these. The asks come every 0.5 s from the
        # start, as any wait on a worker thread would let the mock clock jump straight to the
        # coordinator's first check.
        for _ in range(30):  # 15 s
            await trio.sleep(0.5)
            checkpoints = (await fs.coordinator.ask(m.CheckpointStats())).written
        assert checkpoints == 1
        assert (await fs.wal_stats()).bytes_since_trim == 0
