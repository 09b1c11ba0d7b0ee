"""Seeded power-cut exploration of the real actors on a SimDisk.

For each seed: mount, run a random workload (creates, mkdirs, copy-on-write writes, truncates,
renames, links, unlinks, rmdirs, forgets of orphans, xattrs, ACLs and the chmods and creates
that rewrite or inherit them, fsync points, checkpoints) with a model of the namespace, and
unmount. A probe between the actors and the SimDisk keeps, for a uniform random
sample of the mutating storage calls, the disk a power cut just before that call could leave
(``SimDisk.crash(keep_unsynced=True, tear=True)``: unsynced writes and directory changes partly
applied, the last write torn, in the middle too). Each
image must pass fsck, recover, and hold exactly the model state after the transaction with the
recovered LSN, which must lie between the last acknowledged fsync point and the request in
flight; after the clean unmount at the end, it must be the last state. A power cut during that
recovery must recover the same state; the recovered filesystem must take new changes and
survive another cut. Failures name the seed and the cut.

RAZORFS_LONG=1 explores ten times more seeds.
"""

from __future__ import annotations

import os
import random
import stat

import pyfuse3
import pytest

from actors.harness import ROOT, formatted, mounted
from razorfs import fsck
from razorfs.actors import messages as m
from razorfs.state import acl
from razorfs.storage.formats import BLOCK_SIZE
from razorfs.storage.interface import Storage, StorageFile
from razorfs.storage.simdisk import SimDisk

SEEDS = range(10_000 if os.environ.get("RAZORFS_LONG") else 1000)
CUTS_PER_RUN = 4  # plus the final cut, each also cut again during its recovery: 10 per seed
# Commits only when someone waits (no timer): the order of storage calls is a function of the seed.
TUNING = dict(commit_interval=1e6, segment_bytes=8 << 10)
NAMES = [b"a", b"b", b"c", b"d", b"e"]
XATTRS = [b"user.x", b"user.y", b"trusted.z"]
# ACLs with named entries (never equivalent to a mode, so always stored), as stored
NO_ID = acl.UNDEFINED_ID
ACLS = [acl.encode(entries) for entries in (
    ((acl.USER_OBJ, 7, NO_ID), (acl.USER, 5, 1000), (acl.GROUP_OBJ, 5, NO_ID),
     (acl.MASK, 7, NO_ID), (acl.OTHER, 0, NO_ID)),
    ((acl.USER_OBJ, 6, NO_ID), (acl.GROUP_OBJ, 4, NO_ID), (acl.GROUP, 6, 1234),
     (acl.MASK, 6, NO_ID), (acl.OTHER, 4, NO_ID)))]
ACTIONS = {"create": 12, "mkdir": 5, "symlink": 3, "write": 25, "truncate": 6, "rename": 12,
           "link": 5, "unlink": 10, "rmdir": 4, "forget": 4, "setxattr": 5, "removexattr": 2,
           "setacl": 4, "chmod": 3, "sync": 12, "checkpoint": 3}

explored = {"runs": 0, "cuts": 0}


class CutProbe(Storage):
    """A SimDisk seen through a probe that keeps, for a uniform sample (reservoir) of its
    mutating calls, the disk a power cut just before that call could leave, with ``window()``
    (what the workload had acknowledged at that moment)."""

    def __init__(self, disk: SimDisk, seed: int, window=lambda: None,
                 cuts: int = CUTS_PER_RUN) -> None:
        self.disk, self.counters = disk, disk.counters
        self._seed, self._window, self._sample = seed, window, cuts
        self._rng = random.Random(seed)
        self.armed = True
        self.calls = 0
        self.cuts: list[tuple[int, tuple[int, int], SimDisk]] = []

    def step(self) -> None:
        if not self.armed:
            return
        self.calls += 1
        slot = len(self.cuts) if len(self.cuts) < self._sample else self._rng.randrange(self.calls)
        if slot < self._sample:
            image = self.disk.crash(random.Random(self._seed * 100_003 + self.calls),
                                    keep_unsynced=True, tear=True)
            cut = (self.calls, self._window(), image)
            self.cuts[slot:slot + 1] = [cut]

    def open(self, path: str, *, create: bool = False) -> StorageFile:
        if create:
            self.step()
        return _ProbedFile(self, self.disk.open(path, create=create))

    def exists(self, path):
        return self.disk.exists(path)

    def listdir(self, path):
        return self.disk.listdir(path)

    def space(self):
        return self.disk.space()

    def mkdir(self, path):
        self.step()
        self.disk.mkdir(path)

    def rename(self, src, dst):
        self.step()
        self.disk.rename(src, dst)

    def unlink(self, path):
        self.step()
        self.disk.unlink(path)

    def fsync_dir(self, path):
        self.step()
        self.disk.fsync_dir(path)


