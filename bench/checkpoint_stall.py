"""How long a checkpoint holds up the tree manager (issue 5: at most 100 ms, up to 1M inodes).

    .venv/bin/python bench/checkpoint_stall.py                       # 100k inodes
    .venv/bin/python bench/checkpoint_stall.py --inodes 1000000 --layout flat
    .venv/bin/python bench/checkpoint_stall.py --writes              # probes also change inodes

A tree of --inodes inodes is built in memory (--layout tree: directories of 100 files, each file
one to four blocks and some with an xattr; flat: every file in the root directory) and written
as the checkpoint of a fresh data directory (real files under --workdir), which the real actors
then recover. A probe task asks the tree manager one request at a time (TreeStats; with
--writes, of every four one is a SetXattr of a random inode and two create and remove a file in
the root directory, which makes the capture keep prior states)
and records each round trip. Per checkpoint (--runs of them, each after one change so that it is
not skipped) the table shows the probe's median and longest round trip while the checkpoint ran,
against the same without a checkpoint: the longest one is the stall.
The checkpoint is incremental: BeginSnapshot, then SnapshotChunk asks of --chunk records.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import os
import random
import shutil
import stat
import statistics
import sys
import tempfile
import time
from array import array

import structlog
import trio

from razorfs.state import redo, snapshot
from razorfs.actors import messages as m
from razorfs.actors import tree_manager
from razorfs.actors.mailbox import open_mailbox
from razorfs.actors.recovery_coordinator import RecoveryCoordinator
from razorfs.actors.system import Tuning
from razorfs.storage.checkpoints import write_checkpoint
from razorfs.datadir import format_storage
from razorfs.storage.files import FileStorage
from razorfs.state.tree import ROOT_INO, TreeState

T0 = 1_700_000_000_000_000_000


def build(inodes: int, layout: str) -> TreeState:
    state = TreeState.fresh(uid=0, gid=0, now_ns=T0)
    rng = random.Random(1)
    parent, ino, pblk = ROOT_INO, ROOT_INO + 1, 0
    while ino <= inodes:
        if layout == "tree" and (ino - 2) % 101 == 0:
            state.apply(redo.PutInode(ino, stat.S_IFDIR | 0o755, 2, 0, 0, 0, 0, T0, T0, T0))
            state.apply(redo.PutEntry(ROOT_INO, b"dir-%d" % ino, ino))
            parent = ino
        else:
            count = rng.randint(1, 4)
            state.apply(redo.PutInode(ino, stat.S_IFREG | 0o644, 1, 0, 0, 0, count * 4096, T0,
                                   T0, T0))
            state.apply(redo.PutEntry(parent, b"file-%010d" % ino, ino))
            state.apply(redo.PutBlocks(ino, tuple(v for lblk in range(count)
                                               for v in (lblk, pblk + lblk, 0x12345678))))
            pblk += count
            if ino % 7 == 0:
                state.apply(redo.PutXattr(ino, b"user.tag", b"value %d" % ino))
        ino += 1
    return state


class StepTimer:
    """Wraps the tree manager's dispatch: how long each message kept it busy, in
    wall-clock and in CPU time of the trio thread (the latter not inflated when other
    processes take the CPU away, as they do on a shared machine)."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, float, str]] = []
        self._inner = tree_manager.dispatch

    async def __call__(self, envelope, handler, actor):
        wall, cpu = time.perf_counter(), time.thread_time()
        await self._inner(envelope, handler, actor)
        self.steps.append((time.perf_counter() - wall, time.thread_time() - cpu,
                           type(m.decode(envelope.payload)).__name__))

    def longest(self) -> str:
        if not self.steps:
            return "no steps"
        wall = max(self.steps)
        cpu = max(self.steps, key=lambda step: step[1])
        return (f"longest tree manager step {wall[0] * 1e3:.1f} ms wall ({wall[2]}), "
                f"{cpu[1] * 1e3:.1f} ms CPU ({cpu[2]})")


