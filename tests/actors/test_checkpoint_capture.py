"""Incremental checkpoints: the tree manager serves requests between the chunks of a checkpoint,
and the checkpoint is still exactly the tree as of its LSN."""

import errno
import random

import pytest
import trio

from razorfs.state import redo, snapshot
from razorfs.actors import messages as m
from razorfs.storage.checkpoints import list_checkpoints
from razorfs.storage import formats
from razorfs.storage.formats import BLOCK_SIZE
from razorfs.storage.wal import scan_log
from razorfs.state.tree import TreeState

from .harness import FILE, ROOT, mounted, pattern, raises


def checkpoint_body(disk, lsn: int) -> bytes:
    path = dict(list_checkpoints(disk))[lsn]
    uuid = disk_uuid(disk)
    got_lsn, body = formats.decode_checkpoint(disk.read_file(path), uuid, path)
    assert got_lsn == lsn
    return body


def disk_uuid(disk) -> bytes:
    return formats.Superblock.decode(disk.read_file(formats.SUPERBLOCK_PATH)).uuid


def replayed_until(disk, since: int, until: int) -> TreeState:
    """The checkpoint of LSN ``since`` plus every logged transaction up to ``until``."""
    state = snapshot.decode(checkpoint_body(disk, since))
    for record in scan_log(disk, disk_uuid(disk), since).records:
        if record.lsn <= until:
            for op in redo.decode_ops(record.payload):
                state.apply(op)
    return state


async def test_requests_are_served_between_chunks_and_the_checkpoint_is_exact(
        disk, no_unexpected_error_logs):
    rng = random.Random(5)
    async with mounted(disk, checkpoint_chunk=4) as fs:
        state = fs.recovered.state  # the tree manager's own state
        files = []
        for i in range(60):
            d = await fs.mkdir(b"d%d" % i)
            for j in range(4):
                f = await fs.create(b"f%d" % j, d.ino)
                await fs.write(f.ino, 0, pattern(i * 10 + j, rng.choice([10, BLOCK_SIZE + 1])))
                files.append((d.ino, b"f%d" % j, f.ino))
        in_root = [b"root-%d" % i for i in range(150)]
        for name in in_root:  # a big directory: produced in pieces, changed in between
            await fs.create(name)
        first = await fs.checkpoint()

        served_during_capture = []
        checkpoint_lsn = None
        created = 0

        async def checkpoint():
            nonlocal checkpoint_lsn
            checkpoint_lsn = await fs.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(checkpoint)
            while checkpoint_lsn is None:
                parent, name, ino = rng.choice(files)
                action = rng.randrange(6)
                capture = state.capture  # running before the request was sent
                if action == 0:
                    lsn = (await fs.call(m.SetXattr(ino, b"user.k", rng.randbytes(8)))).lsn
                elif action == 1:
                    lsn = await fs.write(ino, rng.randrange(3 * BLOCK_SIZE), b"new bytes")
                elif action == 2:
                    lsn = await fs.truncate(ino, rng.randrange(BLOCK_SIZE))
                elif action == 3:
                    # a counter, not a random number: a slow machine makes thousands of
                    # these while the checkpoint runs, and random names then collide
                    created += 1
                    lsn = (await fs.call(m.MakeNode(parent, b"new-%d" % created, FILE, 0, 0,
                                                    0))).lsn
                elif action == 4 and in_root:
                    name = in_root.pop(rng.randrange(len(in_root)))
                    lsn = (await fs.call(m.Remove(ROOT, name, False))).lsn
                elif action == 5:
                    lsn = (await fs.call(m.Rename(parent, name, ROOT, b"moved-%d" % ino, 0))).lsn
                    files.remove((parent, name, ino))
                    files.append((ROOT, b"moved-%d" % ino, ino))
                else:
                    continue
                if lsn and capture is not None and state.capture is capture:  # and after
                    served_during_capture.append(lsn)
        await fs.sync()
        chunks = [e["chunks"] for e in no_unexpected_error_logs if e["event"] == "checkpoint"]
        assert chunks[-1] > 100, chunks
        assert len(served_during_capture) > 50, "requests waited for the whole checkpoint"
        assert min(served_during_capture) > checkpoint_lsn
        # Exactly the tree as of its LSN: the previous checkpoint plus the log up to that LSN.
        assert checkpoint_body(disk, checkpoint_lsn) == \
            snapshot.encode(replayed_until(disk, first, checkpoint_lsn))
        expected = await fs.dump()
        crashed = disk.crash()
    async with mounted(crashed) as fs:
        assert fs.recovered.checkpoint_lsn == checkpoint_lsn and fs.recovered.replayed > 50
        assert await fs.dump() == expected


async def test_unchanged_tree_aborts_its_capture(fs):
    await fs.create(b"a")
    lsn = await fs.checkpoint()
    assert await fs.checkpoint() == lsn  # nothing changed: no second file
    assert fs.recovered.state.capture is None, "the capture was not dropped"


async def test_one_capture_at_a_time(fs):
    state = fs.recovered.state
    await fs.create(b"a")
    old, _ = await fs.call(m.BeginSnapshot())
    new, lsn = await fs.call(m.BeginSnapshot())
    assert state.capture.ident == new
    with raises(errno.ESTALE):
        await fs.call(m.SnapshotChunk(old, 10))
    await fs.tree.tell(m.AbortSnapshot(old))  # not the running one: ignored
    assert (await fs.call(m.SnapshotChunk(new, 1))).last is False
    await fs.tree.tell(m.AbortSnapshot(new))
    await fs.call(m.TreeStats())  # the tell was handled
    assert state.capture is None
    with raises(errno.ESTALE):
        await fs.call(m.SnapshotChunk(new, 10))
    assert await fs.checkpoint() == lsn  # and checkpoints go on


@pytest.mark.logs_errors
async def test_failsafe_in_the_middle_of_a_capture_refuses_and_drops_it(disk):
    async with mounted(disk) as fs:
        for i in range(20):
            await fs.create(b"f%d" % i)
        f = await fs.create(b"f")
        await fs.sync()
        ident, _ = await fs.call(m.BeginSnapshot())
        await fs.call(m.SnapshotChunk(ident, 1))
        # A transaction that fails to apply halfway: failsafe (see test_recovery).
        with raises(errno.EIO):
            await fs.call(m.CommitWrite(f.ino, 0, 2 * BLOCK_SIZE, (0, 5, 7, 1, "bad", 7)))
        with raises(errno.EROFS):
            await fs.call(m.SnapshotChunk(ident, 1))
        assert fs.recovered.state.capture is None
        with raises(errno.EROFS):
            await fs.call(m.BeginSnapshot())