class _ProbedFile(StorageFile):
    def __init__(self, probe: CutProbe, file: StorageFile) -> None:
        self._probe, self._file = probe, file

    def pread(self, offset, length):
        return self._file.pread(offset, length)

    def pwrite(self, offset, data):
        self._probe.step()
        self._file.pwrite(offset, data)

    def truncate(self, size):
        self._probe.step()
        self._file.truncate(size)

    def fsync(self):
        self._probe.step()
        self._file.fsync()

    def size(self):
        return self._file.size()

    def close(self):
        self._file.close()


def served_xattrs(fs, ino: int) -> dict[bytes, bytes]:
    """What the filesystem answers: the model of changes whose xattrs follow from rules (ACLs
    inherited at creation, rewritten by chmod), so that recovery must rebuild exactly that."""
    return {name: fs.queries.getxattr(ino, name) for name in fs.queries.listxattr(ino)}


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def name_of(path: str) -> bytes:
    return path.rpartition("/")[2].encode()


class Workload:
    """Random requests and the model of what each acknowledged one leaves: ``snapshots[i]`` is
    the namespace (in ``Fs.dump`` form) after the i-th request; ``snapshots[durable]`` was
    acknowledged durable by a completed fsync point."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.dirs = {"": ROOT}  # path -> ino ("" is the root)
        self.files: dict[str, int] = {}  # path -> ino, symlinks included
        self.data: dict[int, bytes] = {}  # content, or a symlink's target
        self.symlinks: set[int] = set()
        self.xattrs: dict[int, dict[bytes, bytes]] = {}
        self.nlink: dict[int, int] = {}
        self.orphans: set[int] = set()  # unlinked, still referenced (never forgotten)
        self.snapshots = [{}]
        self.snapshot_of_lsn = {0: 0}
        self.durable = 0
        self.window = (0, 0)  # snapshots a power cut right now may recover to

    def snapshot(self) -> dict:
        def xattrs(ino):
            return tuple(sorted(self.xattrs.get(ino, {}).items()))
        state = {p: ("l", self.data[i], xattrs(i)) if i in self.symlinks
                 else ("f", self.nlink[i], self.data[i], xattrs(i)) for p, i in self.files.items()}
        for path, ino in self.dirs.items():
            if path:
                subdirs = sum(parent_of(d) == path for d in self.dirs if d)
                state[path] = ("d", 2 + subdirs, xattrs(ino))
        return state

    def children(self, path: str) -> list[str]:
        return [p for p in (*self.dirs, *self.files) if p and parent_of(p) == path]

    def new_path(self) -> str | None:
        path = f"{self.rng.choice(sorted(self.dirs))}/{self.rng.choice(NAMES).decode()}"
        return None if path in self.dirs or path in self.files else path

    def drop_name(self, path: str) -> None:
        ino = self.files.pop(path)
        self.nlink[ino] -= 1
        if not self.nlink[ino]:
            self.orphans.add(ino)

    async def run(self, fs, count: int) -> None:
        for _ in range(count):
            kind, action = self.pick()
            changes = kind not in ("sync", "checkpoint")  # one transaction each, or none
            self.window = (self.durable, len(self.snapshots) - (not changes))
            lsn = await action(fs)
            if changes:
                assert lsn, f"{kind} committed no transaction"
                self.snapshot_of_lsn[lsn] = len(self.snapshots)
                self.snapshots.append(self.snapshot())
            elif kind == "sync":
                self.durable = len(self.snapshots) - 1
        self.window = (self.durable, len(self.snapshots) - 1)

    def pick(self):
        while True:
            kind = self.rng.choices(list(ACTIONS), list(ACTIONS.values()))[0]
            action = getattr(self, kind)()
            if action is not None:
                return kind, action

    # ---- actions: None when not applicable now, else an async function returning the LSN ----

    def create(self, mode: int = 0o100644):
        path = self.new_path()
        if path is None:
            return None
        target = self.rng.randbytes(self.rng.randint(1, 100)) if stat.S_ISLNK(mode) else b""

        async def go(fs):
            reply = await fs.call(m.MakeNode(self.dirs[parent_of(path)], name_of(path), mode,
                                             0, 0, 0, target))
            ino = reply.attr.ino
            self.xattrs[ino] = served_xattrs(fs, ino)
            if stat.S_ISDIR(mode):
                self.dirs[path] = ino
            else:
                self.files[path], self.data[ino], self.nlink[ino] = ino, target, 1
                if target:
                    self.symlinks.add(ino)
            return reply.lsn
        return go

    def mkdir(self):
        return self.create(0o40755)

    def symlink(self):
        return self.create(0o120777)

    def _any_file(self) -> int | None:
        inodes = {*self.files.values(), *self.orphans} - self.symlinks  # orphans stay writable
        return self.rng.choice(sorted(inodes)) if inodes else None

    def write(self):
        ino = self._any_file()
        if ino is None:
            return None
        offset = self.rng.choice([0, self.rng.randrange(3 * BLOCK_SIZE)])
        size = self.rng.choice([BLOCK_SIZE, self.rng.randint(1, 2 * BLOCK_SIZE)])
        data = self.rng.randbytes(size)
        logged = self.rng.random() < 0.5  # its bytes in the WAL record too (PutData)

        async def go(fs):
            lsn = await fs.write(ino, offset, data, log_data=logged)
            old = self.data[ino].ljust(offset, b"\0")
            self.data[ino] = old[:offset] + data + old[offset + len(data):]
            return lsn
        return go

    def truncate(self):
        ino = self._any_file()
        if ino is None:
            return None
        size = self.rng.randrange(3 * BLOCK_SIZE + 1)

        async def go(fs):
            lsn = await fs.truncate(ino, size)
            self.data[ino] = self.data[ino][:size].ljust(size, b"\0")
            return lsn
        return go

    def rename(self):
        sources = sorted(p for p in (*self.dirs, *self.files) if p)
        if not sources:
            return None
        src = self.rng.choice(sources)
        dst = f"{self.rng.choice(sorted(self.dirs))}/{self.rng.choice(NAMES).decode()}"
        flags = self.rng.choice([0, 0, pyfuse3.RENAME_NOREPLACE, pyfuse3.RENAME_EXCHANGE])
        exists = dst in self.dirs or dst in self.files

        def inside(path: str, ancestor: str) -> bool:
            return ancestor in self.dirs and (path + "/").startswith(ancestor + "/")

        if inside(dst, src) or inside(src, dst) or (self.files.get(src, 0) == self.files.get(dst)):
            return None  # into itself (EINVAL), or the same inode twice (nothing to log)
        if flags == pyfuse3.RENAME_EXCHANGE and not exists:
            return None
        if flags == pyfuse3.RENAME_NOREPLACE and exists:
            return None
        if not flags and exists and (
                (src in self.dirs) != (dst in self.dirs) or self.children(dst)):
            return None  # EISDIR, ENOTDIR, ENOTEMPTY

        async def go(fs):
            lsn = (await fs.call(m.Rename(self.dirs[parent_of(src)], name_of(src),
                                          self.dirs[parent_of(dst)], name_of(dst), flags))).lsn
            if dst in self.files and not flags:
                self.drop_name(dst)
            if not flags:
                self.dirs.pop(dst, None)  # a replaced empty directory
            for table in (self.dirs, self.files):  # move (or swap) both subtrees
                moved = {}
                for path in list(table):
                    for a, b in ((src, dst), (dst, src)):
                        if path == a or path.startswith(a + "/"):
                            moved[b + path[len(a):]] = table.pop(path)
                table.update(moved)
            return lsn
        return go

    def link(self):
        path = self.new_path()
        if path is None or not self.files:
            return None
        ino = self.files[self.rng.choice(sorted(self.files))]

        async def go(fs):
            lsn = (await fs.call(m.Link(ino, self.dirs[parent_of(path)], name_of(path)))).lsn
            self.files[path] = ino
            self.nlink[ino] += 1
            return lsn
        return go

    def unlink(self):
        if not self.files:
            return None
        path = self.rng.choice(sorted(self.files))

        async def go(fs):
            lsn = (await fs.call(m.Remove(self.dirs[parent_of(path)], name_of(path), False))).lsn
            self.drop_name(path)
            return lsn
        return go

    def rmdir(self):
        empty = sorted(p for p in self.dirs if p and not self.children(p))
        if not empty:
            return None
        path = self.rng.choice(empty)

        async def go(fs):
            lsn = (await fs.call(m.Remove(self.dirs[parent_of(path)], name_of(path), True))).lsn
            del self.dirs[path]
            return lsn
        return go

    def forget(self):
        if not self.orphans:
            return None
        ino = self.rng.choice(sorted(self.orphans))

        async def go(fs):
            lsn = (await fs.call(m.Forget((ino, 1 << 20)))).lsn  # last reference: DropInode
            self.orphans.remove(ino)
            return lsn
        return go

    def setxattr(self):
        inodes = sorted({*self.files.values(), *self.dirs.values()} - {ROOT})
        if not inodes:
            return None
        ino, name = self.rng.choice(inodes), self.rng.choice(XATTRS)
        value = self.rng.randbytes(self.rng.choice([0, 10, 3000]))
        if self.xattrs.get(ino, {}).get(name) == value:
            value += b"!"  # storing the same value again is no change (no transaction)

        async def go(fs):
            lsn = (await fs.call(m.SetXattr(ino, name, value))).lsn
            self.xattrs.setdefault(ino, {})[name] = value
            return lsn
        return go

    def removexattr(self):
        present = sorted((ino, name) for ino, names in self.xattrs.items() for name in names
                         if ino in self.dirs.values() or ino in self.files.values())
        if not present:
            return None
        ino, name = self.rng.choice(present)

        async def go(fs):
            lsn = (await fs.call(m.RemoveXattr(ino, name))).lsn
            del self.xattrs[ino][name]
            return lsn
        return go

    def setacl(self):
        """Set an access ACL (mode and ACL) or a directory's default ACL, or remove one."""
        inodes = sorted({*self.files.values(), *self.dirs.values()} - self.symlinks - {ROOT})
        if not inodes:
            return None
        ino = self.rng.choice(inodes)
        name = (acl.DEFAULT if ino in self.dirs.values() and self.rng.random() < 0.6
                else acl.ACCESS)
        current = self.xattrs.get(ino, {}).get(name)
        value = (b"" if current is not None and self.rng.random() < 0.3
                 else self.rng.choice([v for v in ACLS if v != current]))

        async def go(fs):
            lsn = (await fs.call(m.SetXattr(ino, name, value))).lsn
            self.xattrs[ino] = served_xattrs(fs, ino)
            return lsn
        return go

    def chmod(self):
        ino = self._any_file()
        if ino is None:
            return None
        mode = self.rng.choice([0o600, 0o640, 0o755, 0o4711])

        async def go(fs):
            lsn = (await fs.call(m.SetAttr(ino, mode=mode))).lsn
            self.xattrs[ino] = served_xattrs(fs, ino)
            return lsn
        return go

    def sync(self):
        return lambda fs: fs.sync()

    def checkpoint(self):
        async def go(fs):
            await fs.checkpoint()
            return 0
        return go


