"""WAL writer: concurrent waiters share fsyncs; unwaited changes are bounded by commit_interval."""

import random
import time

import pytest
import trio
import trio.testing

from razorfs import fsck
from razorfs.actors import messages as m
from razorfs.storage.formats import BLOCK_SIZE

from .harness import FILE, ROOT, mounted

N = 50


async def test_concurrent_waiters_share_fsyncs(fs):
    fsyncs_before, stats_before = fs.disk.counters.fsyncs, await fs.wal_stats()
    acknowledged = []

    async def create_and_wait(i: int) -> None:
        lsn = (await fs.tree.ask(m.MakeNode(ROOT, b"f%d" % i, FILE, 0, 0, 0))).lsn
        assert await fs.wait_durable(lsn) >= lsn
        acknowledged.append(lsn)

    async with trio.open_nursery() as nursery:
        for i in range(N):
            nursery.start_soon(create_and_wait, i)

    fsyncs = fs.disk.counters.fsyncs - fsyncs_before
    stats = await fs.wal_stats()
    batches = stats.batches - stats_before.batches
    assert sorted(acknowledged) == list(range(stats_before.durable_lsn + 1,
                                              stats_before.durable_lsn + N + 1))
    assert stats.records - stats_before.records == N
    assert fsyncs < N / 4, f"{fsyncs} fsyncs for {N} concurrent commits: no group commit"
    assert batches < N / 4 and stats.fsyncs - stats_before.fsyncs == batches
    # Every acknowledged change survives a power cut.
    async with mounted(fs.disk.crash()) as after:
        assert len(await after.listdir()) == N


async def test_fsyncs_statistic_counts_every_flush_of_the_writer(disk):
    """The WAL writer's ``fsyncs`` are the flushes it made, starting segments included: with no
    checkpoint to take, it is the only one flushing the disk, so the disk's count must agree."""
    async with mounted(disk, segment_bytes=8 << 10, checkpoint_poll=1e6) as fs:
        disk_before, stats_before = disk.counters.fsyncs, await fs.wal_stats()
        segments_before = len(disk.listdir("wal"))
        for i in range(30):
            ino = (await fs.create(b"f%d" % i)).ino
            await fs.write(ino, 0, b"data")
            await fs.call(m.SetXattr(ino, b"user.big", bytes(1000)))  # fills segments
            await fs.sync()
        stats = await fs.wal_stats()
        assert len(disk.listdir("wal")) > segments_before + 2, "no segment was started"
        assert stats.fsyncs - stats_before.fsyncs == disk.counters.fsyncs - disk_before


@pytest.mark.parametrize("seed", range(8))
async def test_power_cut_amid_concurrent_writers(disk, seed):
    """Writers race the WAL writer's commits; a power cut at a random moment keeps every
    acknowledged write whole (and nothing half-written becomes visible)."""
    rng = random.Random(seed)
    contents = {b"w%d" % i: rng.randbytes(rng.randint(1, 3 * BLOCK_SIZE)) for i in range(30)}
    acknowledged: dict[bytes, bytes] = {}

    async def writer(name: bytes) -> None:
        ino = (await fs.create(name)).ino
        lsn = await fs.write(ino, 0, contents[name])
        if name[-1] % 3:
            await fs.wait_durable(lsn)
            acknowledged[name] = contents[name]

    async with mounted(disk, commit_interval=0.001) as fs:
        async with trio.open_nursery() as nursery:
            for name in contents:
                nursery.start_soon(writer, name)
            target = rng.randint(0, 15)
            while len(acknowledged) < target:
                await trio.sleep(0.0002)
            image = disk.crash(random.Random(seed), keep_unsynced=True, tear=True)
            durable = dict(acknowledged)
    assert fsck.check(image).clean, f"seed {seed}"
    async with mounted(image) as fs:
        for name, attr in (await fs.listdir()).items():
            assert await fs.read(attr.ino) in (b"", contents[name]), f"seed {seed}: {name}"
        for name, data in durable.items():
            assert await fs.read(await fs.resolve(name.decode())) == data, f"seed {seed}: {name}"


async def test_commit_interval_is_the_bound_on_unwaited_loss(disk, mock_clock):
    """G4 itself: a change nobody waits for is committed when commit_interval has passed since
    it was made, neither earlier nor later, even while newer changes keep coming. Virtual time
    moves only when the test moves it: the commit's fsync runs in a worker thread, during which
    an autojump clock would jump, so the moment of a commit could not be told."""
    interval = 30
    # The coordinator's log-size poll is a message to the writer too: keep it out of the way.
    async with mounted(disk, commit_interval=interval, checkpoint_poll=1e6) as fs:
        status = fs.handles.wal_status
        made_at = trio.current_time()
        first = (await fs.tree.ask(m.MakeNode(ROOT, b"first", FILE, 0, 0, 0))).lsn
        await trio.testing.wait_all_tasks_blocked()  # the writer has taken the record, now
        images = {"at once": disk.crash()}
        for second in range(1, interval):
            mock_clock.jump(1)
            # A newer change every second: the bound counts from the oldest one waiting.
            await fs.tree.ask(m.MakeNode(ROOT, b"later%d" % second, FILE, 0, 0, 0))
            await trio.testing.wait_all_tasks_blocked()
            assert status.durable_lsn < first, f"committed {second} s after the change"
        images[f"after {interval - 1} s"] = disk.crash()
        mock_clock.jump(1)
        # No message reaches the writer from here on: its own timer must commit, at this very
        # virtual moment (the fsync takes real time in a thread; the clock stays put).
        deadline = time.monotonic() + 10
        while status.durable_lsn < first:
            assert time.monotonic() < deadline, (
                f"not committed {interval} s after the change (virtual time "
                f"{trio.current_time() - made_at} s)")
            await trio.to_thread.run_sync(time.sleep, 0.01)
        assert trio.current_time() - made_at == interval
        images[f"after {interval} s"] = disk.crash()
    for when, image in images.items():
        async with mounted(image) as recovered:
            present = b"first" in await recovered.listdir()
            assert present == (when == f"after {interval} s"), f"crash {when}: present={present}"


async def test_wait_for_a_durable_lsn_returns_at_once(autojump_clock, disk):
    async with mounted(disk, commit_interval=30.0) as fs:
        await fs.create(b"a")
        lsn = await fs.sync()
        await fs.create(b"pending")  # logged, not committed: must not be forced out
        fsyncs, stats, now = disk.counters.fsyncs, await fs.wal_stats(), trio.current_time()
        with trio.fail_after(1):
            assert await fs.wait_durable(lsn) == lsn
            assert await fs.wait_durable(0) == lsn
        assert trio.current_time() == now
        assert disk.counters.fsyncs == fsyncs
        assert await fs.wal_stats() == stats