_TICKS = itertools.count(4)


async def probe_while(tree, numbers, rng, writes: bool, running) -> list[float]:
    """Round trips (seconds) of requests asked one at a time while ``running()``."""
    latencies = []
    while running():
        ino = rng.choice(numbers)
        tick = next(_TICKS)
        request = m.TreeStats()
        if writes and tick % 4 == 1:
            request = m.SetXattr(ino, b"user.probe", b"%d" % tick)
        elif writes and tick % 4 == 2:
            request = m.MakeNode(ROOT_INO, b"probe-%d" % tick, stat.S_IFREG | 0o644, 0, 0, 0)
        elif writes and tick % 4 == 3:
            request = m.Remove(ROOT_INO, b"probe-%d" % (tick - 1), False)
        started = time.perf_counter()
        await tree.ask(request)
        latencies.append(time.perf_counter() - started)
    return latencies


def summary(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"{len(ordered):6d} probes  median {statistics.median(ordered) * 1e3:7.2f} ms  "
            f"p99 {p99 * 1e3:7.2f} ms  max {ordered[-1] * 1e3:7.2f} ms")


async def measure(storage, args) -> None:
    tuning = {"commit_interval": 1.0, "checkpoint_bytes": 1 << 62, "checkpoint_poll": 1e6,
              "checkpoint_chunk": args.chunk}
    coordinator, inbox = open_mailbox()
    rng = random.Random(2)
    timer = tree_manager.dispatch = StepTimer()
    async with trio.open_nursery() as nursery:
        handles = await nursery.start(RecoveryCoordinator(inbox, storage, Tuning(**tuning)).run)
        tree = handles.tree
        numbers = array("Q", sorted(handles.recovered.state.inodes))  # not walked by the GC
        gc.freeze()  # as the daemon does once recovered
        try:
            deadline = trio.current_time() + 1.0
            idle = await probe_while(tree, numbers, rng, args.writes,
                                     lambda: trio.current_time() < deadline)
            print(f"  no checkpoint      {summary(idle)}")
            print(f"{'':21s}{timer.longest()}")
            for run in range(args.runs):
                await tree.ask(m.SetXattr(ROOT_INO, b"user.run", b"%d" % run))
                done = trio.Event()
                took = []

                async def checkpoint(done=done, took=took):
                    started = time.perf_counter()
                    await coordinator.ask(m.Checkpoint())
                    took.append(time.perf_counter() - started)
                    done.set()

                timer.steps.clear()
                nursery.start_soon(checkpoint)
                during = await probe_while(tree, numbers, rng, args.writes,
                                           lambda done=done: not done.is_set())
                print(f"  checkpoint {run + 1} {took[0]:5.2f} s {summary(during)}")
                print(f"{'':21s}{timer.longest()}")
        finally:
            for mailbox in (tree, handles.wal, handles.allocator, coordinator):
                await mailbox.aclose()
    tree_manager.dispatch = timer._inner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inodes", type=int, default=100_000)
    parser.add_argument("--layout", choices=["tree", "flat"], default="tree")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=Tuning().checkpoint_chunk,
                        help="records per SnapshotChunk ask")
    parser.add_argument("--writes", action="store_true",
                        help="probes also change inodes and the root directory")
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    started = time.perf_counter()
    state = build(args.inodes, args.layout)
    workdir = tempfile.mkdtemp(prefix="razorfs-ckpt-stall-", dir=args.workdir)
    try:
        storage = FileStorage(workdir)
        superblock = format_storage(storage)
        write_checkpoint(storage, superblock.uuid, 0, snapshot.encode(state))
        del state
        gc.collect()
        print(f"{args.inodes} inodes ({args.layout}), built in "
              f"{time.perf_counter() - started:.1f} s; probes: "
              f"{'TreeStats/SetXattr/create/unlink' if args.writes else 'TreeStats'}; "
              f"python {sys.version.split()[0]}, "
              f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
        print(f"chunk {args.chunk} records")
        trio.run(measure, storage, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