def difference(got: dict, want: dict) -> str:
    paths = sorted(set(got) | set(want))
    diffs = [f"{p}: got {str(got.get(p))[:60]} want {str(want.get(p))[:60]}"
             for p in paths if got.get(p) != want.get(p)]
    return "; ".join(diffs[:5]) or "equal"


async def check_cut(seed: int, workload: Workload, what: str, window, image: SimDisk,
                    nested: bool = True) -> None:
    """``image`` must pass fsck and recover to the state of its LSN, within ``window``. Unless
    ``nested``: a power cut during that recovery must recover the same, and the recovered
    filesystem must take new changes and survive one more cut."""
    lo, hi = window
    label = f"seed={seed}: power cut {what} (may keep states {lo}..{hi})"
    report = fsck.check(image)
    assert report.clean, f"{label}: fsck before recovery: {report.problems}"
    probe = CutProbe(image, seed, cuts=1) if nested else None
    async with mounted(probe or image, **TUNING) as fs:
        if probe:
            probe.armed = False  # only recovery itself is cut
        lsn = fs.recovered.last_lsn
        k = workload.snapshot_of_lsn.get(lsn)
        assert k is not None and lo <= k <= hi, f"{label}: recovered LSN {lsn} = state {k}"
        state = await fs.dump()
        assert state in workload.snapshots[lo:hi + 1], (
            f"{label}: recovered state is none of the allowed ones; versus the state of LSN "
            f"{lsn}: {difference(state, workload.snapshots[k])}")
        assert state == workload.snapshots[k], (
            f"{label}: recovered LSN {lsn} but the state of another LSN: "
            f"{difference(state, workload.snapshots[k])}")
        if not nested:
            return
        marker = await fs.create(b"after-cut")
        await fs.write(marker.ino, 0, b"written after recovery")
        await fs.sync()
        state = await fs.dump()
        again = image.crash(random.Random(seed), keep_unsynced=True, tear=True)
    for calls, _, cut in probe.cuts:
        explored["cuts"] += 1
        await check_cut(seed, workload, f"{what}, then before recovery's storage call {calls}",
                        (k, k), cut, nested=False)
    label = f"{label}, then after more changes"
    report = fsck.check(again)
    assert report.clean, f"{label}: fsck: {report.problems}"
    async with mounted(again, **TUNING) as fs:
        assert await fs.dump() == state, f"{label}: state differs"


@pytest.mark.parametrize("seed", SEEDS)
async def test_power_cut(seed):
    workload = Workload(seed)
    probe = CutProbe(formatted(SimDisk()), seed, lambda: workload.window)
    async with mounted(probe, **TUNING) as fs:
        await workload.run(fs, workload.rng.randint(5, 40))
    # After a clean unmount every change is durable: only the last state may come back.
    final = probe.disk.crash(random.Random(seed), keep_unsynced=True, tear=True)
    last = len(workload.snapshots) - 1
    for what, window, image in [*((f"before storage call {calls}", window, image)
                                  for calls, window, image in probe.cuts),
                                ("after the clean unmount", (last, last), final)]:
        explored["cuts"] += 1
        await check_cut(seed, workload, what, window, image)
    explored["runs"] += 1
