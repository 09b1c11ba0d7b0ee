"""WAL writer: concurrent waiters share fsyncs; unwaited changes are bounded by commit_interval."""

import random

import pytest
import trio

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


async def test_commit_interval_bounds_unwaited_loss(disk, autojump_clock):
    # The coordinator's log-size poll is a message to the writer too: keep it out of the way.
    async with mounted(disk, commit_interval=30.0, checkpoint_poll=1e6) as fs:
        lsn = (await fs.tree.ask(m.MakeNode(ROOT, b"late", FILE, 0, 0, 0))).lsn
        images = {"at once": disk.crash()}
        await trio.sleep(29)
        # A WalStats round trip also waits out any commit already running in the writer.
        assert (await fs.wal_stats()).durable_lsn < lsn, "committed before commit_interval"
        images["after 29 s"] = disk.crash()
        await trio.sleep(2)
        # No message reaches the writer from here on: its own timer must commit. (A message
        # would let it notice the age of its oldest record without the timer.)
        status = fs.handles.wal_status
        with trio.fail_after(10_000):  # virtual seconds; the clock jumps while the fsync runs
            while status.durable_lsn < lsn:
                await trio.sleep(1)
        images["after 31 s"] = disk.crash()
        assert (await fs.wal_stats()).durable_lsn >= lsn
    for when, image in images.items():
        async with mounted(image) as recovered:
            present = b"late" in await recovered.listdir()
            assert present == (when == "after 31 s"), f"crash {when}: present={present}"


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
